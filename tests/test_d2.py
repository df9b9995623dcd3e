"""mars_nb.d2: the detectron2 backend.

The pure-Python parts (config keys, dataset records, angle grouping, optimizer groups, the CPU
stand-in for the deformable-attention op, the "not installed" errors) are tested everywhere. The
tests marked `needs_d2` run the official Mask2Former (detectron2 + a Mask2Former clone on
PYTHONPATH) and skip, with the reason, where those are not installed.
"""
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import mars_nb.d2 as d2
from mars_nb.losses import DEFAULT_STAGES, PRESET_NAMES, TOP_DEFAULTS, MarsLoss, resolve_config
from mars_nb.taps import STAGES, TapMeta
from mars_nb.config import AnglePolicy, EvalConfig
from mars_nb.views import IGNORE, Lattice

REASON = d2.missing_reason()
needs_d2 = pytest.mark.skipif(REASON is not None, reason=f"needs detectron2 and the official Mask2Former: "
                              f"{(REASON or '').split('. ')[0]} (install: see mars_nb.d2.INSTALL_HINT)")


# ---------------------------------------------------------------------------------------------
# without detectron2
# ---------------------------------------------------------------------------------------------
def test_import_without_detectron2_gives_clear_errors():
    code = ("import sys; sys.modules['detectron2'] = None\n"
            "import mars_nb.d2 as d2\n"
            "assert not d2.have_detectron2()\n"
            "for f in (d2.require_detectron2, lambda: d2.MarsTrainer, lambda: d2.build_config()):\n"
            "    try:\n"
            "        f(); raise SystemExit('no error')\n"
            "    except ImportError as e:\n"
            "        m = str(e); assert 'detectron2 is not installed' in m and 'Mask2Former' in m, m\n"
            "try:\n"
            "    d2.no_such_name; raise SystemExit('no error')\n"
            "except AttributeError: pass\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_missing_parts_are_named(monkeypatch):
    present = {"detectron2": True, "detectron2._C": False}
    monkeypatch.setattr(d2, "_import_error",
                        lambda name: None if present[name] else ModuleNotFoundError(f"No module named {name!r}", name=name))
    monkeypatch.setattr(d2.importlib.util, "find_spec", lambda name: None)          # no mask2former on the path
    assert "compiled ops (detectron2._C: ModuleNotFoundError" in d2.missing_reason()
    present["detectron2._C"] = True
    msg = d2.missing_reason()
    assert "Mask2Former" in msg and "PYTHONPATH" in msg
    assert d2.missing_reason(mask2former=False) is None and d2.have_detectron2(mask2former=False)
    with pytest.raises(ImportError, match="PYTHONPATH"):
        d2.require_detectron2()
    present["detectron2"] = False
    assert d2.missing_reason().startswith("detectron2 is not installed")


def test_msdeformattn_stand_in():
    mod = sys.modules.get(d2.MSDA_MODULE)
    if mod is not None and not getattr(mod, "__mars_nb_fallback__", False):
        assert d2.use_msdeformattn_fallback() is False      # a working compiled op is left alone
        return
    if d2.use_msdeformattn_fallback() is False:
        pytest.skip("the compiled MultiScaleDeformableAttention op is installed and loads here")
    assert d2.use_msdeformattn_fallback() is True           # idempotent
    mod = sys.modules[d2.MSDA_MODULE]
    before = d2.msdeformattn_fallback_calls()
    for f in (mod.ms_deform_attn_forward, mod.ms_deform_attn_backward):
        with pytest.raises(NotImplementedError, match="PyTorch"):
            f(torch.zeros(1))
    assert d2.msdeformattn_fallback_calls() == before + 2


def test_msdeformattn_broken_op_is_replaced(tmp_path, monkeypatch):
    (tmp_path / f"{d2.MSDA_MODULE}.py").write_text("raise ImportError('undefined symbol: _ZN3c10 (built for another torch)')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = sys.modules.pop(d2.MSDA_MODULE, None)
    try:
        assert d2.use_msdeformattn_fallback() is True
        stand_in = sys.modules[d2.MSDA_MODULE]
        assert "undefined symbol" in stand_in.why
        with pytest.raises(NotImplementedError, match="undefined symbol"):
            stand_in.ms_deform_attn_forward()
    finally:
        sys.modules.pop(d2.MSDA_MODULE, None)
        if saved is not None:
            sys.modules[d2.MSDA_MODULE] = saved


def test_defaults_equal_the_hugging_face_path():
    keys = d2.mars_defaults()
    assert d2.mars_config(keys) == resolve_config(None) == MarsLoss().config()
    assert [keys[k]["WEIGHT"] for k in ("BACKBONE", "PIXEL_DECODER", "ATTENTION")] == [0.05, 0.10, 0.15]
    assert keys["STAGES"] == ["backbone", "pixel_decoder", "attention"]
    assert keys["ANGLES"] == {"KIND": "discrete", "VALUES": AnglePolicy().values}
    assert keys["EVAL"] == {"ANGLES": EvalConfig().angles, "BATCH_SIZE": EvalConfig().batch_size}
    assert keys["MODE"] == "mars" and keys["ATTENTION"]["LAYERS"] == [] and keys["MARGIN"] == TOP_DEFAULTS["margin"] == 1.0
    # every stage has its node, the output stage too (off by default: not in STAGES)
    assert set(d2.STAGE_KEYS) == set(STAGES) and d2.STAGE_KEYS["output"] == "OUTPUT"
    assert keys["OUTPUT"] == {"WEIGHT": DEFAULT_STAGES["output"]["weight"], "DISTANCE": DEFAULT_STAGES["output"]["distance"],
                              "TAPS": ["all"], "OPTIONS": {}}
    pol = d2.angle_policy(keys)
    assert (pol.kind, pol.values) == (AnglePolicy().kind, AnglePolicy().values)


OUTPUT_ON = {"preset": "hybrid", "stages": {"output": {"distance": "kl", "weight": 0.2}}}

CUSTOM = {"preset": "hybrid", "gradient": "stop_grad", "matching": "hungarian", "per_head": True, "margin": 1,
          "seed": 3, "stages": {"attention": {"taps": [0, 2], "distance": "kl", "weight": 0.3},
                                "pixel_decoder": {"distance": "infonce", "options": {"tau": 0.2}},
                                "backbone": None}}


@pytest.mark.parametrize("config", [*PRESET_NAMES, CUSTOM, {"stages": {"backbone": {"taps": "all"}}}, OUTPUT_ON],
                         ids=[*PRESET_NAMES, "custom", "all_taps", "hybrid_output"])
def test_keys_round_trip_through_yaml(config):
    keys = d2.mars_keys(config, angles={"KIND": "range", "VALUES": [-30.0, 30.0]}, mode="rotaug")
    assert set(d2.STAGE_KEYS.values()) <= set(keys)                # OUTPUT included, used or not
    assert keys["STAGES"] == list(resolve_config(config)["stages"])
    back = yaml.safe_load(yaml.safe_dump(keys))
    assert d2.mars_config(back) == resolve_config(config)
    assert d2.mars_mode(back) == "rotaug" and d2.angle_policy(back).values == [-30.0, 30.0]
    assert d2.mars_config({"MODEL": {"MARS": back}}) == resolve_config(config)   # a whole config works too


def test_output_stage_keys():
    assert "output" in PRESET_NAMES
    keys = d2.mars_keys("output")
    assert keys["STAGES"] == ["output"] and keys["OUTPUT"]["TAPS"] == ["all"]
    keys = d2.mars_keys(OUTPUT_ON)
    assert keys["STAGES"] == ["backbone", "pixel_decoder", "attention", "output"]
    assert (keys["OUTPUT"]["DISTANCE"], keys["OUTPUT"]["WEIGHT"]) == ("kl", 0.2)
    cfg = d2.mars_config(keys)
    assert cfg["stages"]["output"]["distance"] == "kl" and cfg["stages"]["output"]["weight"] == 0.2
    with pytest.raises(ValueError, match="distance"):               # output distances: js, kl
        d2.mars_config({**keys, "OUTPUT": {**keys["OUTPUT"], "DISTANCE": "cosine"}})


def test_bad_keys_name_what_is_valid():
    keys = d2.mars_defaults()
    with pytest.raises(ValueError, match="unknown stage"):
        d2.mars_config({**keys, "STAGES": ["backbone", "decoder"]})
    with pytest.raises(ValueError, match="STAGES is empty"):
        d2.mars_config({**keys, "STAGES": []})
    with pytest.raises(ValueError, match="valid: none, rotaug, mars"):
        d2.mars_mode({**keys, "MODE": "on"})
    with pytest.raises(ValueError, match="add_mars_config"):
        d2.mars_config({"MODEL": {}})
    with pytest.raises(ValueError, match="distance"):
        d2.mars_config({**keys, "ATTENTION": {**keys["ATTENTION"], "DISTANCE": "cosine"}})
    with pytest.raises(ValueError, match="unknown detectron2 preset"):
        d2.preset_keys("r101")


def test_presets_describe_the_official_model():
    r50, tiny = d2.preset_keys("r50"), d2.preset_keys("tiny")
    assert r50["MODEL.MASK_FORMER.DEC_LAYERS"] == 10 and r50["MODEL.MASK_FORMER.NUM_OBJECT_QUERIES"] == 100
    assert r50["MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME"] == "MSDeformAttnPixelDecoder"
    assert r50["MODEL.META_ARCHITECTURE"] == tiny["MODEL.META_ARCHITECTURE"] == "MarsMaskFormer"
    assert tiny["MODEL.MASK_FORMER.DEC_LAYERS"] - 1 >= 3       # every attention level is used
    assert set(tiny) == set(r50) | set(d2.D2_PRESETS["tiny"])


@pytest.mark.parametrize("name", ["craters", "nuclei"])
def test_dataset_records(name):
    ds = d2.scene_dataset(name)
    for split in ds.splits:
        recs = d2.dataset_dicts(name, split, 128)
        specs = ds.test_tiles(split, 128)
        assert len(recs) == len(specs) > 0
        assert [d2.tile_spec(r) for r in recs] == specs
        assert len({r["image_id"] for r in recs}) == len(recs)
        assert all(r["height"] == r["width"] == 128 and r["mars_dataset"] == name and r["split"] == split for r in recs)
    assert len(d2.dataset_dicts(name, "test", 64)) > len(d2.dataset_dicts(name, "test", 128))
    assert d2.dataset_dicts(ds, "test") == d2.dataset_dicts(name, "test")
    with pytest.raises(ValueError, match="valid splits"):
        d2.dataset_dicts(name, "holdout")


def test_angle_groups():
    assert d2.angle_groups([90, 90.0, 45, 90], [(8, 8), (8, 8), (8, 8), (8, 6)]) == [
        (90.0, (8, 8), [0, 1]), (45.0, (8, 8), [2]), (90.0, (8, 6), [3])]
    with pytest.raises(ValueError, match="one of each per sample"):
        d2.angle_groups([90], [(8, 8), (8, 8)])


# geometry of the taps below for 64 x 64 images (a ResNet-like corner lattice); attention.layer2 attends ms2 (stride 8)
META = {"backbone.res4": TapMeta(Lattice.corner(16), channels=4), "backbone.res5": TapMeta(Lattice.corner(32), channels=4),
        "attention.layer2": TapMeta(Lattice.corner(8), level=2, hw=(8, 8))}


def _two_view_captures(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"backbone.res4": torch.randn(6, 4, 4, 4, generator=g), "backbone.res5": torch.randn(6, 4, 2, 2, generator=g),
            "attention.layer2": torch.rand(6, 3, 64, generator=g).softmax(-1)}


def test_two_view_mars_groups_angles_by_share():
    cap = _two_view_captures()
    loss = MarsLoss({"stages": {"backbone": {}, "attention": {}}})
    angles, size = [90.0, 30.0, 90.0], (64, 64)
    out = d2.two_view_mars(loss, cap, angles, [size] * 3, meta=META)

    def part(idx, angle):
        v1 = {k: t[idx] for k, t in cap.items()}
        v2 = {k: t[[i + 3 for i in idx]] for k, t in cap.items()}
        return loss(v1, v2, angle=angle, image_size=size, meta=META)
    a, b = part([0, 2], 90.0), part([1], 30.0)
    for k in out:
        assert torch.allclose(out[k], 2 / 3 * a[k] + 1 / 3 * b[k]), k
    one = d2.two_view_mars(loss, cap, [90.0] * 3, [size] * 3, meta=META)
    full = loss(cap, angle=90.0, image_size=size, meta=META)
    assert all(torch.equal(one[k], full[k]) for k in full)
    with pytest.raises(ValueError, match="two-view batch of 4"):
        d2.two_view_mars(loss, cap, [90.0] * 2, [size] * 2, meta=META)
    with pytest.raises(ValueError, match="TapMeta"):                # plain dicts carry no geometry
        d2.two_view_mars(loss, cap, angles, [size] * 3)


def test_two_view_mars_hungarian_uses_the_mask_lattice():
    cap = _two_view_captures(2)
    g = torch.Generator().manual_seed(3)
    ml = torch.randn(6, 3, 16, 16, generator=g)                     # final mask logits [2B, Q, h, w], stride 4
    lattice = Lattice.corner(4)
    loss = MarsLoss({"stages": {"attention": {}}, "matching": "hungarian"})
    angles, size = [90.0, 30.0, 90.0], (64, 64)
    out = d2.two_view_mars(loss, cap, angles, [size] * 3, meta=META, mask_logits=ml, mask_lattice=lattice)

    def part(idx, angle):
        v1 = {k: t[idx] for k, t in cap.items()}
        v2 = {k: t[[i + 3 for i in idx]] for k, t in cap.items()}
        m = torch.cat([ml[idx], ml[[i + 3 for i in idx]]])
        return loss(v1, v2, angle=angle, image_size=size, meta={**META, "mask_logits": m, "mask_lattice": lattice})
    a, b = part([0, 2], 90.0), part([1], 30.0)
    for k in out:
        assert torch.allclose(out[k], 2 / 3 * a[k] + 1 / 3 * b[k]), k
    with pytest.raises(ValueError, match="mask_lattice"):           # logits without their lattice
        d2.two_view_mars(loss, cap, angles, [size] * 3, meta=META, mask_logits=ml)


def test_optimizer_param_groups_follow_mask2former():
    m = nn.Module()
    m.backbone = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    m.head = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    m.query = nn.Embedding(5, 4)
    m.mars_loss = nn.Module()
    m.mars_loss.learned = nn.ModuleDict({"backbone__res5": nn.Conv2d(4, 1, 1)})
    m.frozen = nn.Linear(2, 2).requires_grad_(False)
    groups = d2.optimizer_param_groups(m, 1e-3, 0.05, weight_decay_norm=0.0, weight_decay_embed=0.2,
                                       backbone_multiplier=0.1)
    where = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert where[id(m.backbone[0].weight)] == (1e-4, 0.05) and where[id(m.backbone[1].weight)] == (1e-4, 0.0)
    assert where[id(m.head[0].weight)] == (1e-3, 0.05) and where[id(m.head[1].bias)] == (1e-3, 0.0)
    assert where[id(m.query.weight)] == (1e-3, 0.2)
    assert where[id(m.mars_loss.learned["backbone__res5"].weight)] == (1e-3, 0.05)
    assert id(m.frozen.weight) not in where
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in m.parameters())


def test_full_model_clipping_clips_the_joint_norm():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))
    opt = d2.full_model_clipping(torch.optim.SGD, max_norm=0.5)([{"params": [a]}, {"params": [b]}], lr=1.0)
    a.grad, b.grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    norm = torch.cat([a.grad, b.grad]).norm()
    opt.step()
    step = torch.cat([a.detach(), b.detach()])
    assert torch.allclose(step.norm(), torch.tensor(0.5), atol=1e-5)
    assert torch.allclose(step, -0.5 * torch.cat([torch.full((3,), 3.0), torch.full((4,), 4.0)]) / norm, atol=1e-6)


def test_match_channels():
    x = torch.randn(1, 5, 6)
    assert d2.match_channels(x, 1) is x and torch.equal(d2.match_channels(x, 3), x.repeat(3, 1, 1))
    with pytest.raises(ValueError, match="expects 3"):
        d2.match_channels(torch.zeros(2, 4, 4), 3)


# ---------------------------------------------------------------------------------------------
# with detectron2 and the official Mask2Former
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    d2.require_detectron2()
    cfg = d2.build_config("tiny", "craters", crop=64, batch_size=2, device="cpu")
    torch.manual_seed(0)
    model = d2.build_mars_model(cfg)
    return cfg, model


def _batch(cfg, angle=90.0, n=2, size=64, seed=0):
    np.random.seed(seed)
    mapper = d2.SceneViewMapper(size, AnglePolicy("discrete", [angle]), channels=len(cfg.MODEL.PIXEL_MEAN),
                                num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    return [mapper(r) for r in d2.dataset_dicts("craters", "train")[:n]]


@needs_d2
def test_taps_capture_the_documented_shapes(tiny):
    from mars_nb.taps import Taps, stage_taps, tap_meta
    cfg, model = tiny
    model.train()
    Q, C = cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM
    for size, pad in ((64, 64), (72, 96)):                     # 72 is padded to 96 by MaskFormer
        with Taps(model, stage_taps(model)) as t:
            model(_batch(cfg, size=size))
        t.check()
        s = pad
        want = {"backbone.res2": (4, 64, s // 4, s // 4), "backbone.res3": (4, 128, s // 8, s // 8),
                "backbone.res4": (4, 256, s // 16, s // 16), "backbone.res5": (4, 512, s // 32, s // 32),
                "pixel_decoder.mask_features": (4, cfg.MODEL.SEM_SEG_HEAD.MASK_DIM, s // 4, s // 4),
                "pixel_decoder.ms0": (4, C, s // 32, s // 32), "pixel_decoder.ms1": (4, C, s // 16, s // 16),
                "pixel_decoder.ms2": (4, C, s // 8, s // 8)}
        layers = cfg.MODEL.MASK_FORMER.DEC_LAYERS - 1
        for i in range(layers):
            hw = s // (32, 16, 8)[i % 3]
            want[f"attention.layer{i}"] = (4, Q, hw * hw)
            assert t.meta[f"attention.layer{i}"].hw == (hw, hw)
        assert {k: tuple(v.shape) for k, v in t.captured.items()} == want
        strides = {"backbone.res2": 4, "backbone.res3": 8, "backbone.res4": 16, "backbone.res5": 32,
                   "pixel_decoder.mask_features": 4, "pixel_decoder.ms0": 32, "pixel_decoder.ms1": 16,
                   "pixel_decoder.ms2": 8}
        meta = tap_meta(model)
        assert all(meta[k].stride == v == t.meta[k].stride for k, v in strides.items())
        # detectron2's ResNet is declared a corner lattice; the pixel decoder inherits it
        assert all(t.meta[k].lattice == Lattice.corner(v) for k, v in strides.items())
        for i in range(layers):
            a = t.captured[f"attention.layer{i}"]
            assert torch.allclose(a.sum(-1), torch.ones(()), atol=1e-5) and a.requires_grad
            assert t.meta[f"attention.layer{i}"].stride == (32, 16, 8)[i % 3]
    with Taps(model, stage_taps(model, "attention"), per_head=True) as t:   # (the model's own MARS taps would
        model.sem_seg_head(model.backbone(torch.randn(4, 1, 64, 64))) # override per_head in a training forward)
    assert tuple(t.captured["attention.layer0"].shape) == (4, cfg.MODEL.MASK_FORMER.NHEADS, Q, 4)


@needs_d2
def test_mars_terms_are_in_the_loss_dict_and_get_gradients(tiny):
    from detectron2.utils.events import EventStorage
    cfg, model = tiny
    model.train()
    with EventStorage(0) as storage:
        losses = model(_batch(cfg, angle=30.0))
    crit = set(model.criterion.weight_dict)
    assert crit <= set(losses)
    mars = {k for k in losses if k.startswith("loss_mars_")}
    assert mars == {"loss_mars_backbone", "loss_mars_pixel_decoder", "loss_mars_attention"}
    assert set(losses) == crit | mars
    latest = {k: v for k, (v, _) in storage.latest().items()}
    for stage, w in (("backbone", 0.05), ("pixel_decoder", 0.10), ("attention", 0.15)):
        assert abs(latest[f"mars/{stage}"] * w - float(losses[f"loss_mars_{stage}"])) < 1e-6
    assert abs(latest["mars/total"] - sum(float(losses[k]) for k in mars)) < 1e-6
    pd = model.sem_seg_head.pixel_decoder
    owners = {"loss_mars_backbone": model.backbone.res5[0].conv1.weight,
              "loss_mars_pixel_decoder": pd.mask_features.weight,
              "loss_mars_attention": model.sem_seg_head.predictor.transformer_cross_attention_layers[0].multihead_attn.in_proj_weight}
    for k, p in owners.items():
        (g,) = torch.autograd.grad(losses[k], [p], retain_graph=True, allow_unused=True)
        assert g is not None and float(g.abs().sum()) > 0, k
    (g,) = torch.autograd.grad(losses["loss_mars_backbone"], [pd.mask_features.weight], retain_graph=True, allow_unused=True)
    assert g is None                                             # the backbone term does not reach the head


@needs_d2
@pytest.mark.parametrize("config", ["hybrid", {"preset": "hybrid", "matching": "hungarian", "gradient": "stop_grad"}],
                         ids=["hybrid", "hungarian_stopgrad"])
def test_same_mars_loss_as_mars_nb_losses(tiny, config):
    from mars_nb.taps import Taps, tap_meta
    cfg, _ = tiny
    c = cfg.clone()
    c.defrost()
    d2.set_mars_preset(c, config)
    torch.manual_seed(1)
    model = d2.build_mars_model(c).train()
    batch = _batch(c, angle=90.0)
    losses = model(batch)
    views = [b["image"] for b in batch] + [b["image2"] for b in batch]
    x = torch.stack([(v - model.pixel_mean) / model.pixel_std for v in views])
    direct = MarsLoss.from_config(config, model=model)
    with Taps(model, direct.tap_specs(model)) as t:
        out = model.sem_seg_head(model.backbone(x))
    meta = ({"mask_logits": out["pred_masks"], "mask_lattice": tap_meta(model)["output.classes"].lattice}
            if direct.matching == "hungarian" else None)
    terms = direct(t, angle=90.0, image_size=(64, 64), meta=meta)
    for stage, spec in direct.stages.items():
        assert torch.allclose(losses[d2.loss_key(stage)], spec.weight * terms[f"mars/{stage}"], rtol=1e-5, atol=1e-7), stage


@needs_d2
@pytest.mark.parametrize("mode,batch,mars", [("none", 2, False), ("rotaug", 4, False), ("mars", 4, True)])
def test_modes(tiny, mode, batch, mars):
    from mars_nb.taps import Taps, stage_taps
    cfg, _ = tiny
    c = cfg.clone()
    c.defrost()
    c.MODEL.MARS.MODE = mode
    model = d2.build_mars_model(c).train()
    assert (model.mars_loss is not None) == mars
    with Taps(model, stage_taps(model, "backbone", select="backbone.res2")) as t:
        losses = model(_batch(c))
    assert t.captured["backbone.res2"].shape[0] == batch          # view 1 only, or both views
    assert any(k.startswith("loss_mars_") for k in losses) == mars
    assert set(model.criterion.weight_dict) <= set(losses)


@needs_d2
def test_add_mars_config_round_trips_through_yaml(tiny, tmp_path):
    from detectron2.config import get_cfg
    from detectron2.projects.deeplab import add_deeplab_config
    from mask2former import add_maskformer2_config
    cfg, _ = tiny
    c = cfg.clone()
    c.defrost()
    d2.set_mars_preset(c, CUSTOM)
    c.MODEL.MARS.ANGLES.KIND, c.MODEL.MARS.ANGLES.VALUES = "range", [-45.0, 45.0]
    c.MODEL.MARS.EVAL.ANGLES = [0.0, 90.0]
    path = tmp_path / "config.yaml"
    path.write_text(c.dump())
    fresh = get_cfg()
    add_deeplab_config(fresh)
    add_maskformer2_config(fresh)
    d2.add_mars_config(fresh)
    assert d2.mars_config(fresh) == resolve_config(None)           # defaults before merging
    fresh.merge_from_file(str(path))
    assert fresh.MODEL.MARS == c.MODEL.MARS
    assert d2.mars_config(fresh) == resolve_config(CUSTOM)
    assert fresh.MODEL.MARS.PIXEL_DECODER.OPTIONS.tau == 0.2
    assert d2.angle_policy(fresh).values == [-45.0, 45.0] and fresh.MODEL.META_ARCHITECTURE == "MarsMaskFormer"
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  MARS:\n    NO_SUCH_KEY: 1\n")
    with pytest.raises(KeyError, match="NO_SUCH_KEY"):
        fresh.merge_from_file(str(bad))


@needs_d2
def test_dataset_registration_is_idempotent():
    from detectron2.data import DatasetCatalog, MetadataCatalog
    for _ in range(2):
        names = d2.register_datasets(["craters", "nuclei"])
    assert names["craters/test"] == "mars_craters_test" and len(names) == 6
    assert len(DatasetCatalog.get("mars_craters_test")) == len(d2.dataset_dicts("craters", "test"))
    meta = MetadataCatalog.get("mars_nuclei_val")
    assert (meta.stuff_classes, meta.ignore_label, meta.split, meta.mars_dataset) == (["background", "nucleus"], IGNORE,
                                                                                     "val", "nuclei")
    d2.register_datasets("craters", tile_size=64)               # re-registering takes the new tile size
    assert len(DatasetCatalog.get("mars_craters_test")) == len(d2.dataset_dicts("craters", "test", 64))
    assert MetadataCatalog.get("mars_craters_test").tile_size == 64
    d2.register_datasets([d2.scene_dataset("craters")])           # a SceneDataset instance works as well
    assert d2.is_mars_dataset("mars_craters_train") and not d2.is_mars_dataset("coco_2017_train")
    d2.register_datasets("craters")


@needs_d2
def test_mask2former_runs_on_the_pytorch_deformable_attention(tiny):
    cfg, model = tiny
    if not d2.use_msdeformattn_fallback():
        pytest.skip("the compiled MultiScaleDeformableAttention op is installed here")
    before = d2.msdeformattn_fallback_calls()
    model.train()
    losses = model(_batch(cfg))
    assert d2.msdeformattn_fallback_calls() > before
    assert all(torch.isfinite(v) for v in losses.values())


@needs_d2
def test_scene_mapper(tiny):
    cfg, _ = tiny
    ds = d2.scene_dataset("craters")
    rec = d2.dataset_dicts("craters", "train")[0]
    np.random.seed(3)
    m = d2.SceneViewMapper.from_config(cfg)
    out = m(rec)
    assert out["angle"] in AnglePolicy().values
    assert out["image"].shape == out["image2"].shape == (1, 64, 64)
    for s in ("", "2"):
        lab, inst = out["sem_seg" + s], out["instances" + s]
        present = sorted(set(lab.unique().tolist()) - {IGNORE})
        assert inst.gt_classes.tolist() == present
        assert torch.equal(inst.gt_masks.any(0), lab != IGNORE) and inst.gt_masks.sum(0).max() <= 1
    test = d2.SceneViewMapper.from_config(cfg, is_train=False)(d2.dataset_dicts("craters", "test")[1])
    tile = ds.tile(ds.test_tiles("test", 128)[1], 0.0)
    assert torch.equal(test["image"], tile["image"]) and torch.equal(test["sem_seg"], tile["label"])
    c = cfg.clone()
    c.defrost()
    c.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        d2.SceneViewMapper.from_config(c)(rec)


@needs_d2
def test_rotated_view_mapper_wraps_a_semantic_mapper():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 255, (3, 32, 32), generator=g, dtype=torch.uint8)
    sem = torch.randint(0, 3, (32, 32), generator=g)
    sem[:4] = IGNORE
    base = lambda rec: {"image": image.clone(), "sem_seg": sem.clone(), "file_name": rec["file_name"]}
    out = d2.RotatedViewMapper(base, AnglePolicy("discrete", [90.0]), num_classes=3)({"file_name": "x"})
    assert out["angle"] == 90.0
    assert torch.equal(out["image2"], torch.rot90(image.float(), 1, (-2, -1)))
    assert torch.equal(out["sem_seg2"], torch.rot90(sem, 1, (-2, -1)))
    assert out["instances2"].gt_classes.tolist() == [0, 1, 2]
    out = d2.RotatedViewMapper(base, AnglePolicy("discrete", [45.0]), num_classes=3)({"file_name": "x"})
    assert out["sem_seg2"][0, 0] == IGNORE and out["image2"][:, 0, 0].eq(0).all()   # outside the canvas


@needs_d2
def test_predict_d2(tiny):
    cfg, model = tiny
    model.train()
    pred = d2.predict_d2(model, torch.randn(3, 1, 64, 64))
    assert pred.shape == (3, 64, 64) and pred.dtype == torch.long and set(pred.unique().tolist()) <= {0, 1}
    assert model.training


@needs_d2
def test_trainer_short_run(tmp_path):
    from detectron2.projects.deeplab.lr_scheduler import WarmupPolyLR
    cfg = d2.build_config("tiny", "craters", crop=64, batch_size=2, device="cpu", output_dir=tmp_path,
                          opts=["SOLVER.MAX_ITER", 2, "SOLVER.CHECKPOINT_PERIOD", 10**6, "TEST.EVAL_PERIOD", 0,
                                "MODEL.MARS.EVAL.ANGLES", [0.0, 90.0]])
    cfg.freeze()
    torch.manual_seed(0)
    np.random.seed(0)
    Trainer = d2.MarsTrainer
    assert pickle.loads(pickle.dumps(Trainer)) is Trainer and d2.MarsMaskFormer.__name__ == "MarsMaskFormer"
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    hist = trainer.storage.histories()
    for stage in ("backbone", "pixel_decoder", "attention"):
        assert len(hist[f"mars/{stage}"].values()) == 2 and len(hist[f"loss_mars_{stage}"].values()) == 2
    assert np.isfinite(hist["total_loss"].latest())
    summary = {k: v for k, (v, _) in trainer.storage.latest().items() if k.startswith("mars_craters_test/")}
    assert {"mars_craters_test/fg_iou_0", "mars_craters_test/consistency_mean"} <= set(summary)
    sweep_csv = tmp_path / "sweep" / "mars_craters_test" / "sweep.csv"
    assert sweep_csv.exists() and len(sweep_csv.read_text().splitlines()) == 3
    assert type(trainer.optimizer).__name__ == "FullModelClippedAdamW"
    assert isinstance(trainer.scheduler, WarmupPolyLR)
    lrs = sorted({g["initial_lr"] for g in trainer.optimizer.param_groups})
    assert lrs == pytest.approx([cfg.SOLVER.BASE_LR * cfg.SOLVER.BACKBONE_MULTIPLIER, cfg.SOLVER.BASE_LR])


@needs_d2
def test_pixel_values_adapter_serves_the_evaluation_functions(tiny):
    from detectron2.structures import ImageList
    import mars_nb.evaluate as ev
    from mars_nb.taps import find_family
    cfg, model = tiny
    model.eval()
    adapter = d2.PixelValuesAdapter(model)
    assert find_family(adapter) == ("detectron2", "model")
    x = torch.randn(2, 1, 72, 72)
    with torch.no_grad():
        out = adapter(pixel_values=x)
        ref = model.sem_seg_head(model.backbone(ImageList.from_tensors(
            [(xi - model.pixel_mean) / model.pixel_std for xi in x], 32).tensor))
    assert out["pred_masks"].shape[-2:] == (24, 24) and torch.allclose(out["pred_masks"], ref["pred_masks"])
    if not hasattr(ev, "feature_consistency"):
        pytest.skip("mars_nb.evaluate has no feature_consistency")
    df = ev.feature_consistency(adapter, d2.scene_dataset("craters"), angles=[0.0, 90.0], n_tiles=2, progress=False)
    assert set(df.stage) == {"backbone", "pixel_decoder", "attention"}
    assert np.allclose(df[df.angle == 0.0].consistency, 1.0, atol=1e-4)
    model.train()


@needs_d2
def test_meta_arch_registration_can_be_repeated(tiny):
    from detectron2.modeling import META_ARCH_REGISTRY
    cls = d2.register_meta_arch()
    assert d2.register_meta_arch() is cls and META_ARCH_REGISTRY.get("MarsMaskFormer") is cls
    saved = dict(d2._CLASSES)
    d2._CLASSES.clear()                       # as after re-running the defining notebook cell
    try:
        new = d2.register_meta_arch()
        assert new is not cls and META_ARCH_REGISTRY.get("MarsMaskFormer") is new
    finally:
        d2._CLASSES.clear()
        d2._CLASSES.update(saved)
        META_ARCH_REGISTRY._obj_map["MarsMaskFormer"] = cls


def test_a_detectron2_that_does_not_import_is_reported_missing(tmp_path, monkeypatch):
    "have_detectron2() used to say True for an installed detectron2 that fails to import (tests then errored)."
    pkg = tmp_path / "detectron2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    for k in [k for k in sys.modules if k == "detectron2" or k.startswith("detectron2.")]:
        monkeypatch.delitem(sys.modules, k)
    reason = d2.missing_reason()
    assert not d2.have_detectron2()
    assert "detectron2 is installed but does not import (RuntimeError: operator torchvision::nms does not exist)" in reason
    assert "torchvision" in reason and "--use-pep517" in reason

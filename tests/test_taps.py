"""Tests for mars_nb.taps on the tiny Hugging Face Mask2Former and a detectron2-shaped stand-in."""
import dataclasses
import math
import warnings

import pytest
import torch
from torch import nn

from mars_nb.model import build_model
from mars_nb.taps import (HYBRID, LAYOUTS, STAGES, TapMeta, Taps, TapSpec, class_distribution, find_family,
                          resolve_paths, split_views, stage_taps, tap_meta)
from mars_nb.views import Lattice

from d2_stand_in import MaskFormer, PatchStemNet


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("tiny").eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 128, 128, generator=g)
    return torch.cat([x, torch.rot90(x, 1, (-2, -1))])  # two views, B = 2 x 2


@pytest.fixture(scope="module")
def captured(model, batch):
    with Taps(model, stage_taps(model)) as taps:
        out = model(pixel_values=batch)
    return taps.check(), out


# ---------------------------------------------------------------------------------------------
# Hugging Face family
# ---------------------------------------------------------------------------------------------

def test_preset_shapes_two_view_batch(model, captured):
    taps, _ = captured
    cap, meta = taps.captured, taps.meta
    C, Q = model.config.feature_size, model.config.num_queries
    widths = model.config.backbone_config.hidden_sizes
    expected = {
        "backbone.res2": (4, widths[0], 32, 32), "backbone.res3": (4, widths[1], 16, 16),
        "backbone.res4": (4, widths[2], 8, 8), "backbone.res5": (4, widths[3], 4, 4),
        "pixel_decoder.mask_features": (4, model.config.mask_feature_size, 32, 32),
        "pixel_decoder.ms0": (4, C, 4, 4), "pixel_decoder.ms1": (4, C, 8, 8), "pixel_decoder.ms2": (4, C, 16, 16),
    }
    layers = len(model.model.transformer_module.decoder.layers)
    assert layers >= 3
    side = {0: 4, 1: 8, 2: 16}
    for i in range(layers):
        expected[f"attention.layer{i}"] = (4, Q, side[i % 3] ** 2)
    assert {n: tuple(t.shape) for n, t in cap.items()} == expected
    static = tap_meta(model)
    for n in expected:
        assert isinstance(meta[n], TapMeta)
        assert meta[n].stride == static[n].stride and meta[n].lattice == static[n].lattice
        if n.startswith("attention"):
            i = int(n[len("attention.layer"):])
            assert meta[n].level == i % 3 and meta[n].hw == (side[i % 3], side[i % 3])
            assert meta[n].stride * side[i % 3] == 128
        else:
            assert meta[n].hw is None and meta[n] == static[n]
            assert cap[n].shape[-1] * meta[n].stride == 128


def test_attention_rows_are_distributions(model, captured):
    taps, _ = captured
    for i in range(len(model.model.transformer_module.decoder.layers)):
        a = taps.captured[f"attention.layer{i}"]
        assert (a >= 0).all()
        # Mask2Former un-masks fully masked rows, so every query's row sums to 1
        assert torch.allclose(a.sum(-1), torch.ones_like(a.sum(-1)), atol=1e-5)


def test_captured_tensors_are_the_models_tensors(model, batch, captured):
    taps, out = captured
    with torch.no_grad():
        plm = model.model.pixel_level_module
        feats = plm.encoder(batch).feature_maps
        dec = plm.decoder(feats)
    for i in range(4):
        assert torch.allclose(taps.captured[f"backbone.res{i + 2}"], feats[i], atol=1e-5)
    assert torch.allclose(taps.captured["pixel_decoder.mask_features"], dec.mask_features, atol=1e-5)
    for i in range(3):
        assert torch.allclose(taps.captured[f"pixel_decoder.ms{i}"], dec.multi_scale_features[i], atol=1e-5)


def _reference_attention(mha: nn.MultiheadAttention, kw: dict) -> torch.Tensor:
    "Per-head attention weights [B, heads, Q, S] computed by hand from the call's inputs."
    q, k = kw["query"], kw["key"]                                # [Q, B, E], [S, B, E]
    E, h = mha.embed_dim, mha.num_heads
    d = E // h
    Wq, Wk = mha.in_proj_weight[:E], mha.in_proj_weight[E:2 * E]
    bq, bk = mha.in_proj_bias[:E], mha.in_proj_bias[E:2 * E]
    Qn, B, S = q.shape[0], q.shape[1], k.shape[0]
    qh = (q @ Wq.T + bq).reshape(Qn, B, h, d).permute(1, 2, 0, 3)
    kh = (k @ Wk.T + bk).reshape(S, B, h, d).permute(1, 2, 0, 3)
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(d)            # [B, h, Q, S]
    mask = kw.get("attn_mask")
    if mask is not None:
        scores = scores.masked_fill(mask.reshape(B, h, Qn, S), float("-inf"))
    return scores.softmax(-1)


def test_attention_equals_hand_computed_softmax(model, batch):
    layer = 1
    mha = model.model.transformer_module.decoder.layers[layer].cross_attn
    seen = {}

    def grab(mod, args, kwargs):
        assert args == ()  # Hugging Face calls the cross-attention with keywords only
        seen.update(kwargs)

    h = mha.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            with Taps(model, stage_taps(model, "attention", select=f"attention.layer{layer}")) as avg:
                model(pixel_values=batch)
            ref = _reference_attention(mha, seen)
            with Taps(model, stage_taps(model, "attention", select=f"attention.layer{layer}"), per_head=True) as per:
                model(pixel_values=batch)
    finally:
        h.remove()
    assert seen["attn_mask"] is not None and seen["attn_mask"].any()  # a real masked attention
    heads = model.config.num_attention_heads
    p = per.check().captured[f"attention.layer{layer}"]
    assert p.shape == (4, heads, model.config.num_queries, 64)
    assert torch.allclose(p, ref, atol=1e-5)
    assert torch.allclose(avg.check().captured[f"attention.layer{layer}"], ref.mean(1), atol=1e-5)


def test_taps_do_not_change_the_output(model, batch, captured):
    _, with_taps = captured
    with torch.no_grad():
        plain = model(pixel_values=batch)
        with Taps(model, stage_taps(model), per_head=True):
            per_head = model(pixel_values=batch)
    assert torch.allclose(plain.masks_queries_logits, with_taps.masks_queries_logits, atol=1e-5)
    assert torch.allclose(plain.masks_queries_logits, per_head.masks_queries_logits, atol=1e-5)


def test_non_square_grid_order(model):
    x = torch.randn(2, 1, 64, 128)
    with Taps(model, stage_taps(model, ("pixel_decoder", "attention"))) as taps:
        model(pixel_values=x)
    cap, meta = taps.check().captured, taps.meta
    assert cap["pixel_decoder.ms0"].shape[-2:] == (2, 4) and cap["pixel_decoder.mask_features"].shape[-2:] == (16, 32)
    assert meta["attention.layer0"].hw == (2, 4) and cap["attention.layer0"].shape[-1] == 8
    assert meta["attention.layer2"].hw == (8, 16) and cap["attention.layer2"].shape[-1] == 128


def test_hooks_removed_after_context_and_exception(model, batch):
    before = hook_count(model)
    taps = Taps(model, stage_taps(model), per_head=True)
    with taps:
        assert hook_count(model) > before
        model(pixel_values=batch[:2])
    assert hook_count(model) == before
    with pytest.raises(ZeroDivisionError):
        with Taps(model, stage_taps(model)):
            assert hook_count(model) > before
            1 / 0
    assert hook_count(model) == before
    # a failing forward inside the block (wrong channel count) also leaves no hook behind
    with pytest.raises(ValueError):
        with Taps(model, stage_taps(model)):
            model(pixel_values=torch.randn(2, 3, 64, 64))
    assert hook_count(model) == before
    # captured tensors survive the block; a second entry starts empty
    assert "backbone.res2" in taps.captured
    with taps:
        assert taps.captured == {}
        with pytest.raises(RuntimeError, match="already attached"):
            taps.attach()
    assert hook_count(model) == before


def test_gradients_flow_from_captured_tensors(batch):
    torch.manual_seed(0)
    m = build_model("tiny")
    stem = m.model.pixel_level_module.encoder.embedder.embedder.convolution.weight
    for name in ["backbone.res5", "pixel_decoder.ms1", "attention.layer1"]:
        m.zero_grad()
        with Taps(m, stage_taps(m, select=name)) as taps:
            m(pixel_values=batch)
        t = taps.check().captured[name]
        assert t.requires_grad and t.grad_fn is not None
        t.pow(2).sum().backward()
        assert stem.grad is not None and stem.grad.abs().sum() > 0, name


def test_detach_option(model, batch):
    with Taps(model, stage_taps(model, select=["backbone.res3", "attention.layer0"]), detach=True) as taps:
        model(pixel_values=batch)
    assert taps.check().captured and all(not t.requires_grad for t in taps.captured.values())


def test_glob_paths_and_generic_outputs(model, batch):
    with Taps(model, ["model.transformer_module.decoder.layers.*.cross_attn", "model.pixel_level_module.decoder.layer_?"]) as taps:
        model(pixel_values=batch)
    layers = len(model.model.transformer_module.decoder.layers)
    names = [f"model.transformer_module.decoder.layers.{i}.cross_attn" for i in range(layers)]
    assert set(taps.check().captured) == set(names) | {"model.pixel_level_module.decoder.layer_1"}
    # a string tap keeps the module's (first) output: for an MHA, its attended values [Q, B, E]
    assert taps.captured[names[0]].shape == (model.config.num_queries, 4, model.config.hidden_dim)
    assert taps.captured["model.pixel_level_module.decoder.layer_1"].shape == (4, 64, 32, 32)


def test_bad_path_names_close_matches(model):
    with pytest.raises(ValueError, match=r"model\.pixel_level_module\.decoder") as e:
        Taps(model, ["model.pixel_level_module.decodr"])
    assert "decodr" in str(e.value)
    with pytest.raises(ValueError, match="closest"):
        resolve_paths(model, "model.transformer_module.decoder.layers.0.crossattn")
    with pytest.raises(ValueError, match="exactly one"):
        Taps(model, [TapSpec("all", "model.transformer_module.decoder.layers.*.cross_attn")])
    with pytest.raises(ValueError, match="nn.MultiheadAttention"):
        Taps(model, [TapSpec("x", "model.pixel_level_module.decoder", attention=True)])
    with pytest.raises(ValueError, match="attention.layer1"):
        stage_taps(model, select="attention.layer_1")
    with pytest.raises(ValueError, match="hybrid"):
        stage_taps(model, "pixel-decoder")
    with pytest.raises(ValueError, match="duplicate"):
        Taps(model, stage_taps(model, "backbone") * 2)
    with pytest.raises(ValueError, match="matches no tap"):  # the default stages leave the output out
        stage_taps(model, select="output.classes")


def test_check_names_tap_that_did_not_fire(model, batch):
    specs = stage_taps(model, "backbone", select="backbone.res2") + ["criterion"]  # the loss only runs with labels
    with Taps(model, specs) as taps:
        model(pixel_values=batch[:2])
    with pytest.raises(RuntimeError, match="criterion") as e:
        taps.check()
    assert "backbone.res2" not in str(e.value)


def test_split_views(model, batch, captured):
    taps, _ = captured
    v1, v2 = split_views(taps)
    assert set(v1) == set(v2) == set(taps.captured)
    for n, t in taps.captured.items():
        assert torch.equal(torch.cat([v1[n], v2[n]]), t) and v1[n].shape[0] == 2
        assert v1[n].data_ptr() == t.data_ptr()  # a view, not a copy
    # the second half is what view 2 alone gives (eval mode: no batch statistics)
    with torch.no_grad():
        single = model.model.pixel_level_module.encoder(batch[2:]).feature_maps[0]
    assert torch.allclose(v2["backbone.res2"], single, atol=1e-5)
    with pytest.raises(ValueError, match="odd"):
        split_views({"x": torch.zeros(3, 2)})


def test_stage_selection_and_hybrid(model):
    assert STAGES == ("backbone", "pixel_decoder", "attention", "output")
    assert HYBRID == STAGES[:3] == ("backbone", "pixel_decoder", "attention")
    names = [s.name for s in stage_taps(model, "hybrid")]
    assert names == [s.name for s in stage_taps(model)] == [s.name for s in stage_taps(model, HYBRID)]
    assert list(dict.fromkeys(n.split(".")[0] for n in names)) == list(HYBRID)   # default: the internal stages
    assert [s.name for s in stage_taps(model, ["hybrid", "output"])] == names + ["output.classes"]
    assert [s.name for s in stage_taps(model, STAGES)] == names + ["output.classes"]
    assert [s.name for s in stage_taps(model, "pixel_decoder", select="*.ms?")] == [f"pixel_decoder.ms{i}" for i in range(3)]
    assert [s.name for s in stage_taps(model, "backbone")] == [f"backbone.res{i}" for i in range(2, 6)]


def test_tap_meta(model):
    meta = tap_meta(model)
    assert tap_meta(model) is meta                              # cached per model
    layers = len(model.model.transformer_module.decoder.layers)
    assert set(meta) == ({f"backbone.res{i}" for i in range(2, 6)} | {"pixel_decoder.mask_features"}
                         | {f"pixel_decoder.ms{i}" for i in range(3)} | {f"attention.layer{i}" for i in range(layers)}
                         | {"output.classes"})
    assert all(isinstance(m, TapMeta) for m in meta.values())
    assert [meta[f"backbone.res{i}"].stride for i in range(2, 6)] == [4, 8, 16, 32]
    assert [meta[f"pixel_decoder.ms{i}"].stride for i in range(3)] == [32, 16, 8]
    assert meta["pixel_decoder.mask_features"].stride == 4 and meta["output.classes"].stride == 4
    assert [meta[f"attention.layer{i}"].stride for i in range(layers)] == [(32, 16, 8)[i % 3] for i in range(layers)]
    # an HF ResNet backbone is declared a corner lattice; the pixel decoder inherits it at its strides
    for n in ("backbone.res2", "backbone.res5", "pixel_decoder.mask_features", "pixel_decoder.ms0", "output.classes"):
        assert meta[n].lattice == Lattice.corner(meta[n].stride), n
    for i in range(layers):
        m = meta[f"attention.layer{i}"]
        assert m.lattice == meta[f"pixel_decoder.ms{i % 3}"].lattice and m.level == i % 3
        assert m.hw is None and m.channels is None                 # the grid is only known after a forward
    assert meta["output.classes"].lattice == meta["pixel_decoder.mask_features"].lattice
    # channels from the backbone and the config
    assert [meta[f"backbone.res{i}"].channels for i in range(2, 6)] == list(model.config.backbone_config.hidden_sizes)
    assert {meta[f"pixel_decoder.ms{i}"].channels for i in range(3)} == {model.config.feature_size}
    assert meta["pixel_decoder.mask_features"].channels == model.config.mask_feature_size
    assert meta["attention.layer0"].level == 0 and meta["backbone.res2"].level is None
    assert "backbone.res1" not in meta
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta["backbone.res2"].lattice = Lattice.centred(4)
    # a known backbone type is not measured: no warning for a fresh model
    fresh = build_model("tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert tap_meta(fresh) == meta and tap_meta(fresh) is not meta


def test_tap_meta_is_a_geometry_record():
    m = TapMeta(Lattice(8, 2.0), channels=16)
    assert m.stride == 8 and m.lattice.offset == 2.0 and (m.level, m.hw) == (None, None)
    assert TapMeta(Lattice.corner(16), level=1, hw=(4, 6)).stride == 16


def test_layouts_are_the_two_families(model):
    assert set(LAYOUTS) == {"hf", "detectron2"}
    for family, lay in LAYOUTS.items():
        assert lay.family == family and set(lay.stage_modules) == set(STAGES)
    family, prefix = find_family(model)
    assert (family, prefix) == ("hf", "model")
    lay = LAYOUTS[family]
    specs = {s.name: s for s in stage_taps(model, STAGES)}
    assert specs["backbone.res2"].path == f"{prefix}.{lay.backbone}"
    assert specs["pixel_decoder.ms0"].path == f"{prefix}.{lay.pixel_decoder}"
    assert specs["attention.layer2"].path == f"{prefix}.{lay.cross_attn.format(i=2)}"
    assert specs["output.classes"].path == lay.output(prefix) == ""   # the segmentation model itself
    for stage, path in lay.stage_modules.items():
        model.get_submodule(f"{prefix}.{path}")                    # every stage module exists


def test_output_stage_is_the_class_distribution(model, batch):
    specs = stage_taps(model, "output")
    assert [s.name for s in specs] == ["output.classes"] and specs[0].meta == tap_meta(model)["output.classes"]
    with torch.no_grad():
        with Taps(model, specs) as taps:
            out = model(pixel_values=batch)
    p = taps.check().captured["output.classes"]
    K = model.config.num_labels
    assert p.shape == (4, K, 32, 32) == (4, K, *out.masks_queries_logits.shape[-2:])
    assert torch.allclose(p, class_distribution(out.class_queries_logits, out.masks_queries_logits))
    assert (p > 0).all() and torch.allclose(p.sum(1), torch.ones(4, 32, 32), atol=1e-5)
    assert p.shape[-1] * taps.meta["output.classes"].stride == 128
    # with the other stages: one forward, all taps
    with torch.no_grad():
        with Taps(model, stage_taps(model, STAGES)) as taps:
            model(pixel_values=batch)
    assert torch.allclose(taps.check().captured["output.classes"], p, atol=1e-5)


def test_output_stage_needs_the_segmentation_model(model):
    bare = model.model                                              # Mask2FormerModel: no class predictor
    assert find_family(bare) == ("hf", "")
    assert [s.name for s in stage_taps(bare)][-1].startswith("attention.")   # the internal stages still work
    with pytest.raises(ValueError, match="class logits") as e:
        stage_taps(bare, "output")
    assert "Mask2FormerForUniversalSegmentation" in str(e.value) and "Mask2FormerModel" in str(e.value)
    with pytest.raises(ValueError, match="class logits"):
        stage_taps(bare, STAGES)


def test_wrapped_models_and_unknown_family(model, batch):
    class Wrapper(nn.Module):  # e.g. a LightningModule holding the model
        def __init__(self, m):
            super().__init__()
            self.model = m

    w = Wrapper(model)
    assert find_family(w) == ("hf", "model.model")
    specs = stage_taps(w, select="attention.layer0")
    assert specs[0].path == "model.model.transformer_module.decoder.layers.0.cross_attn"
    out_spec = stage_taps(w, "output")
    assert [(s.name, s.path) for s in out_spec] == [("output.classes", "model")]
    with Taps(w, specs + out_spec) as taps:
        w.model(pixel_values=batch)
    assert taps.check().meta["attention.layer0"].hw == (4, 4)
    assert taps.captured["output.classes"].shape == (4, model.config.num_labels, 32, 32)
    assert tap_meta(w)["backbone.res4"] == tap_meta(model)["backbone.res4"]
    with pytest.raises(ValueError, match="unknown model family"):
        stage_taps(nn.Sequential(nn.Conv2d(1, 1, 1)))

    class Two(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.a, self.b = Wrapper(m), Wrapper(build_model("tiny"))  # e.g. teacher and student
    with pytest.raises(ValueError, match="holds 2"):
        find_family(Two(model))


# ---------------------------------------------------------------------------------------------
# detectron2 family: the stand-in of d2_stand_in.py (the official module paths and calling conventions)
# with its patch-stem backbone, whose lattice is measured
# ---------------------------------------------------------------------------------------------
MEASURED = r"PatchStemNet .*no known lattice; measured"


def stand_in(keywords=False, wrap=None):
    """A fresh stand-in (wrapped by `wrap`) whose tap geometry has been worked out, expecting the UserWarning
    of its measured lattice (later taps of the same model use the cached geometry and do not warn)."""
    m = MaskFormer(PatchStemNet(), keywords)
    m = wrap(m) if wrap is not None else m
    with pytest.warns(UserWarning, match=MEASURED):
        tap_meta(m)
    return m


def test_detectron2_stand_in_lattice_is_measured():
    torch.manual_seed(0)
    d2 = MaskFormer(PatchStemNet())
    with pytest.warns(UserWarning, match=MEASURED) as rec:
        meta = tap_meta(d2)
    msg = str(rec[0].message)
    assert all(f"backbone.res{i} offset 2 px" in msg for i in range(2, 6)), msg
    # a patch stem puts cell j at 4j + 2; stride-2 convs keep the offset: 2 px at every level
    for i in range(2, 6):
        lat = meta[f"backbone.res{i}"].lattice
        assert lat == Lattice(2 ** i, 2.0), (i, lat)
        if i > 2:   # neither convention: corner would be 0.5 px, centred stride/2
            assert lat != Lattice.corner(2 ** i) and lat != Lattice.centred(2 ** i) and not lat.is_centred
    # the pixel decoder inherits the backbone lattice at its strides; attention its level's; output mask_features'
    assert [meta[f"pixel_decoder.ms{i}"].lattice for i in range(3)] == [Lattice(32, 2.0), Lattice(16, 2.0), Lattice(8, 2.0)]
    assert meta["pixel_decoder.mask_features"].lattice == meta["output.classes"].lattice == Lattice(4, 2.0)
    for i in range(4):
        assert meta[f"attention.layer{i}"].lattice == meta[f"pixel_decoder.ms{i % 3}"].lattice
        assert meta[f"attention.layer{i}"].level == i % 3
    # channels from output_shape() and the pixel decoder's mask_features conv
    assert [meta[f"backbone.res{i}"].channels for i in range(2, 6)] == list(PatchStemNet.WIDTHS)
    assert meta["pixel_decoder.mask_features"].channels == meta["pixel_decoder.ms0"].channels == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")                            # cached: no second measurement, no warning
        assert tap_meta(d2) is meta
        specs = stage_taps(d2, STAGES)
    assert {s.name: s.meta for s in specs} == {n: meta[n] for n in (s.name for s in specs)}


@pytest.mark.parametrize("keywords", [False, True])
def test_detectron2_family(keywords):
    torch.manual_seed(0)
    d2 = stand_in(keywords).eval()
    assert find_family(d2) == ("detectron2", "")
    x = torch.randn(4, 1, 64, 96)
    specs = stage_taps(d2)
    assert [s.path for s in specs if s.name.startswith("pixel_decoder")] == ["sem_seg_head.predictor"] * 4
    out_specs = stage_taps(d2, "output")
    assert [(s.name, s.path) for s in out_specs] == [("output.classes", "sem_seg_head.predictor")]
    assert out_specs[0].path == LAYOUTS["detectron2"].output("")
    with Taps(d2, specs + out_specs) as taps:
        pred = d2(x)
    cap, meta = taps.check().captured, taps.meta
    with torch.no_grad():
        feats = d2.backbone(x)
        mf, _, ms = d2.sem_seg_head.pixel_decoder.forward_features(feats)
    for k in ["res2", "res3", "res4", "res5"]:
        assert torch.allclose(cap[f"backbone.{k}"], feats[k])
    assert torch.allclose(cap["pixel_decoder.mask_features"], mf)
    for i in range(3):
        assert torch.allclose(cap[f"pixel_decoder.ms{i}"], ms[i])
    assert [meta[f"pixel_decoder.ms{i}"].stride for i in range(3)] == [32, 16, 8]
    assert meta["backbone.res3"].stride == 8 and meta["pixel_decoder.mask_features"].stride == 4
    grids = {0: (2, 3), 1: (4, 6), 2: (8, 12)}
    for i in range(4):
        a = cap[f"attention.layer{i}"]
        h, w = grids[i % 3]
        assert meta[f"attention.layer{i}"].hw == (h, w) and a.shape == (4, 6, h * w)
        assert torch.allclose(a.sum(-1), torch.ones(4, 6), atol=1e-5)
    assert tap_meta(d2)["attention.layer3"].stride == 32 and meta["attention.layer3"].level == 0
    # the output tap: the predictor's class distribution per pixel, on the mask_features grid
    p = cap["output.classes"]
    assert pred["pred_logits"].shape == (4, 6, 4) and p.shape == (4, 3, 16, 24)
    assert torch.allclose(p, class_distribution(pred["pred_logits"], pred["pred_masks"]))
    assert torch.allclose(p.sum(1), torch.ones(4, 16, 24), atol=1e-5)
    assert meta["output.classes"].lattice == meta["pixel_decoder.mask_features"].lattice


def test_detectron2_keyword_only_attention_per_head_and_grad():
    torch.manual_seed(0)
    d2 = stand_in()
    mha = d2.sem_seg_head.predictor.transformer_cross_attention_layers[1].multihead_attn
    seen = {}

    def grab(mod, args, kwargs):
        seen["args"], seen["kw"] = args, dict(kwargs)

    h = mha.register_forward_pre_hook(grab, with_kwargs=True)
    x = torch.randn(2, 1, 64, 64)
    try:
        with Taps(d2, stage_taps(d2, "attention"), per_head=True) as taps:
            d2(x)
    finally:
        h.remove()
    assert seen["args"] == ()                                  # keyword-only call
    a = taps.check().captured["attention.layer1"]
    assert a.shape == (2, 4, 6, 4 * 4)                         # [B, heads, Q, h*w], level 1 = stride 16
    with torch.no_grad():
        ref = _reference_attention(mha, seen["kw"])
    assert torch.allclose(a, ref, atol=1e-5)
    a.sum().backward()                                         # the weights the layer discarded carry grad
    assert d2.backbone.stem[0].weight.grad.abs().sum() > 0
    assert hook_count(d2) == 0


def test_detectron2_pixel_decoder_hook_never_fires():
    d2 = MaskFormer(PatchStemNet())
    with Taps(d2, ["sem_seg_head.pixel_decoder"]) as taps:
        d2(torch.randn(2, 1, 64, 64))
    with pytest.raises(RuntimeError, match="sem_seg_head.pixel_decoder"):
        taps.check()


def test_detectron2_wrapped_in_ddp_like_container():
    class DDPLike(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m
    w = stand_in(wrap=DDPLike)
    assert find_family(w) == ("detectron2", "module")
    specs = stage_taps(w, select=["backbone.res5", "attention.layer0"])
    assert [s.path for s in specs] == ["module.backbone",
                                       "module.sem_seg_head.predictor.transformer_cross_attention_layers.0.multihead_attn"]
    with Taps(w, specs) as taps:
        w.module(torch.randn(2, 1, 64, 64))
    assert taps.check().meta["attention.layer0"].hw == (2, 2)
    assert stage_taps(w, "output")[0].path == "module.sem_seg_head.predictor"

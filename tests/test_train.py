"""Training: configs round-trip and validate; short runs train, are reproducible, and resume exactly."""
import os
import socket

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mars_nb.config import (RUN_PARAMS, AnglePolicy, ConfigError, DataConfig, EvalConfig, ModelConfig, RunConfig,
                            TrainConfig, config_from_params)
from mars_nb.pairs import StepSampler, ViewPairData, ViewPairs, collate_pairs, dataset_for
from mars_nb.files import FolderLock, RunLocked
from mars_nb.runfolder import load_trained, read_log
from mars_nb.train import NonFiniteLoss, check_finite, fit
from mars_nb.views import IGNORE


def test_config_yaml_round_trip(tmp_path):
    cfg = RunConfig(name="x", data=DataConfig(dataset="nuclei", crop=96, batch_size=3),
                    model=ModelConfig(preset="tiny", overrides={"num_queries": 8}),
                    train=TrainConfig(mode="rotaug", steps=7, lr=3e-4, angles=AnglePolicy("range", [0.0, 45.0]), seed=5),
                    mars={"preset": "hybrid", "margin": 1})
    cfg.to_yaml(tmp_path / "c.yaml")
    back = RunConfig.from_yaml(tmp_path / "c.yaml")
    assert back == cfg and back.train.angles.kind == "range" and back.model.overrides == {"num_queries": 8}


@pytest.mark.parametrize("bad, needle", [
    ({"train": {"stepz": 1}}, "unknown key(s) ['stepz']"),
    ({"train": {"steps": "10"}}, "RunConfig.train.steps: expected an integer"),
    ({"train": {"lr": True}}, "expected a number"),
    ({"train": {"mode": "magic"}}, "mode 'magic' is not one of"),
    ({"train": {"angles": {"kind": "discrete", "values": []}}}, "no angles"),
    ({"train": {"angles": {"kind": "range", "values": [30, 10]}}}, "lo < hi"),
    ({"train": {"angles": {"kind": "discrete", "values": [400]}}}, "[-360, 360]"),
    ({"data": []}, "expected a mapping for DataConfig"),
])
def test_bad_configs_name_the_problem(bad, needle):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(bad)
    assert needle in str(e.value)


def test_corrupt_yaml_is_a_config_error(tmp_path):
    (tmp_path / "c.yaml").write_text("train: {steps: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RunConfig.from_yaml(tmp_path / "c.yaml")


def test_angle_policy_check():
    assert AnglePolicy().check(90.0) == 90.0
    with pytest.raises(ConfigError, match="outside the policy"):
        AnglePolicy().check(45.0)
    with pytest.raises(ConfigError, match="outside the policy"):
        AnglePolicy("range", [0, 30]).check(30.0)


def test_angle_policy_covers_orientations_modulo_360():
    ahead = AnglePolicy("range", [-45.0, 45.0])
    assert [ahead.covers(a) for a in (0, 30, 44.9, 45, 90, 180, 314.9, 315, 330, 360, -30)] == \
           [True, True, True, False, False, False, False, True, True, True, True]
    assert AnglePolicy("range", [0.0, 360.0]).covers(359.9) and AnglePolicy("range", [-360.0, 360.0]).covers(123)
    quarter = AnglePolicy()                                     # discrete 90, 180, 270
    assert [quarter.covers(a) for a in (0, 90, -90, 450, 45)] == [False, True, True, True, False]
    assert ahead.meets(AnglePolicy("range", [30.0, 100.0])) and AnglePolicy("range", [30.0, 100.0]).meets(ahead)
    assert ahead.meets(AnglePolicy("range", [300.0, 320.0])) and not ahead.meets(AnglePolicy("range", [45.0, 315.0]))
    assert not ahead.meets(quarter) and quarter.meets(AnglePolicy("range", [80.0, 100.0]))
    assert not quarter.meets(AnglePolicy("discrete", [0.0, 45.0])) and quarter.meets(AnglePolicy("discrete", [-90.0]))


def test_params_map_onto_the_config():
    c = config_from_params(dataset="nuclei", mode="none", steps=9, train_angles={"kind": "range", "values": [0, 360]},
                           eval_angles=[0, 90], overrides={"num_queries": 4})
    assert (c.data.dataset, c.train.mode, c.train.steps) == ("nuclei", "none", 9)
    assert c.train.angles.kind == "range" and c.eval.angles == [0.0, 90.0] and c.model.overrides == {"num_queries": 4}
    with pytest.raises(ConfigError, match="unknown run parameter"):
        config_from_params(epochs=3)


def test_stream_items_are_pure_functions_of_seed_and_index():
    from mars_nb.data import load_dataset
    ds = load_dataset("nuclei")
    a = ViewPairs(ds, 64, 2, AnglePolicy(), seed=1)
    b = ViewPairs(ds, 64, 2, AnglePolicy(), seed=1)
    x, y = a[5], b[5]
    assert x["angle2"] == y["angle2"] == a[4]["angle2"]          # one angle per batch of 2
    assert x["angle1"] == a[4]["angle1"] == 0.0                  # no view-1 policy: view 1 upright
    assert a.angles(2) == (x["angle1"], x["angle2"])             # item 5 is in global batch 5 // 2
    assert isinstance(x["angle1"], float) and isinstance(x["angle2"], float)
    assert torch.equal(x["image2"], y["image2"]) and not torch.equal(a[5]["image1"], a[6]["image1"])
    # a 90/180/270 view is the exact rotation of the upright one
    k = int(x["angle2"] // 90)
    assert torch.equal(x["label2"], torch.rot90(x["label1"], k, dims=(-2, -1)))
    # DDP ranks take disjoint global batches and together cover all of them
    ranks = [list(StepSampler(0, 3, 2, rank=r, world=2)) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1]) and sorted(ranks[0] + ranks[1]) == list(range(12))


def _cfg(steps, **kw):
    return RunConfig(name="t", data=DataConfig(dataset="craters", crop=64, batch_size=2),
                     train=TrainConfig(mode="rotaug", steps=steps, ckpt_every=2, log_every=1, seed=3, **kw))


def test_two_step_training_run(tmp_path):
    fit(_cfg(2), tmp_path, progress=False)
    log = read_log(tmp_path)
    assert list(log["step"]) == [0, 1] and np.isfinite(log["train/loss"]).all()
    assert RunConfig.from_yaml(tmp_path / "config.yaml") == _cfg(2)
    assert (tmp_path / "checkpoints" / "last.ckpt").exists() and (tmp_path / "model.safetensors").exists()


def test_fit_sweeps_a_killed_writers_halves_and_leaves_a_live_writers(tmp_path):
    "The grid runner's clock is written into the run folder while `fit` starts: sweeping it failed the run."
    import subprocess, sys
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    killed = tmp_path / "checkpoints" / f".last.ckpt.{host}-{ended.stdout.strip()}.tmp"
    live = tmp_path / f"..seconds.{host}-{os.getpid()}.tmp"
    for f in (killed, live): f.parent.mkdir(exist_ok=True); f.write_text("half")
    fit(_cfg(2), tmp_path, progress=False)
    assert not killed.exists() and live.read_text() == "half"


def test_a_run_on_the_rgb_trees_with_ignored_crowns(tmp_path):
    "Three input channels and IGNORE pixels (crowns straddling a band cut) through a MARS run."
    cfg = RunConfig.from_dict({"data": {"dataset": "trees", "crop": 64, "batch_size": 2}, "mars": {"preset": "hybrid"},
                               "train": {"mode": "mars", "steps": 2, "log_every": 1, "ckpt_every": 2}})
    module = fit(cfg, tmp_path, progress=False)
    assert module.model.config.backbone_config.num_channels == 3
    log = read_log(tmp_path)
    assert list(log["step"]) == [0, 1] and np.isfinite(log["train/loss"].astype(float)).all()


def _weights(d):
    return load_file(str(d / "model.safetensors"))


def test_channels_last_trains_the_same_model_up_to_rounding(tmp_path):
    "The fast memory layout changes how convolutions add up, not what they compute."
    fit(_cfg(3), tmp_path / "a", progress=False)
    fast = RunConfig.from_dict({**_cfg(3).to_dict(), "train": {**_cfg(3).train.to_dict(), "channels_last": True}})
    fit(fast, tmp_path / "b", progress=False)
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys()
    norm = lambda ws: sum(float((w.float() ** 2).sum()) for k, w in ws.items() if w.is_floating_point()) ** 0.5
    moved = norm({k: wa[k] - wb[k] for k in wa}) / norm(wa)
    assert 0 < moved < 1e-4, moved          # not the same bits (Adam magnifies rounding in tiny gradients), the same model
    la, lb = (read_log(tmp_path / d)["train/loss"].astype(float).to_numpy() for d in "ab")
    assert np.allclose(la, lb, rtol=1e-4)


def test_same_seed_same_numbers_and_exact_resume(tmp_path):
    fit(_cfg(4), tmp_path / "a", progress=False)
    fit(_cfg(4), tmp_path / "b", progress=False)
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "same seed gave different weights"
    # interrupted after 2 of 4 steps (a checkpoint at step 2), then started again
    fit(_cfg(4), tmp_path / "c", progress=False, max_steps=2)
    assert not torch.equal(_weights(tmp_path / "c")["class_predictor.weight"], wa["class_predictor.weight"])
    fit(_cfg(4), tmp_path / "c", progress=False)
    wc = _weights(tmp_path / "c")
    assert all(torch.allclose(wa[k], wc[k], atol=1e-6) for k in wa), "resumed run ended elsewhere"
    assert list(read_log(tmp_path / "c")["step"]) == [0, 1, 2, 3]


def test_cuda_without_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    from mars_nb.train import resolve_device
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto") == ("cpu", "32-true")


def test_a_batch_outside_the_angle_policy_is_refused():
    from mars_nb.train import MarsModule
    cfg = RunConfig(train=TrainConfig(mode="rotaug", angles=AnglePolicy("discrete", [90.0])))
    module = MarsModule(cfg.to_dict(), num_labels=2, num_channels=1)
    x, y = torch.zeros(1, 1, 64, 64), torch.zeros(1, 64, 64, dtype=torch.long)
    batch = {"image1": x, "label1": y, "image2": x, "label2": y, "angle1": 0.0, "angle2": 45.0}
    with pytest.raises(ConfigError, match="angle 45.0 is outside the policy discrete"):
        module.training_step(batch, 0)
    # without view1_angles, view 1 is upright: a turned view 1 is refused as well
    with pytest.raises(ValueError, match=r"view 1 is upright in this run \(no view1_angles\), got angle1=90.0"):
        module.training_step({**batch, "angle1": 90.0, "angle2": 90.0}, 0)


def test_mars_with_both_views_turned_compares_them_through_their_relative_rotation():
    """`view1_angles` with MARS (a 'mars-any' run): view 1 at 90°, view 2 at 180° of the same crop are a quarter turn
    apart. On a D4-symmetrized model (as equivariant as its lattice allows) the backbone term is near 0 when the batch
    says so, and large when the same images claim an upright view 1 (the half turn a wrong alignment would use)."""
    from test_lattice import smooth_images
    from mars_nb.taps import d4_symmetrized
    from mars_nb.train import MarsModule
    from mars_nb.views import rotate
    anyway = AnglePolicy("range", [0.0, 360.0])
    cfg = RunConfig(train=TrainConfig(mode="mars", angles=anyway, view1_angles=anyway),
                    mars={"preset": "backbone"})
    torch.manual_seed(0)
    module = MarsModule(cfg.to_dict(), num_labels=2, num_channels=1)
    module.model = d4_symmetrized(module.model)
    x = smooth_images(2, 128)
    y = torch.zeros(2, 128, 128, dtype=torch.long)

    def backbone_term(a1: float, a2: float) -> float:
        batch = {"image1": rotate(x, 90.0), "label1": y, "image2": rotate(x, 180.0), "label2": y, "angle1": a1, "angle2": a2}
        images, _ = module._views(batch)
        with torch.no_grad(), module.mars.taps(module.model) as taps:
            out = module.model(pixel_values=images)
            return module._mars_terms(taps, out, batch, tuple(images.shape[-2:]))["mars/backbone"].item()

    right, upright_claimed = backbone_term(90.0, 180.0), backbone_term(0.0, 180.0)
    assert right < 0.005 and upright_claimed > 10 * right, (right, upright_claimed)   # measured 0.00076 and 0.019
    assert backbone_term(270.0, 0.0) == pytest.approx(right, abs=1e-6)      # 90° apart too: only the difference counts


@pytest.mark.parametrize("mode", ["none", "mars"])
def test_a_training_batch_not_a_multiple_of_32_is_refused(mode):
    "Inference pads; training crops must be multiples of 32 (DataConfig checks the crop, the module a hand-made loader)."
    from mars_nb.train import MarsModule
    module = MarsModule(RunConfig(train=TrainConfig(mode=mode), mars={"preset": "pixel"}).to_dict(), num_labels=2, num_channels=1)
    x, y = torch.zeros(2, 1, 100, 64), torch.zeros(2, 100, 64, dtype=torch.long)
    batch = {"image1": x, "label1": y, "image2": x, "label2": y, "angle1": 0.0, "angle2": 90.0}
    with pytest.raises(ValueError, match=r"training images are 100x64; both sides must be multiples of 32: crop them "
                                         r"\(e.g. to 96x64\)"):
        module.training_step(batch, 0)


DDP_SCRIPT = """
import sys
from mars_nb.config import RunConfig, DataConfig, TrainConfig
from mars_nb.train import fit
cfg = RunConfig(data=DataConfig(dataset="craters", crop=64, batch_size=2),
                train=TrainConfig(mode="rotaug", steps=3, devices=2, log_every=1, ckpt_every=3, device="cpu"))
fit(cfg, sys.argv[1], progress=False)
"""


def test_two_process_ddp_on_cpu(tmp_path):
    "Lightning's DDP with gloo on CPU: the multi-GPU / multi-node path, proven in two processes."
    import subprocess, sys
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stderr + proc.stdout
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in said and "GLOBAL_RANK: 1, MEMBER: 2/2" in said   # two ranks joined
    assert (tmp_path / "run" / "model.safetensors").exists()
    assert list(read_log(tmp_path / "run")["step"]) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# bad inputs: each a ConfigError that names the value and what would be valid


@pytest.mark.parametrize("bad, words", [
    ({"data": {"crop": 100}}, ["crop 100", "multiple of 32", "96 or 128"]),
    ({"data": {"crop": 0}}, ["crop 0", "multiple of 32"]),
    ({"data": {"batch_size": 0}}, ["batch_size must be >= 1, got 0"]),
    ({"data": {"labelled": 0}}, ["labelled=0", "must be a fraction in (0, 1]"]),
    ({"data": {"labelled": 1.5}}, ["labelled=1.5", "must be a fraction in (0, 1]"]),
    ({"data": {"dataset": "nuclei", "unlabelled": True}, "train": {"mode": "mars"}},
     ["every train pixel labelled 'nuclei' has no unlabelled crops", "labelled < 1", "['craters']"]),
    ({"data": {"dataset": "moon"}}, ["'moon'", "['craters', 'nuclei', 'trees', 'folder']"]),
    ({"data": {"dataset": "folder"}}, ["'folder' needs root="]),
    ({"data": {"dataset": "nuclei", "root": "data"}}, ["root='data'", "only read for dataset 'folder'"]),
    ({"model": {"preset": "r101"}}, ["'r101'", "['tiny', 'r50', 'lite0', 'lite0-scratch', 'pretrained']"]),
    ({"model": {"preset": "pretrained"}}, ["'pretrained' needs pretrained="]),
    ({"model": {"overrides": {"num_querys": 8}}}, ["num_querys", "num_queries"]),
    ({"model": {"overrides": {"num_queries": "8"}}}, ["num_queries must be int like the preset's 16, got '8'"]),
    ({"model": {"overrides": {"num_queries": 8.0}}}, ["num_queries must be int like the preset's 16, got 8.0"]),
    ({"train": {"steps": 0}}, ["steps must be >= 1, got 0"]),
    ({"train": {"steps": -5}}, ["steps must be >= 1, got -5"]),
    ({"train": {"lr": float("nan")}}, ["lr must be a finite number > 0, got nan"]),
    ({"train": {"lr": float("inf")}}, ["lr must be a finite number > 0, got inf"]),
    ({"train": {"lr": -1e-3}}, ["lr must be a finite number > 0, got -0.001"]),
    ({"train": {"weight_decay": -0.1}}, ["weight_decay must be a finite number >= 0, got -0.1"]),
    ({"train": {"warmup": -1}}, ["warmup must be >= 0 steps, got -1"]),
    ({"train": {"seed": -1}}, ["seed must be >= 0, got -1"]),
    ({"train": {"seed": 1.5}}, ["RunConfig.train.seed: expected an integer, got 1.5"]),
    ({"train": {"device": "gpu"}}, ["'gpu'", "'auto', 'cpu' or 'cuda'"]),
    ({"train": {"angles": {"kind": "discrete", "values": ["ninety"]}}}, ["values[0]: expected a number, got 'ninety'"]),
    ({"train": {"angles": {"kind": "discrete", "values": [float("nan")]}}}, ["[nan]", "[-360, 360]"]),
    ({"train": {"angles": {"kind": "range", "values": [0, 90, 180]}}}, ["values=[lo, hi]", "[0.0, 90.0, 180.0]"]),
    ({"train": {"angles": {"kind": "spiral", "values": [1]}}}, ["'spiral'", "'discrete' or 'range'"]),
    ({"eval": {"angles": []}}, ["eval angles must be a non-empty list", "got []"]),
    ({"eval": {"batch_size": 0}}, ["eval batch_size must be >= 1, got 0"]),
    ({"eval": {"split": "holdout"}}, ["'holdout'", "['train', 'val', 'test']"]),
    ({"mars": {"preset": "mixed"}}, ["mars:", "'mixed'", "backbone, pixel, attention, hybrid, paper"]),
    ({"mars": {"stages": {"backbone": {"weight": -1}}}}, ["mars:", "must be a finite number >= 0, got -1"]),
    ({"mars": {"stages": {"backbone": {"weight": "0.1"}}}}, ["mars:", "got '0.1'"]),
    ({"mars": {"stages": {"backbone": {"weight": float("nan")}}}}, ["mars:", "got nan"]),
    ({"mars": {"stages": {"attention": {"distance": "cosine"}}}}, ["'cosine'", "js, kl, mse"]),
    ({"mars": {"stages": {"backbone": {"distance": "l1"}}}}, ["'l1'", "cosine, mse, smooth_l1, cosine_centred, infonce, mars_pooled"]),
    ({"mars": {"stages": {"backbone": {"taps": ["res9"]}}}}, ["res9", "res2, res3, res4, res5"]),
    ({"mars": {"stages": {"decoder": {}}}}, ["'decoder'", "backbone, pixel_decoder, attention"]),
    ({"train": {"mode": "none", "view1_angles": {"kind": "range", "values": [0, 360]}}},
     ["view1_angles turns view 1", "mode 'none'", "use mode 'rotaug'"]),
    ({"train": {"share_every": -1}}, ["share_every must be >= 0 steps (0: never), got -1"]),
    ({"train": {"mode": "none", "label_angles": {"kind": "range", "values": [-45, 45]}}},
     ["label_angles withholds", "mode 'none'"]),
    ({"train": {"label_angles": {"kind": "range", "values": [90, 180]}}}, ["label_angles must cover 0°", "view 1 is upright"]),
    ({"train": {"view1_angles": {"kind": "range", "values": [90, 180]}, "angles": {"kind": "discrete", "values": [90, 180]},
                "label_angles": {"kind": "range", "values": [-45, 45]}}}, ["label_angles covers no angle", "no view would ever be supervised"]),
    ({"train": {"view1_angles": {"kind": "range", "values": [90, 0]}}}, ["RunConfig.train.view1_angles", "lo < hi", "[90.0, 0.0]"]),
    ({"data": {"dataset": "nuclei", "folds": 5}}, ["folds=5", "a dataset that has folds", "['craters']"]),
    ({"data": {"dataset": "folder", "root": "somewhere", "folds": 5}}, ["folds=5", "['craters']"]),
    ({"data": {"dataset": "craters", "folds": 2}}, ["folds=2", "folds >= 3"]),
])
def test_more_bad_configs_name_the_value_and_the_choices(bad, words):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(bad)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_bad_run_parameters_name_the_value():
    with pytest.raises(ConfigError, match=r"unknown run parameter\(s\) \['stpes'\]; valid parameters are \['name'"):
        config_from_params(stpes=3)
    with pytest.raises(ConfigError, match=r"mars: unknown MARS preset 'pixels'; valid: backbone, pixel"):
        config_from_params(mode="mars", mars="pixels")
    with pytest.raises(ConfigError, match=r"RunConfig.data.crop: expected an integer, got '64'"):
        config_from_params(crop="64")
    from mars_nb.losses import resolve_config
    assert config_from_params(mode="mars", mars="hybrid").mars == resolve_config("hybrid")   # recorded resolved


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read config file .*missing\.yaml"):
        RunConfig.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"cannot read config file .*missing\.yaml"):
        RunConfig.from_yaml(str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- train\n- eval\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: a config must be a mapping at the top level"):
        RunConfig.from_yaml(tmp_path / "list.yaml")
    # YAML tags that would build Python objects are refused (safe loading), nothing runs
    marker = tmp_path / "ran"
    (tmp_path / "evil.yaml").write_text(f"train: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match=r"evil\.yaml is not valid YAML"):
        RunConfig.from_yaml(tmp_path / "evil.yaml")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# failures: a non-finite loss, a checkpoint of another configuration, a second training in one folder


def test_check_finite_names_the_term_that_went_non_finite():
    t = torch.tensor
    check_finite({"supervised": t(1.0), "total": t(1.0)}, 0)
    with pytest.raises(NonFiniteLoss) as e:
        check_finite({"supervised": t(1.0), "mars/attention": t(float("inf")), "mars/backbone": t(0.1),
                      "mars/total": t(float("inf")), "total": t(float("inf"))}, 12)
    msg = str(e.value)
    assert "at step 12: mars/attention=inf (and so mars/total, total)" in msg and "last good checkpoint" in msg
    assert "supervised" not in msg and "mars/backbone" not in msg
    with pytest.raises(NonFiniteLoss, match=r"step 3: supervised=nan \(and so total\)"):
        check_finite({"supervised": t(float("nan")), "total": t(float("nan"))}, 3)


def _mars_cfg(steps):
    return RunConfig(name="m", data=DataConfig(dataset="nuclei", crop=64, batch_size=2), mars={"preset": "backbone"},
                     train=TrainConfig(mode="mars", steps=steps, ckpt_every=2, log_every=1, seed=2))


def test_non_finite_loss_names_the_term_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from mars_nb import losses
    real, calls = losses.MarsLoss.forward, []

    def poisoned(self, *a, **kw):          # the backbone term goes NaN at step 3, after the checkpoint of step 2
        out = real(self, *a, **kw)
        calls.append(1)
        if len(calls) == 4:
            nan = float("nan")
            out = {**out, "mars/backbone": out["mars/backbone"] * nan, "mars/total": out["mars/total"] * nan}
        return out

    monkeypatch.setattr(losses.MarsLoss, "forward", poisoned)
    with pytest.raises(NonFiniteLoss) as e:
        fit(_mars_cfg(6), tmp_path, progress=False)
    assert "non-finite loss at step 3: mars/backbone=nan (and so mars/total, total)" in str(e.value)
    assert "supervised" not in str(e.value)
    ck = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck["global_step"] == 2 and all(torch.isfinite(v).all() for v in ck["state_dict"].values())
    assert not (tmp_path / "model.safetensors").exists(), "an unfinished run wrote final weights"
    # once the cause is gone, the run goes on from that checkpoint, not from the start
    monkeypatch.setattr(losses.MarsLoss, "forward", real)
    n = len(calls)
    fit(_mars_cfg(6), tmp_path, progress=False)
    assert len(calls) == n and list(read_log(tmp_path)["step"]) == list(range(6))
    assert (tmp_path / "model.safetensors").exists()


def test_non_finite_weights_are_never_checkpointed():
    from mars_nb.train import MarsModule
    module = MarsModule(RunConfig(train=TrainConfig(mode="none")).to_dict(), num_labels=2, num_channels=1)
    module.on_save_checkpoint({})                                     # finite: fine
    with torch.no_grad():
        module.model.class_predictor.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteLoss, match=r"weights class_predictor.weight are not finite .*last good checkpoint is kept"):
        module.on_save_checkpoint({})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    "A finished two-step run; tests copy it before changing it."
    out = tmp_path_factory.mktemp("trained") / "run"
    fit(_cfg(2), out, progress=False)
    return out


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


class ThreeClasses:
    "The crater data claiming one more class."
    num_classes = 3

    def __init__(self):
        from mars_nb.data import load_dataset
        self.base = load_dataset("craters")

    def __getattr__(self, k):
        return getattr(self.base, k)


def test_resuming_another_configuration_names_every_difference(trained, tmp_path):
    run = _copy(trained, tmp_path / "run")
    before = (run / "config.yaml").read_text()
    other = _cfg(2, lr=3e-4)
    other.model.preset = "r50"
    with pytest.raises(ConfigError) as e:
        fit(other, run, progress=False)
    msg = str(e.value)
    assert "last.ckpt was written by another configuration" in msg and "another out_dir" in msg
    assert "model.preset: 'tiny' in the checkpoint, 'r50' now" in msg and "train.lr: 0.001 in the checkpoint, 0.0003 now" in msg
    assert (run / "config.yaml").read_text() == before, "the refused run overwrote the folder's config"
    with pytest.raises(ConfigError, match=r"dataset num_labels: 2 in the checkpoint, 3 now"):
        fit(_cfg(2), run, progress=False, ds=ThreeClasses())
    # what does not change the training may change: the name, the evaluation, the device
    same = _cfg(2)
    same.name, same.eval = "renamed", EvalConfig(angles=[0.0, 90.0])
    fit(same, run, progress=False)
    assert RunConfig.from_yaml(run / "config.yaml").name == "renamed"


def test_unreadable_or_unsafe_checkpoints_are_named_not_loaded(trained, tmp_path):
    run = _copy(trained, tmp_path / "run")
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])                       # truncated
    with pytest.raises(RuntimeError, match=r"checkpoint .*last\.ckpt cannot be read .*delete it"):
        fit(_cfg(2), run, progress=False)
    marker = tmp_path / "ran"

    class Payload:                  # unpickling this would create `marker`
        def __reduce__(self): return (open, (str(marker), "w"))
    torch.save({"hyper_parameters": {"config": _cfg(2).to_dict()}, "x": Payload()}, last)
    with pytest.raises(RuntimeError, match=r"last\.ckpt cannot be read \(UnpicklingError"):
        fit(_cfg(2), run, progress=False)
    assert not marker.exists(), "a checkpoint ran code while loading"


def test_two_trainings_in_one_folder_are_refused(tmp_path):
    import re
    held = FolderLock(tmp_path / ".fit.lock")
    assert held.acquire()
    try:
        with pytest.raises(RunLocked, match=rf"{re.escape(str(tmp_path))} is being trained by another process \(\S+ {os.getpid()}\)"):
            fit(_cfg(2), tmp_path, progress=False)
        assert not (tmp_path / "config.yaml").exists()
        assert not FolderLock(tmp_path / ".fit.lock").acquire()
    finally:
        held.release()
    other = FolderLock(tmp_path / ".fit.lock")                          # released: free again
    assert other.acquire()
    other.release()
    (tmp_path / ".fit.lock").write_text("otherhost 12345\n")          # left by a process that died: not a lock
    assert other.acquire() and other.holder() == f"{socket.gethostname()} {os.getpid()}"
    other.release()


def test_a_lock_held_by_another_process_is_refused_and_dropped_when_it_dies(tmp_path):
    """The lock is the operating system's: another process holding it refuses us, and its death frees the folder;
    `held` tells both apart without taking the lock (the grid's progress bar names the runs held now)."""
    import subprocess
    import sys
    import time
    path = tmp_path / ".fit.lock"
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; from mars_nb.files import FolderLock; "
                              f"lock = FolderLock({str(path)!r}); assert lock.acquire(); print('held', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        lock = FolderLock(path)
        assert lock.held(), "seen as held from outside, without taking it"
        assert not lock.acquire() and lock.holder() == f"{socket.gethostname()} {child.pid}"
    finally:
        child.kill(); child.wait()
    assert path.exists() and not FolderLock(path).held(), "signed by a process that has died: not held"
    for _ in range(50):                                                  # the kernel drops the lock with the process
        if lock.acquire(): break
        time.sleep(0.1)
    else: raise AssertionError("a dead process still holds the lock")
    lock.release()


@pytest.mark.parametrize("dataset, crop, what", [
    ("nuclei", 256, "too small for a 256x256 training crop rotated to any angle: that needs at least"),
    ("craters", 256, "too small for a 256x256 test tile rotated to any angle"),
])
def test_a_crop_too_large_for_the_data_fails_before_training(tmp_path, dataset, crop, what):
    from mars_nb.data import DatasetError
    cfg = RunConfig(data=DataConfig(dataset=dataset, crop=crop, batch_size=1), train=TrainConfig(mode="none", steps=1))
    with pytest.raises(DatasetError, match=what):
        fit(cfg, tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.yaml").exists()


def test_load_trained_refuses_weights_of_another_configuration(trained, tmp_path):
    from safetensors.torch import load_file, save_file
    run = _copy(trained, tmp_path / "run")
    model, cfg = load_trained(run)
    assert cfg == _cfg(2) and not model.training
    edited = RunConfig.from_yaml(run / "config.yaml")
    edited.model.overrides = {"num_queries": 8}
    edited.to_yaml(run / "config.yaml")
    with pytest.raises(ConfigError, match=r"model\.safetensors was trained with another configuration than .*config\.yaml "
                                          r"\(model\.overrides\.num_queries: None in the weights, 8 in config\.yaml\)"):
        load_trained(run)
    # weights without the config in their metadata (older runs): the shapes tell
    save_file(load_file(str(run / "model.safetensors")), str(run / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"does not fit the model of .*overrides \{'num_queries': 8\}.*tensor\(s\) of another "
                                          r"shape \(.*\(16, 64\) in the file, \(8, 64\) for the config"):
        load_trained(run)
    (run / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no model\.safetensors: its training was interrupted: run it again"):
        load_trained(run)


# ---------------------------------------------------------------------------------------------
# the controls and the bookkeeping of the paper: rotaug-any (view1_angles), outcons (the output stage),
# the recorded MARS config, gradient shares, spatial cross-validation folds, the ignore-aware supervised loss

ANY = {"kind": "range", "values": [0, 360]}


def test_params_map_the_new_parameters_onto_the_config():
    c = config_from_params(folds=5, view1_angles=ANY, eval_split="val", seed=7)
    assert c.data.folds == 5 and c.eval.split == "val" and c.train.seed == 7
    assert c.train.view1_angles == AnglePolicy("range", [0.0, 360.0])
    assert config_from_params(view1_angles=[0, 90]).train.view1_angles == AnglePolicy("discrete", [0.0, 90.0])
    d = config_from_params()
    assert d.data.folds is None and d.train.view1_angles is None and d.eval.split == "test"
    assert {"folds", "view1_angles", "eval_split"} <= set(RUN_PARAMS)
    with pytest.raises(ConfigError, match="eval split 'holdout'"):
        config_from_params(eval_split="holdout")


def test_label_scarce_runs_name_their_regime_and_feed_unlabelled_crops_to_mars_only(tmp_path):
    from mars_nb.train import MarsModule
    p = dict(dataset="craters", folds=5, labelled=0.1, unlabelled=True, mode="mars", mars="output", seed=2)
    cfg = config_from_params(**p)
    assert cfg.name == "craters-mars-output-l10-u-s2" and cfg.data.labelled == 0.1 and cfg.data.unlabelled
    assert config_from_params(labelled=0.05, mode="rotaug", unlabelled=True).name == "craters-rotaug-l5-s0"
    assert config_from_params(preset="lite0", mode="rotaug").name == "craters-rotaug-lite0-s0"    # not tiny: said
    assert config_from_params(preset="tiny", mode="rotaug").name == "craters-rotaug-s0"
    rot = config_from_params(labelled=0.05, mode="rotaug", unlabelled=True, steps=1)
    data = ViewPairData(rot)
    data.trainer = None
    assert not any(k.startswith("u_") for k in next(iter(data.train_dataloader()))), "rotaug has no use for them"
    same = config_from_params(mode="rotaug", view1_angles="same", train_angles={"kind": "range", "values": [-45, 45]})
    assert same.train.view1_angles == same.train.angles == AnglePolicy("range", [-45.0, 45.0])
    assert config_from_params(mode="rotaug", view1_angles="same").train.view1_angles == AnglePolicy()
    pairs = ViewPairs(dataset_for(cfg), 64, 2, AnglePolicy("discrete", [90.0]), seed=2, unlabelled=True)
    items = [pairs[i] for i in range(2)]
    assert all((it["u_label1"] == IGNORE).all() and (it["u_label2"] == IGNORE).all() for it in items)
    assert all(torch.equal(it["u_image1"], pairs[i]["u_image1"]) for i, it in enumerate(items)), "pure in (seed, i)"
    assert not torch.equal(items[0]["u_image1"], items[1]["u_image1"])
    batch = collate_pairs(items)
    module = MarsModule(cfg.to_dict(), num_labels=2, num_channels=1)
    images, labels = module._views(batch)
    # view 1 (2 labelled, then 2 unlabelled crops), then view 2 in the same order
    assert images.shape[0] == 8 and torch.equal(images[2:4], batch["u_image1"]) and torch.equal(images[6:], batch["u_image2"])
    assert (labels[[2, 3, 6, 7]] == IGNORE).all() and (labels[[0, 1, 4, 5]] != IGNORE).any()
    run = RunConfig.from_dict({**cfg.to_dict(), "data": {**cfg.data.to_dict(), "crop": 64, "batch_size": 2},
                               "train": {**cfg.train.to_dict(), "steps": 2, "log_every": 1, "ckpt_every": 2}})
    fit(run, tmp_path, progress=False)
    assert np.isfinite(read_log(tmp_path)["train/mars/output"].astype(float)).all()


def test_label_angles_withhold_the_labels_of_views_turned_elsewhere_and_the_run_trains(tmp_path):
    "View 2 at 30° or 180°, labels kept within ±45°: a batch turned to 180° reaches the module with view 2 unlabelled."
    near = {"kind": "range", "values": [-45, 45]}
    cfg = config_from_params(mode="mars", mars="pixel", train_angles=[30, 180], label_angles=near, steps=2, crop=64,
                             batch_size=2, seed=1)
    assert cfg.train.label_angles == AnglePolicy("range", [-45.0, 45.0]) and "label_angles" in RUN_PARAMS
    cfg.to_yaml(tmp_path / "c.yaml")
    assert RunConfig.from_yaml(tmp_path / "c.yaml") == cfg
    plain = ViewPairData(config_from_params(mode="mars", mars="pixel", train_angles=[30, 180], steps=8, crop=64,
                                            batch_size=2, seed=1))
    data = ViewPairData(RunConfig.from_dict({**cfg.to_dict(), "train": {**cfg.train.to_dict(), "steps": 8}}))
    plain.trainer = data.trainer = None
    seen = set()
    for a, b in zip(plain.train_dataloader(), data.train_dataloader()):
        assert a["angle2"] == b["angle2"] and torch.equal(a["image2"], b["image2"]) and torch.equal(a["label1"], b["label1"])
        far = b["angle2"] == 180.0
        assert (b["label2"] == IGNORE).all() if far else torch.equal(a["label2"], b["label2"])
        seen.add(far)
    assert seen == {True, False}, "both kinds of batch were drawn"
    fit(cfg, tmp_path / "run", progress=False)
    assert np.isfinite(read_log(tmp_path / "run")["train/loss"].astype(float)).all()


def test_mars_off_forwards_the_unlabelled_crops_and_adds_no_consistency():
    """`mars-off` (MARS at weight 0) isolates the consistency term: its batches hold the unlabelled crops, which move the
    backbone's batch-norm statistics as a tap run's do, while its loss is the supervised loss alone."""
    from mars_nb.model import mask2former_loss
    from mars_nb.train import MarsModule
    off = config_from_params(dataset="craters", folds=5, labelled=0.1, unlabelled=True, mode="mars", seed=2,
                             mars={"preset": "backbone", "stages": {"backbone": {"weight": 0}}})
    pairs = ViewPairs(dataset_for(off), 64, 2, AnglePolicy("discrete", [90.0]), seed=2, unlabelled=True)
    batch = collate_pairs([pairs[i] for i in range(2)])
    stats = {}
    for name, drop in (("with", False), ("without", True)):
        torch.manual_seed(0)
        module = MarsModule(off.to_dict(), num_labels=2, num_channels=1)
        b = {k: v for k, v in batch.items() if not (drop and k.startswith("u_"))}
        images, labels = module._views(b)
        with module.mars.taps(module.model) as taps:
            out = module.model(pixel_values=images, output_auxiliary_logits=True)
        torch.manual_seed(1)                                             # the loss samples its points at random
        supervised = mask2former_loss(out, labels, module.model.config)["loss"]
        terms = module._mars_terms(taps, out, b, tuple(images.shape[-2:]))
        assert not terms["mars/total"].requires_grad and terms["mars/total"].item() == 0.0, "no consistency term"
        torch.manual_seed(1)
        assert module.training_step(b, 0).item() == pytest.approx(supervised.item(), rel=1e-6)
        bn = next(m for m in module.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        stats[name] = bn.running_mean.clone()
    assert not torch.allclose(stats["with"], stats["without"]), "the unlabelled crops reach the batch-norm statistics"


def test_a_mars_off_run_trains_and_logs_no_share(tmp_path):
    "A whole run at weight 0, with the gradient-share diagnostic due at its steps: nothing to share, nothing fails."
    cfg = config_from_params(dataset="craters", folds=5, labelled=0.1, unlabelled=True, mode="mars", seed=2, crop=64,
                             batch_size=2, steps=2, mars={"preset": "backbone", "stages": {"backbone": {"weight": 0}}})
    run = RunConfig.from_dict({**cfg.to_dict(), "train": {**cfg.train.to_dict(), "log_every": 1, "ckpt_every": 2,
                                                          "share_every": 1}})
    fit(run, tmp_path, progress=False)
    log = read_log(tmp_path)
    assert len(log) and not any(c.startswith("train/share/") for c in log) and (log["train/mars/total"].dropna() == 0).all()


def test_mode_mars_records_the_resolved_mars_config(tmp_path):
    from mars_nb.losses import resolve_config
    from mars_nb.taps import HYBRID
    hybrid = RunConfig(train=TrainConfig(mode="mars"))
    assert hybrid.mars == resolve_config(None) and set(hybrid.mars["stages"]) == set(HYBRID)
    assert hybrid.mars["margin"] == 1.0 and "gradient" in hybrid.mars and "matching" in hybrid.mars
    short = RunConfig(train=TrainConfig(mode="mars"), mars={"preset": "backbone", "margin": 2})
    assert short.mars == resolve_config({"preset": "backbone", "margin": 2}) and set(short.mars["stages"]) == {"backbone"}
    short.to_yaml(tmp_path / "c.yaml")
    written = __import__("yaml").safe_load((tmp_path / "c.yaml").read_text())["mars"]
    assert set(written) >= {"stages", "margin", "gradient"} and "preset" not in written
    assert RunConfig.from_yaml(tmp_path / "c.yaml") == short
    # in other modes the MARS settings are only checked, and kept as given
    assert RunConfig(train=TrainConfig(mode="rotaug"), mars={"preset": "hybrid"}).mars == {"preset": "hybrid"}
    assert RunConfig(train=TrainConfig(mode="none")).mars == {}


def test_rotaug_any_views_are_one_crop_turned_by_angle1_and_angle2():
    "With view1_angles, view 1 is the crop turned by angle1 and view 2 the same crop turned by angle2 (about one centre)."
    from mars_nb.data import load_dataset
    from mars_nb.pairs import ViewPairData
    from mars_nb.views import IGNORE, rotate, rotate_labels
    ds, h = load_dataset("craters"), 128
    pairs = ViewPairs(ds, h, 2, AnglePolicy(**ANY), seed=3, policy1=AnglePolicy(**ANY))
    first = [pairs.angles(b)[0] for b in range(8)]
    assert len(set(first)) == 8 and all(0 <= a < 360 for a in first), "angle1 does not vary across batches"
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(h) + 0.5, indexing="ij")
    interior = (yy - h / 2) ** 2 + (xx - h / 2) ** 2 <= (h / 2 - 3) ** 2   # inside view 1 at any relative angle
    for i in (0, 4, 10):
        it = pairs[i]
        a1, a2 = it["angle1"], it["angle2"]
        assert (a1, a2) == pairs.angles(i // 2) == (pairs[i + 1]["angle1"], pairs[i + 1]["angle2"])   # one pair per batch
        # the same draw (generator (seed, i)) through sample_views at those angles gives this very pair
        again = ds.sample_views("train", h, a2, np.random.default_rng([3, i]), angle1=a1)
        assert all(torch.equal(again[k], it[k]) for k in again)
        err = lambda turn: float((rotate(it["image1"], turn) - it["image2"])[0][interior].abs().mean())
        assert err(a2 - a1) < 0.05, "view 2 is not view 1 turned by angle2 - angle1"
        assert err(a2 - a1) < 0.2 * min(err(a2), err(a2 - a1 + 10)), "the check cannot tell the angles apart"
        same = rotate_labels(it["label1"], a2 - a1) == it["label2"]
        assert float(same[interior].float().mean()) > 0.99 and (it["label1"] != IGNORE).all()
    # the run's stream gets the view-1 policy from its config
    cfg = RunConfig(data=DataConfig(dataset="craters", crop=64, batch_size=2),
                    train=TrainConfig(mode="rotaug", view1_angles=AnglePolicy("range", [10.0, 20.0]), seed=1))
    batch = next(iter(ViewPairData(cfg, ds).train_dataloader()))
    assert 10 <= batch["angle1"] < 20 and batch["angle2"] in (90.0, 180.0, 270.0)


def _module(mode="rotaug", **train):
    from mars_nb.train import MarsModule
    cfg = RunConfig(train=TrainConfig(mode=mode, **train), mars={"preset": "backbone"} if mode == "mars" else {})
    return MarsModule(cfg.to_dict(), num_labels=2, num_channels=1)


def _pair(angle1, angle2, n=2, size=64):
    torch.manual_seed(0)
    x, y = torch.randn(n, 1, size, size), torch.randint(0, 2, (n, size, size))
    return {"image1": x, "label1": y, "image2": x.clone(), "label2": y.clone(), "angle1": angle1, "angle2": angle2}


def test_a_batch_outside_the_view1_policy_is_refused():
    module = _module(view1_angles=AnglePolicy("range", [0.0, 90.0]))
    with pytest.raises(ConfigError, match=r"angle 120.0 is outside the policy range \[0.0, 90.0\]"):
        module.training_step(_pair(120.0, 90.0), 0)
    with pytest.raises(ConfigError, match=r"angle 45.0 is outside the policy discrete"):
        module.training_step(_pair(30.0, 45.0), 0)                 # view 2 is still checked against its own policy
    assert torch.isfinite(module.training_step(_pair(30.0, 90.0), 0))


def test_mars_compares_the_views_through_their_relative_angle(monkeypatch):
    from mars_nb import losses
    real, seen = losses.MarsLoss.forward, []

    def spy(self, *a, **kw):
        seen.append(kw["angle"])
        return real(self, *a, **kw)

    monkeypatch.setattr(losses.MarsLoss, "forward", spy)
    module = _module("mars", angles=AnglePolicy("discrete", [270.0]), view1_angles=AnglePolicy("discrete", [90.0]))
    batch = _pair(90.0, 270.0)
    batch["image2"], batch["label2"] = (torch.rot90(batch[k], 2, dims=(-2, -1)) for k in ("image1", "label1"))
    assert torch.isfinite(module.training_step(batch, 0))
    assert seen == [180.0]


def test_training_uses_the_ignore_aware_criterion():
    "The supervised term is `mask2former_loss` of the output with its auxiliary layers, not Hugging Face's own loss."
    from mars_nb.model import mask2former_loss
    from mars_nb.views import IGNORE
    module = _module("none")
    batch = _pair(0.0, 0.0)
    batch["label1"][..., 40:] = IGNORE                                  # training crops may hold ignored pixels
    torch.manual_seed(11)
    loss = module.training_step(batch, 0)
    torch.manual_seed(11)
    out = module.model(pixel_values=batch["image1"], output_auxiliary_logits=True)
    assert torch.equal(loss, mask2former_loss(out, batch["label1"], module.model.config)["loss"])
    # nothing valid: nothing to learn (Hugging Face's loss would still push every query to "no object")
    batch["label1"][:] = IGNORE
    assert module.training_step(batch, 0).item() == 0.0


def test_gradient_shares_are_logged_per_stage(tmp_path):
    "Three MARS steps (hybrid, the default for mars={}) with share_every=1: train/share/<stage> at every step."
    from mars_nb.losses import resolve_config
    cfg = RunConfig(name="share", data=DataConfig(dataset="craters", crop=64, batch_size=2),
                    train=TrainConfig(mode="mars", steps=3, share_every=1, ckpt_every=3, log_every=1, seed=1))
    fit(cfg, tmp_path, progress=False)
    log = read_log(tmp_path)
    stages = set(resolve_config(None)["stages"])
    shares = {c for c in log.columns if c.startswith("train/share/")}
    assert shares == {f"train/share/{s}" for s in stages}, log.columns.tolist()
    assert list(log["step"]) == [0, 1, 2]
    for c in shares:
        assert np.isfinite(log[c]).all() and (log[c] > 0).all(), (c, log[c].tolist())
    assert RunConfig.from_yaml(tmp_path / "config.yaml").mars == resolve_config(None)   # the stages that trained



def test_gradient_shares_are_not_computed_without_a_trainer(monkeypatch):
    """A hand-written loop calling training_step has no trainer to log the shares to: they are not computed (global_step
    stays 0 without one, so they would cost two extra backward passes at every step)."""
    import mars_nb.train as T
    calls = []
    monkeypatch.setattr(T, "gradient_shares", lambda *a, **k: calls.append(1) or {})
    cfg = RunConfig(data=DataConfig(dataset="craters", crop=64, batch_size=2), train=TrainConfig(mode="mars", share_every=1))
    ds = dataset_for(cfg)
    mod = T.MarsModule(cfg.to_dict(), ds.num_classes, ds.num_channels)
    mod.log = lambda *a, **k: None
    pairs = ViewPairs(ds, 64, 2, AnglePolicy(), seed=0)
    for i in range(2):
        loss = mod.training_step(collate_pairs([pairs[2 * i], pairs[2 * i + 1]]), i)
        assert torch.isfinite(loss)
    assert calls == []

def test_an_outcons_run_trains_and_logs_the_output_term(tmp_path):
    "outcons: mode mars with the output preset (class distributions of the two views compared)."
    cfg = config_from_params(name="outcons", dataset="craters", mode="mars", mars="output", steps=2, crop=64, batch_size=2)
    cfg.train.log_every, cfg.train.share_every = 1, 0
    assert set(cfg.mars["stages"]) == {"output"}
    fit(cfg, tmp_path, progress=False)
    log = read_log(tmp_path)
    assert list(log["step"]) == [0, 1] and np.isfinite(log["train/mars/output"]).all()
    assert (log["train/mars/output"] >= 0).all() and not any(c.startswith("train/share/") for c in log.columns)
    assert (tmp_path / "model.safetensors").exists()


def test_folds_train_on_the_fold_the_seed_picks(tmp_path, monkeypatch):
    "5 folds of 340 rows; seed 7 -> fold 2: test rows 680-1020, val the next band, train the rest (two regions)."
    from mars_nb import pairs
    from mars_nb.pairs import dataset_for
    c = config_from_params(folds=5, seed=7, mode="none", steps=1, crop=64, batch_size=2)
    ds = dataset_for(c)
    assert ds.parts == {"train": [(0, (0, 680, 0, 1700)), (0, (1360, 1700, 0, 1700))],
                        "val": [(0, (1020, 1360, 0, 1700))], "test": [(0, (680, 1020, 0, 1700))]}
    assert dataset_for(config_from_params(folds=5, seed=3)).parts["test"] == [(0, (1020, 1360, 0, 1700))]
    assert dataset_for(config_from_params()).parts["test"] == [(0, (340, 680, 0, 1700))]   # no folds: the bands
    calls, real = [], pairs.load_dataset
    monkeypatch.setattr(pairs, "load_dataset", lambda name, **kw: calls.append((name, kw)) or real(name, **kw))
    fit(c, tmp_path, progress=False)
    assert calls == [("craters", {"labelled": 1.0, "unlabelled": False, "folds": 5, "fold": 2})]
    assert RunConfig.from_yaml(tmp_path / "config.yaml").data.folds == 5
    for bad in ({"dataset": "nuclei"}, {"dataset": "folder", "root": str(tmp_path)}):
        with pytest.raises(ConfigError, match=r"folds=5: spatial cross-validation needs .*\['craters'\]"):
            config_from_params(folds=5, **bad)


def test_under_slurm_a_task_count_other_than_devices_times_nodes_is_refused(monkeypatch):
    "Lightning takes its world from srun and would train on fewer devices without a word: refused, naming both counts."
    from mars_nb.train import slurm_task_check
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    with pytest.raises(RuntimeError, match=r"SLURM started 1 task\(s\) for this run, but it is configured for devices=2 x "
                                           r"num_nodes=1 = 2: Lightning would train on 1 device\(s\)"):
        slurm_task_check(2, 1)
    slurm_task_check(1, 1)                                       # one task, one device: fine
    monkeypatch.setenv("SLURM_NTASKS", "8")
    slurm_task_check(4, 2)
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")          # srun --job-name=interactive: Lightning's own opt-out
    slurm_task_check(2, 1)


def test_a_checkpoint_written_before_a_config_key_existed_still_resumes(tmp_path):
    "check_resumable reads the checkpoint's config with today's defaults: a key added since (num_nodes) is no difference."
    from mars_nb.runfolder import check_resumable
    old = RunConfig().to_dict()
    del old["train"]["num_nodes"]
    torch.save({"hyper_parameters": {"config": old, "num_labels": 2, "num_channels": 1}}, tmp_path / "last.ckpt")
    check_resumable(tmp_path / "last.ckpt", RunConfig(), 2, 1)
    with pytest.raises(ConfigError, match=r"train.num_nodes: 1 in the checkpoint, 2 now"):
        check_resumable(tmp_path / "last.ckpt", RunConfig(train=TrainConfig(num_nodes=2)), 2, 1)


def test_bn_batches_recalibrates_the_statistics_and_changes_nothing_else(tmp_path):
    """`train.bn_batches`: the saved weights are those of the same run without it; the batch-norm statistics are those
    `recalibrate_bn` computes over the run's first training batches, unlabelled crops included (also in mode rotaug)."""
    from mars_nb.pairs import recalibration_batches
    from mars_nb.train import recalibrate_bn
    base = dict(dataset="craters", folds=5, labelled=0.1, unlabelled=True, mode="rotaug", steps=2, crop=64, batch_size=2,
                seed=1)
    plain, bn = config_from_params(**base), config_from_params(**base, bn_batches=3)
    assert bn.train.bn_batches == 3 and bn.name == "craters-rotaug-l10-bn-s1" and plain.name == "craters-rotaug-l10-s1"
    fit(plain, tmp_path / "a", progress=False)
    fit(bn, tmp_path / "b", progress=False)
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    stats = {k for k in wa if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert stats and wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa.keys() - stats)
    assert not all(torch.equal(wa[k], wb[k]) for k in stats)
    batches = list(recalibration_batches(bn))
    assert len(batches) == 3 and batches[0].shape == (8, 1, 64, 64)         # per view: 2 labelled, then 2 unlabelled crops
    model, _ = load_trained(tmp_path / "a")
    assert recalibrate_bn(model, batches) > 0
    assert all(torch.allclose(model.state_dict()[k].float(), wb[k].float(), atol=1e-5) for k in stats)
    assert int(wb[next(k for k in stats if k.endswith("num_batches_tracked"))]) == 3
    with pytest.raises(ValueError, match="no batch-norm layer"):
        recalibrate_bn(torch.nn.Linear(2, 2), batches)
    with pytest.raises(ConfigError, match="bn_batches must be >= 0"):
        config_from_params(**base, bn_batches=-1)


def test_bn_batches_is_refused_in_mode_none():
    "Mode none trains on the upright view alone; recalibrating over both views would feed it crops it never saw."
    with pytest.raises(ConfigError, match="mode 'none' trains on the upright view alone"):
        config_from_params(mode="none", bn_batches=4)

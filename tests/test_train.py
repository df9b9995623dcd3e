"""Training: configs round-trip and validate; short runs train, are reproducible, and resume exactly."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mars_nb.train import (AnglePolicy, ConfigError, DataConfig, EvalConfig, FolderLock, ModelConfig, NonFiniteLoss,
                           RunConfig, RunLocked, StepSampler, TrainConfig, ViewPairs, check_finite, config_from_params, fit,
                           load_trained, read_log)


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
    assert x["angle"] == y["angle"] == a[4]["angle"]            # one angle per batch of 2
    assert torch.equal(x["image2"], y["image2"]) and not torch.equal(a[5]["image1"], a[6]["image1"])
    # a 90/180/270 view is the exact rotation of the upright one
    k = int(x["angle"] // 90)
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


def _weights(d):
    return load_file(str(d / "model.safetensors"))


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
    batch = {"image1": x, "label1": y, "image2": x, "label2": y, "angle": 45.0}
    with pytest.raises(ConfigError, match="angle 45.0 is outside the policy discrete"):
        module.training_step(batch, 0)


@pytest.mark.parametrize("mode", ["none", "mars"])
def test_a_training_batch_not_a_multiple_of_32_is_refused(mode):
    "Inference pads; training crops must be multiples of 32 (DataConfig checks the crop, the module a hand-made loader)."
    from mars_nb.train import MarsModule
    module = MarsModule(RunConfig(train=TrainConfig(mode=mode), mars={"preset": "pixel"}).to_dict(), num_labels=2, num_channels=1)
    x, y = torch.zeros(2, 1, 100, 64), torch.zeros(2, 100, 64, dtype=torch.long)
    batch = {"image1": x, "label1": y, "image2": x, "label2": y, "angle": 90.0}
    with pytest.raises(ValueError, match=r"training images are 100x64; both sides must be multiples of 32: crop them "
                                         r"\(e.g. to 96x64\)"):
        module.training_step(batch, 0)


DDP_SCRIPT = """
import sys
from mars_nb.train import RunConfig, DataConfig, TrainConfig, fit
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
    assert "Starting with 2 processes" in proc.stderr + proc.stdout
    assert (tmp_path / "run" / "model.safetensors").exists()
    assert list(read_log(tmp_path / "run")["step"]) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# bad inputs: each a ConfigError that names the value and what would be valid


@pytest.mark.parametrize("bad, words", [
    ({"data": {"crop": 100}}, ["crop 100", "multiple of 32", "96 or 128"]),
    ({"data": {"crop": 0}}, ["crop 0", "multiple of 32"]),
    ({"data": {"batch_size": 0}}, ["batch_size must be >= 1, got 0"]),
    ({"data": {"dataset": "moon"}}, ["'moon'", "['craters', 'nuclei', 'folder']"]),
    ({"data": {"dataset": "folder"}}, ["'folder' needs root="]),
    ({"data": {"dataset": "nuclei", "root": "data"}}, ["root='data'", "only read for dataset 'folder'"]),
    ({"model": {"preset": "r101"}}, ["'r101'", "['tiny', 'r50', 'pretrained']"]),
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
    ({"mars": {"stages": {"backbone": {"distance": "l1"}}}}, ["'l1'", "cosine, mse, smooth_l1, infonce, mars_pooled"]),
    ({"mars": {"stages": {"backbone": {"taps": ["res9"]}}}}, ["res9", "res2, res3, res4, res5"]),
    ({"mars": {"stages": {"decoder": {}}}}, ["'decoder'", "backbone, pixel_decoder, attention"]),
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
    assert config_from_params(mode="mars", mars="hybrid").mars == {"preset": "hybrid"}


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
    import os
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
    assert not (tmp_path / ".fit.lock").exists()
    (tmp_path / ".fit.lock").write_text("otherhost 12345\n")          # left by a process that died: not a lock
    other = FolderLock(tmp_path / ".fit.lock")
    assert other.acquire()
    other.release()


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

"""Training: configs round-trip and validate; short runs train, are reproducible, and resume exactly."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mars_nb.train import (AnglePolicy, ConfigError, DataConfig, ModelConfig, RunConfig, StepSampler, TrainConfig,
                           ViewPairs, config_from_params, fit, read_log)


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

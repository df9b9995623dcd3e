"""The benchmark script runs (smoke preset: tiny model, 64x64, one repeat) and writes the figures the
performance issue asks for. Wall-clock values are never asserted: only that they exist and are sane."""
import json
import math
import subprocess
import sys

import pytest

REQUIRED = ("hook_overhead", "mars_over_rotaug_step", "batched_over_two_single", "mars_attention_over_rotaug_memory",
            "sweep_linearity", "train_images_per_s.rotaug", "train_images_per_s.mars-hybrid",
            "sweep_images_per_s.rotaug", "sweep_images_per_s.mars-hybrid")


@pytest.mark.slow
def test_bench_smoke_writes_the_required_figures(root, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(root / "bench" / "bench_mars.py"), "--preset", "smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    for k in REQUIRED:
        assert isinstance(res[k], float) and math.isfinite(res[k]) and res[k] > 0, (k, res.get(k))
    assert res["preset"] == "smoke" and res["device"] == "cpu" and res["cpu_cores"] >= 1
    assert res["memory_mb.rotaug"] > 0 and "RSS" in res["memory_method"]
    assert "hook_overhead" in proc.stdout and "goal" in proc.stdout  # the table


def test_bench_rejects_bad_arguments(root):
    proc = subprocess.run([sys.executable, str(root / "bench" / "bench_mars.py"), "--preset", "huge"],
                          capture_output=True, text=True, timeout=120, cwd=root)
    assert proc.returncode != 0 and "invalid choice" in proc.stderr and "tiny" in proc.stderr


@pytest.mark.slow
def test_run_bench_times_both_paths_and_merges_into_the_bench_file(root, tmp_path):
    "bench_run.py: the reference and the fast path of one run, side by side; the step figures already there are kept."
    out = tmp_path / "bench.json"
    out.write_text(json.dumps({"hook_overhead": 1.01}))
    proc = subprocess.run([sys.executable, str(root / "bench" / "bench_run.py"), "--steps", "2", "--config", "rotaug",
                           "--out", str(out), "--keep", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=900, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["hook_overhead"] == 1.01 and res["run_steps"] == 2
    for k in ("run_seconds.rotaug.reference", "run_seconds.rotaug.fast", "run_speedup.rotaug", "run_speedup"):
        assert isinstance(res[k], float) and math.isfinite(res[k]) and res[k] > 0, k
    assert res["run_speedup"] == res["run_speedup.rotaug"]
    import yaml
    fast = yaml.safe_load((tmp_path / "runs" / "runs" / "craters-rotaug-fast-s0" / "config.yaml").read_text())
    assert fast["train"]["channels_last"] is True and fast["train"]["steps"] == 2
    assert "run_speedup" in proc.stdout and "goal" in proc.stdout


def _same_science(root):
    sys.path.insert(0, str(root / "bench"))
    try: import same_science
    finally: sys.path.pop(0)
    return same_science


def test_same_science_pairs_fast_runs_with_their_reference_twins(root):
    "Hand-computed: diffs +0.01, -0.01, +0.03 -> mean 0.01, sd 0.02, CI t(0.975, 2) * 0.02 / sqrt 3."
    import pandas as pd
    ss = _same_science(root)
    ref = pd.DataFrame({"dataset": "craters", "config": "rotaug", "seed": [0, 1, 2], "fg_iou_mean": [0.30, 0.40, 0.50]})
    fast = ref.assign(fg_iou_mean=[0.31, 0.39, 0.53])
    noise = pd.DataFrame({"dataset": "craters", "config": "none", "seed": [0], "fg_iou_mean": [0.2]})
    t = ss.paired_paths(pd.concat([ref, noise]), fast, metrics=("fg_iou_mean",))
    (r,) = t.to_dict("records")
    assert r["n"] == 3 and r["config"] == "rotaug"
    assert r["diff"] == pytest.approx(0.01) and r["ci"] == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-5)
    assert r["training_noise"] == pytest.approx(0.02 / math.sqrt(2)) and r["replicate_sd"] == pytest.approx(0.1)
    assert "No metric moved" in ss.markdown(t)
    shifted = ss.paired_paths(ref, ref.assign(fg_iou_mean=ref["fg_iou_mean"] + [0.05, 0.06, 0.04]), metrics=("fg_iou_mean",))
    assert "Moved" in ss.markdown(shifted) and "rotaug IoU mean" in ss.markdown(shifted)
    with pytest.raises(ValueError, match="no reference twin"):
        ss.paired_paths(ref[ref.seed < 2], fast, metrics=("fg_iou_mean",))

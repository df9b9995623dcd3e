"""Failures and safety across modules: a run killed at any point resumes to the same end as an uninterrupted one,
a grid killed midway keeps its finished runs, two runners on one grid never run a run twice, papermill parameters
are checked before training, and nothing a user supplies is unpickled or evaluated."""
import ast
import json
import signal
import subprocess
import sys
import time

import nbformat
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from mars_nb.config import DataConfig, EvalConfig, RunConfig, TrainConfig
from mars_nb.pairs import dataset_for
from mars_nb.files import FolderLock
from mars_nb.runfolder import read_log
from mars_nb.train import fit

TESTS = ROOT / "tests"


# ---------------------------------------------------------------------------------------------
# a run killed at any point, started again, ends where an uninterrupted run ends

def kill_cfg() -> RunConfig:
    "Six steps of MARS (hybrid: every stage) on nuclei 64x64 crops; a checkpoint every two steps."
    return RunConfig(name="k", data=DataConfig(dataset="nuclei", crop=64, batch_size=2), mars={"preset": "hybrid"},
                     train=TrainConfig(mode="mars", steps=6, ckpt_every=2, log_every=1, seed=4),
                     eval=EvalConfig(angles=[0.0, 45.0, 90.0], batch_size=8))


def train_and_sweep(out) -> dict:
    "What a run does (as experiments/run.ipynb): train, then the rotation sweep into metrics.json."
    from mars_nb.evaluate import sweep, write_sweep
    cfg = kill_cfg()
    module = fit(cfg, out, progress=False)
    df, confusion = sweep(module.model.eval(), dataset_for(cfg), cfg.eval.angles, cfg.eval.batch_size, split=cfg.eval.split,
                          tile_size=cfg.data.crop, progress=False, per_tile=True)
    return write_sweep(df, out, confusion=confusion)


CHILD = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
import torch
from mars_nb import train
from test_reliability import train_and_sweep

out, point = Path(sys.argv[1]), sys.argv[2]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point.startswith("step"):               # as training step n starts
    n, hook = int(point[4:]), train.MarsModule.on_train_batch_start
    def start(self, batch, i):
        if self.global_step == n: die()
        return hook(self, batch, i)
    train.MarsModule.on_train_batch_start = start
elif point.startswith("ckpt"):             # halfway through writing the checkpoint of step n
    n, save = int(point[4:]), torch.save
    def torn(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("global_step") == n:
            Path(f).write_bytes(b"PK" + bytes(4096)); die()     # the temporary file atomic_write hands out
        return save(obj, f, *a, **k)
    torch.save = torn
elif point == "weights":                   # halfway through writing model.safetensors
    import safetensors.torch as st
    def torn(tensors, filename, metadata=None):
        Path(filename).write_bytes(bytes(100)); die()
    st.save_file = torn
train_and_sweep(out)
"""

POINTS = ["step3", "ckpt4", "weights", "outside"]


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    "One run folder per kill point, left by a process killed with SIGKILL at that point (all killed side by side)."
    base = tmp_path_factory.mktemp("killed")
    (base / "child.py").write_text(CHILD)
    procs = {p: subprocess.Popen([sys.executable, str(base / "child.py"), str(base / p), p, str(TESTS)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for p in POINTS}
    # "outside": killed by another process as soon as its first checkpoint exists, wherever it is then
    deadline = time.time() + 300
    while not (base / "outside" / "checkpoints" / "last.ckpt").exists() and procs["outside"].poll() is None:
        assert time.time() < deadline, "the run never wrote a checkpoint"
        time.sleep(0.02)
    procs["outside"].send_signal(signal.SIGKILL)
    for p, proc in procs.items():
        out = proc.communicate(timeout=300)[0].decode(errors="replace")
        assert proc.returncode == -signal.SIGKILL, f"{p}: not killed (rc {proc.returncode}):\n{out[-3000:]}"
    return base


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    return out, train_and_sweep(out)


@pytest.mark.parametrize("point", POINTS)
def test_a_run_killed_anywhere_resumes_to_the_same_end(killed, uninterrupted, point):
    ref_dir, ref_metrics = uninterrupted
    run = killed / point
    if point.startswith("ckpt"):            # the torn write never replaced the checkpoint of step 2
        ck = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert ck["global_step"] == 2
    if point == "weights":
        assert not (run / "model.safetensors").exists(), "a torn write left a model.safetensors behind"
    metrics = train_and_sweep(run)                       # started again
    assert set(metrics) == set(ref_metrics)
    for k, v in ref_metrics.items():
        assert metrics[k] == pytest.approx(v, abs=1e-6), k
    import numpy as np
    with np.load(ref_dir / "tiles.npz") as ref_tiles, np.load(run / "tiles.npz") as tiles:
        assert np.array_equal(tiles["confusion"], ref_tiles["confusion"]), "per-tile counts differ"
    a, b = load_file(str(ref_dir / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), "weights differ"
    log, ref_log = read_log(run), read_log(ref_dir)
    if point != "outside":   # a kill between a checkpoint and the log row of that same step may lose that one row
        assert list(log["step"]) == list(range(6))
    common = ref_log[ref_log["step"].isin(log["step"])]
    assert (abs(log.set_index("step")["train/loss"] - common.set_index("step")["train/loss"]) < 1e-5).all()
    assert not list(run.rglob("*.tmp")), "temporary files left behind"


# ---------------------------------------------------------------------------------------------
# grids: killed midway, or run twice at once by mistake

RUNNER = """
import json, os, sys, time
from pathlib import Path
from mars_nb.ablate import load_grid, run_grid

grid, log, pause, ready = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])
def note(line):
    with open(log, "a") as f: f.write(line + "\\n")
def execute(run):                 # a stand-in for papermill: writes into the run folder over `pause` seconds
    note(f"start {run.name} {os.getpid()}")
    for i in range(3):
        (run.out_dir / f"part{i}.txt").write_text(f"{run.name} {os.getpid()}")
        time.sleep(pause / 3)
    note(f"end {run.name} {os.getpid()}")
(ready / str(os.getpid())).touch()
while len(list(ready.iterdir())) < int(sys.argv[5]): time.sleep(0.01)     # start together
print(json.dumps(run_grid(load_grid(grid), execute=execute, progress=False)))
"""


def _grid(tmp_path, n_seeds):
    (tmp_path / "grid.yaml").write_text(f"out: {tmp_path / 'out'}\ndatasets: [craters]\nseeds: {list(range(n_seeds))}\n"
                                        "configs:\n  none: {mode: none}\n")
    (tmp_path / "runner.py").write_text(RUNNER)
    (tmp_path / "ready").mkdir()
    from mars_nb.ablate import load_grid
    return load_grid(tmp_path / "grid.yaml")


def _runner(tmp_path, pause, n):
    return subprocess.Popen([sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "grid.yaml"), str(tmp_path / "log"),
                             str(pause), str(tmp_path / "ready"), str(n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _intact(run):
    done = json.loads((run.out_dir / "done.json").read_text())
    parts = {(run.out_dir / f"part{i}.txt").read_text() for i in range(3)}
    assert done["name"] == run.name and len(parts) == 1 and parts.pop().split()[0] == run.name
    assert not (run.out_dir / "error.txt").exists()


def test_two_runners_on_one_grid_run_each_run_once(tmp_path):
    runs = _grid(tmp_path, 5)
    procs = [_runner(tmp_path, 0.3, 2) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    summaries = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    ran = [n for s in summaries for n in s["ran"]]
    assert sorted(ran) == sorted(r.name for r in runs), summaries
    starts = [l.split() for l in (tmp_path / "log").read_text().splitlines() if l.startswith("start")]
    assert sorted(n for _, n, _ in starts) == sorted(r.name for r in runs), "a run was executed twice"
    who = {n: pid for _, n, pid in starts}
    for r in runs:
        _intact(r)
        assert (r.out_dir / "part2.txt").read_text().split()[1] == who[r.name], "two runners wrote one folder"
        assert FolderLock(r.out_dir / ".lock").acquire(), "a runner kept its lock"   # the file stays; the lock does not


def test_a_grid_killed_midway_keeps_its_finished_runs(tmp_path):
    from mars_nb.ablate import run_grid
    runs = _grid(tmp_path, 5)
    proc = _runner(tmp_path, 0.6, 1)
    deadline = time.time() + 300
    while sum((r.out_dir / "done.json").exists() for r in runs) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    time.sleep(0.25)                                   # into the third run
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    done = [r for r in runs if (r.out_dir / "done.json").exists()]
    assert 2 <= len(done) < len(runs)
    for r in done:
        _intact(r)
    seen = []
    s = run_grid(runs, execute=lambda r: seen.append(r.name), progress=False)      # started again
    assert s["skipped"] == [r.name for r in done] and seen == [r.name for r in runs if r not in done]
    for r in done:                                       # finished runs were not touched
        _intact(r)


# ---------------------------------------------------------------------------------------------
# papermill parameters

def test_unknown_papermill_parameter_stops_the_run_before_training(tmp_path):
    pm = pytest.importorskip("papermill")
    # papermill itself only logs a warning for a parameter the notebook does not define
    with pytest.raises(pm.PapermillExecutionError, match=r"unknown run parameter\(s\) \['stpes'\]; valid parameters are"):
        pm.execute_notebook(str(ROOT / "nbs" / "experiments" / "run.ipynb"), str(tmp_path / "run.ipynb"),
                            kernel_name="python3", progress_bar=False, cwd=str(tmp_path),
                            parameters={"stpes": 3, "out_dir": str(tmp_path)})
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.yaml").exists()


# ---------------------------------------------------------------------------------------------
# safety: what a user supplies is never unpickled, evaluated or loaded unsafely

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
UNSAFE_CALLS = {"eval", "exec", "compile", "__import__"}


def _sources():
    for path in sorted((ROOT / "mars_nb").glob("*.py")):
        yield path.name, path.read_text()
    for path in sorted((ROOT / "nbs" / "experiments").glob("*.ipynb")):
        code = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        yield path.name, "\n".join(l for src in code for l in src.splitlines() if not l.lstrip().startswith(("%", "!")))


def _kw(call, name):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_no_pickle_eval_or_unsafe_loading_in_the_package():
    seen = set()
    for name, text in _sources():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {m.split(".")[0] for m in mods} & UNSAFE_MODULES, f"{name}:{node.lineno} imports {mods}"
            if not isinstance(node, ast.Call):
                continue
            f, where = ast.unparse(node.func), f"{name}:{node.lineno}"
            assert not (isinstance(node.func, ast.Name) and f in UNSAFE_CALLS), f"{where}: {f}()"
            if f == "torch.load":
                seen.add(f)
                wo = _kw(node, "weights_only")
                assert isinstance(wo, ast.Constant) and wo.value is True, f"{where}: torch.load without weights_only=True"
            assert f not in ("yaml.load", "yaml.load_all", "yaml.full_load", "yaml.unsafe_load", "yaml.unsafe_load_all"), where
            if f in ("yaml.compose", "yaml.compose_all"):
                assert ast.unparse(_kw(node, "Loader")) == "yaml.SafeLoader", f"{where}: {f} without the SafeLoader"
            if f.endswith("from_pretrained"):
                wo = _kw(node, "weights_only")
                assert wo is None or (isinstance(wo, ast.Constant) and wo.value is True), f"{where}: weights_only=False"
    assert "torch.load" in seen, "the checkpoint reader was not found: does the scan still see the package?"

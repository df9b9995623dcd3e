"""Grid files: expansion, validation errors that name the line, sharding, skipping and failures."""
import json

import pytest

from mars_nb.ablate import GridError, Run, load_grid, main, run_grid, shard_runs

GRID = """\
out: {out}
datasets: [craters, nuclei]
seeds: [0, 1]
shared:
  steps: 2
configs:
  none: {{mode: none}}
  mars-hybrid: {{mode: mars, mars: {{preset: hybrid}}}}
"""


@pytest.fixture
def grid(tmp_path):
    p = tmp_path / "grid.yaml"
    p.write_text(GRID.format(out=tmp_path / "out"))
    return p


def test_expansion(grid, tmp_path):
    runs = load_grid(grid)
    assert len(runs) == 8 and len({r.name for r in runs}) == 8
    r = runs[-1]
    assert r.name == "nuclei-mars-hybrid-s1" and r.out_dir == tmp_path / "out" / "runs" / r.name
    assert r.params == {"steps": 2, "mode": "mars", "mars": {"preset": "hybrid"}, "name": r.name, "dataset": "nuclei", "seed": 1}
    assert all(r.params["steps"] == 7 for r in load_grid(grid, steps=7))


@pytest.mark.parametrize("text, needle", [
    ("configs:\n  a: {mode: none}\nepochs: 3\n", ":3: unknown key 'epochs'"),
    ("configs:\n  a: {mode: none, stepz: 3}\n", ":2: unknown run parameter 'stepz'"),
    ("configs:\n  a: {mode: none, steps: many}\n", ":2: config 'a'"),
    ("seeds: [0, 0]\nconfigs:\n  a: {mode: none}\n", ":1: duplicate seeds"),
    ("seeds: zero\nconfigs:\n  a: {mode: none}\n", ":1: seeds must be a non-empty list"),
    ("configs: {}\n", "the grid has no configs"),
    ("datasets: [craters]\n", "the grid has no configs"),
    ("configs:\n  a: {mode: none, seed: 3}\n", "'seed' is set by the grid itself"),
    ("configs: [a, b\n", "not valid YAML"),
    ("- a\n- b\n", "a grid is a mapping"),
])
def test_bad_grids_name_the_line(tmp_path, text, needle):
    p = tmp_path / "g.yaml"
    p.write_text(text)
    with pytest.raises(GridError) as e:
        load_grid(p)
    assert needle in str(e.value) and str(p) in str(e.value)


def test_duplicate_config_names_are_rejected(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text("configs:\n  a: {mode: none}\n  a: {mode: rotaug}\n")
    with pytest.raises(GridError, match="duplicate"):
        load_grid(p)


def test_shards_cover_every_run_once(grid):
    runs = load_grid(grid)
    parts = [shard_runs(runs, f"{i}/3") for i in range(3)]
    names = [r.name for p in parts for r in p]
    assert sorted(names) == sorted(r.name for r in runs) and len(names) == len(set(names))
    with pytest.raises(GridError):
        shard_runs(runs, "3/3")


def test_finished_skipped_failed_recorded_others_go_on(grid):
    runs = load_grid(grid)
    seen = []

    def execute(run: Run):
        seen.append(run.name)
        if run.name == "craters-none-s1":
            raise RuntimeError("out of memory")
        (run.out_dir / "metrics.json").write_text("{}")

    s = run_grid(runs, execute=execute, progress=False)
    assert s["failed"] == {"craters-none-s1": "RuntimeError: out of memory"} and len(s["ran"]) == 7
    assert "RuntimeError: out of memory" in (runs[1].out_dir / "error.txt").read_text()
    assert json.loads((runs[0].out_dir / "done.json").read_text())["config"] == "none"
    seen.clear()
    s = run_grid(runs, execute=lambda r: seen.append(r.name), progress=False)
    assert seen == ["craters-none-s1"] and len(s["skipped"]) == 7 and not (runs[1].out_dir / "error.txt").exists()


def test_a_run_held_by_a_live_runner_is_skipped(grid):
    import os, socket
    runs = load_grid(grid)
    runs[0].out_dir.mkdir(parents=True)
    (runs[0].out_dir / ".lock").write_text(f"{socket.gethostname()} {os.getpid()}")   # held by us: alive
    (runs[1].out_dir).mkdir(parents=True)
    (runs[1].out_dir / ".lock").write_text(f"{socket.gethostname()} 999999999")       # stale: dead pid
    seen = []
    s = run_grid(runs[:2], execute=lambda r: seen.append(r.name), progress=False)
    assert seen == [runs[1].name] and s["skipped"] == [runs[0].name]


def test_cli_dry_run_and_bad_grid(grid, tmp_path, capsys):
    assert main([str(grid), "--dry-run", "--shard", "1/2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(l.startswith("todo") for l in lines)
    bad = tmp_path / "bad.yaml"
    bad.write_text("configs:\n  a: {mode: nonsense}\n")
    assert main([str(bad), "--dry-run"]) == 2
    assert "mode 'nonsense'" in capsys.readouterr().err

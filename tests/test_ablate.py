"""Grid files: expansion, validation errors that name the line, sharding, skipping and failures."""
import json
from pathlib import Path

import pytest

from mars_nb.ablate import GridError, Run, load_grid, main, run_grid, shard_runs
from mars_nb.files import FolderLock

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


def test_order_datasets_finishes_each_dataset_before_the_next(grid):
    "order: datasets — a grid stopped early leaves whole datasets (regimes), each with every config and seed."
    by_config = [r.name for r in load_grid(grid)]
    assert by_config[:4] == ["craters-none-s0", "craters-none-s1", "nuclei-none-s0", "nuclei-none-s1"]
    grid.write_text(grid.read_text() + "order: datasets\n")
    by_dataset = [r.name for r in load_grid(grid)]
    assert by_dataset == ["craters-none-s0", "craters-none-s1", "craters-mars-hybrid-s0", "craters-mars-hybrid-s1",
                          "nuclei-none-s0", "nuclei-none-s1", "nuclei-mars-hybrid-s0", "nuclei-mars-hybrid-s1"]
    grid.write_text(grid.read_text().replace("order: datasets", "order: seeds"))
    with pytest.raises(GridError, match=r"grid.yaml:9: order 'seeds' is not one of \['configs', 'datasets'\]"):
        load_grid(grid)


def test_per_dataset_merges_into_that_datasets_runs_only(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text("datasets: [craters, nuclei]\nseeds: [0, 1]\nshared: {steps: 2, crop: 64}\n"
                 "per_dataset:\n  craters: {folds: 5, steps: 4}\n"
                 "configs:\n  none: {mode: none}\n  big: {mode: rotaug, steps: 9}\n")
    runs = {r.name: r for r in load_grid(p, out=tmp_path / "out")}
    assert len(runs) == 8
    for r in runs.values():
        craters = r.dataset == "craters"
        assert ("folds" in r.params) == craters and r.params.get("folds") == (5 if craters else None), r.name
        # precedence: shared < per_dataset < the config < command-line overrides
        assert r.params["steps"] == (9 if r.config == "big" else 4 if craters else 2), r.name
        assert r.params["crop"] == 64
    assert runs["craters-none-s1"].params == {"steps": 4, "crop": 64, "folds": 5, "mode": "none",
                                              "name": "craters-none-s1", "dataset": "craters", "seed": 1}
    assert runs["nuclei-none-s0"].params == {"steps": 2, "crop": 64, "mode": "none",
                                             "name": "nuclei-none-s0", "dataset": "nuclei", "seed": 0}
    assert all(r.params["steps"] == 3 for r in load_grid(p, steps=3))
    from mars_nb.config import config_from_params
    from mars_nb.pairs import dataset_for
    c = config_from_params(**runs["craters-none-s1"].params)
    assert c.data.folds == 5 and dataset_for(c).parts["test"] == [(0, (340, 680, 0, 1700))]   # seed 1: fold 1


def test_a_grid_names_its_datasets_and_holds_several_folders(tmp_path):
    "One folder per grid, every run named folder-...: a grid's dataset names now stand for any dataset."
    import numpy as np
    from PIL import Image
    for name in ("cells", "leaves"):
        (tmp_path / name / "images").mkdir(parents=True); (tmp_path / name / "masks").mkdir()
        for i in range(4):
            m = np.zeros((200, 200), np.uint8); m[40:90, 60:140] = 1
            Image.fromarray(m * 100).save(tmp_path / name / "images" / f"x{i}.png")
            Image.fromarray(m).save(tmp_path / name / "masks" / f"x{i}.png")
    p = tmp_path / "g.yaml"
    p.write_text(f"datasets: [craters, cells, leaves]\nshared: {{steps: 2}}\nper_dataset:\n"
                 f"  cells: {{dataset: folder, root: {tmp_path / 'cells'}, class_names: [background, cell]}}\n"
                 f"  leaves: {{dataset: folder, root: {tmp_path / 'leaves'}}}\nconfigs:\n  none: {{mode: none}}\n")
    runs = {r.name: r for r in load_grid(p, out=tmp_path / "out")}
    assert sorted(runs) == ["cells-none-s0", "craters-none-s0", "leaves-none-s0"]
    assert runs["cells-none-s0"].params["dataset"] == "folder" and runs["cells-none-s0"].dataset == "cells"
    assert runs["leaves-none-s0"].params["root"] == str(tmp_path / "leaves")
    assert runs["craters-none-s0"].params["dataset"] == "craters"
    p.write_text("shared: {dataset: folder}\nconfigs:\n  none: {mode: none}\n")
    with pytest.raises(GridError, match="'dataset' is set by the grid itself"):
        load_grid(p)


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
    ("seeds: [0.5]\nconfigs:\n  a: {mode: none}\n", ":1: seeds must be a non-empty list of int, got [0.5]"),
    ("datasets: [mars]\nconfigs:\n  a: {mode: none}\n", "dataset 'mars' is not one of ['craters', 'nuclei', 'trees', 'folder']"),
    ("configs:\n  a: {mode: none, steps: 0}\n", ":2: config 'a': steps must be >= 1, got 0"),
    ("shared: {batch_size: 0}\nconfigs:\n  a: {mode: none}\n", "batch_size must be >= 1, got 0"),
    ("configs:\n  a: {mode: none, crop: 100}\n", "crop 100 must be a positive multiple of 32"),
    ("configs:\n  a: {mode: mars, mars: {preset: hybird}}\n", "unknown MARS preset 'hybird'; valid: backbone, pixel"),
    ("configs:\n  a: {mode: mars, mars: {stages: {backbone: {weight: -0.1}}}}\n", "must be a finite number >= 0, got -0.1"),
    ("configs:\n  a: {mode: none, train_angles: []}\n", "angle policy has no angles"),
    ("configs:\n  a: {mode: none, eval_angles: []}\n", "eval angles must be a non-empty list"),
    ("configs: !!python/object/apply:os.getcwd []\n", "not valid YAML"),
    ("datasets: [craters]\nper_dataset:\n  nuclei: {folds: 5}\nconfigs:\n  a: {mode: none}\n",
     ":3: per_dataset names 'nuclei', not one of the grid's datasets ['craters']"),
    ("per_dataset:\n  craters: {stepz: 3}\nconfigs:\n  a: {mode: none}\n", ":2: unknown run parameter 'stepz'"),
    ("per_dataset:\n  craters: {seed: 3}\nconfigs:\n  a: {mode: none}\n", ":2: 'seed' is set by the grid itself"),
    ("per_dataset:\n  craters: 5\nconfigs:\n  a: {mode: none}\n", ":1: per_dataset maps a dataset to run parameters"),
    ("datasets: [nuclei]\nper_dataset:\n  nuclei: {folds: 5}\nconfigs:\n  a: {mode: none}\n",
     "config 'a': folds=5: spatial cross-validation needs"),
])
def test_bad_grids_name_the_line(tmp_path, text, needle):
    p = tmp_path / "g.yaml"
    p.write_text(text)
    with pytest.raises(GridError) as e:
        load_grid(p)
    assert needle in str(e.value) and str(p) in str(e.value)


def test_missing_grid_file_is_named(tmp_path):
    with pytest.raises(GridError, match=r"cannot read grid file .*nope\.yaml"):
        load_grid(tmp_path / "nope.yaml")


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
    import socket
    runs = load_grid(grid)
    held = FolderLock(runs[0].out_dir / ".lock")                # a live runner holds run 0
    assert held.acquire()
    runs[1].out_dir.mkdir(parents=True)
    (runs[1].out_dir / ".lock").write_text(f"{socket.gethostname()} 999999999")   # left by a runner that died
    seen = []
    try:
        s = run_grid(runs[:2], execute=lambda r: seen.append(r.name), progress=False)
    finally:
        held.release()
    assert seen == [runs[1].name] and s["skipped"] == [runs[0].name]
    assert FolderLock(runs[1].out_dir / ".lock").acquire()                   # released after its run


def test_a_second_runner_skips_the_run_in_progress(grid):
    runs = load_grid(grid)[:3]
    seen, second = [], {}

    def execute(run):
        seen.append(run.name)
        if run is runs[0]:      # a second runner is started on the same grid while run 0 is running
            second.update(run_grid(runs, execute=execute, progress=False))

    first = run_grid(runs, execute=execute, progress=False)
    assert sorted(seen) == sorted(r.name for r in runs), "a run ran twice or not at all"
    assert second["skipped"] == [runs[0].name] and second["ran"] == [runs[1].name, runs[2].name]
    assert first["ran"] == [runs[0].name] and first["skipped"] == [runs[1].name, runs[2].name]


def test_a_run_finished_by_another_runner_meanwhile_is_not_run_again(grid, monkeypatch):
    from mars_nb import ablate
    runs = load_grid(grid)[:2]
    seen = []
    run_grid(runs[:1], execute=lambda r: seen.append(r.name), progress=False)     # the other runner finished run 0 ...
    real, looks = ablate.is_done, []

    def stale(run):                                                              # ... just after this one looked
        looks.append(run.name)
        return False if looks.count(run.name) == 1 else real(run)

    monkeypatch.setattr(ablate, "is_done", stale)
    s = run_grid(runs, execute=lambda r: seen.append(r.name), progress=False)
    assert seen == [runs[0].name, runs[1].name] and s["skipped"] == [runs[0].name] and s["ran"] == [runs[1].name]


def test_a_finished_run_with_other_parameters_is_reported_not_passed_off(grid, capsys):
    name = load_grid(grid)[0].name
    run_grid(load_grid(grid)[:1], execute=lambda r: None, progress=False)
    seen = []
    s = run_grid(load_grid(grid, steps=5)[:1], execute=lambda r: seen.append(r.name), progress=False)
    assert seen == [] and "finished earlier with other parameters (steps: 2 then, 5 now)" in s["failed"][name]
    assert "remove" in s["failed"][name]
    assert run_grid(load_grid(grid, device="cpu")[:1], execute=seen.append, progress=False)["skipped"] == [name]
    assert main([str(grid), "--dry-run", "--steps", "5"]) == 0
    assert f"changed  {name}" in capsys.readouterr().out


def test_cli_dry_run_and_bad_grid(grid, tmp_path, capsys):
    assert main([str(grid), "--dry-run", "--shard", "1/2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(l.startswith("todo") for l in lines)
    bad = tmp_path / "bad.yaml"
    bad.write_text("configs:\n  a: {mode: nonsense}\n")
    assert main([str(bad), "--dry-run"]) == 2
    assert "mode 'nonsense'" in capsys.readouterr().err


def test_the_report_is_told_the_whole_grid_even_from_a_shard(grid, monkeypatch, capsys):
    "The report hears which runs the grid has (so it can hold back unfinished regimes), not only this shard's."
    import mars_nb.report as report
    told = {}
    monkeypatch.setattr(report, "write_report", lambda root, **kw: told.update(root=root, **kw))
    assert main([str(grid), "--report-only", "--shard", "1/2"]) == 0
    runs = load_grid(grid)
    assert [r.name for r in told["expected"]] == [r.name for r in runs] and told["root"] == runs[0].out_dir.parent.parent
    assert told["datasets"] == ["craters", "nuclei"]


def test_a_config_may_run_on_some_datasets_only(grid):
    "A control that only means something where unlabelled crops are offered runs there alone."
    grid.write_text(grid.read_text() + "  nuclei-only: {mode: rotaug, datasets: [nuclei]}\n")
    runs = load_grid(grid)
    assert [r.name for r in runs if r.config == "nuclei-only"] == ["nuclei-nuclei-only-s0", "nuclei-nuclei-only-s1"]
    assert all("datasets" not in r.params for r in runs) and len(runs) == 10
    grid.write_text(grid.read_text().replace("datasets: [nuclei]", "datasets: [trees]"))
    with pytest.raises(GridError, match=r"grid.yaml:9: config 'nuclei-only' runs on datasets \['trees'\]: a non-empty "
                                        r"list of the grid's datasets \['craters', 'nuclei'\]"):
        load_grid(grid)


def test_several_grids_run_in_turn_and_share_one_report(grid, tmp_path, monkeypatch, capsys):
    "Two grids writing into one folder (the regime study and its Lite0 part) are one study: one report, told both."
    import mars_nb.report as report
    second = tmp_path / "second.yaml"
    second.write_text(GRID.format(out=tmp_path / "out").replace("[craters, nuclei]", "[trees]"))
    told = []
    monkeypatch.setattr(report, "write_report", lambda root, **kw: told.append((root, kw)))
    assert main([str(grid), str(second), "--report-only"]) == 0
    names = [r.name for r in load_grid(grid) + load_grid(second)]
    assert len(told) == 1 and [r.name for r in told[0][1]["expected"]] == names
    assert told[0][1]["datasets"] == ["craters", "nuclei", "trees"]
    capsys.readouterr()
    assert main([str(grid), str(second), "--dry-run"]) == 0 and len(capsys.readouterr().out.splitlines()) == 12
    assert main([str(grid), str(grid), "--dry-run"]) == 2                        # the same runs twice: refused
    assert "share run folders" in capsys.readouterr().err
    assert main([str(grid), str(second), "--slurm"]) == 2
    assert "one grid at a time" in capsys.readouterr().err


def test_status_says_where_a_grid_stands_per_dataset(grid, capsys):
    runs = load_grid(grid)                      # craters none s0 s1, nuclei none s0 s1, then mars-hybrid the same
    for r, s in ((runs[0], 600.0), (runs[1], 1200.0), (runs[4], 3600.0)):
        r.out_dir.mkdir(parents=True)
        (r.out_dir / "done.json").write_text(json.dumps({"name": r.name, "seconds": s}))
    runs[2].out_dir.mkdir(parents=True)         # nuclei-none-s0 begun, not finished
    assert main([str(grid), "--status", "--jobs", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    by = {line.split()[0]: line.split() for line in out[1:3]}
    # craters: 3 of 4 done; its mars-hybrid-s1 timed like craters-mars-hybrid-s0 (1 h)
    assert by["craters"][1:4] == ["3/4", "0", "1.0"]
    # nuclei: nothing done; none runs timed like craters' none runs (config + preset: 0.25 h), mars-hybrid like it: 1 h
    assert by["nuclei"][1:4] == ["0/4", "1", "2.5"]
    assert out[3].split()[:4] == ["all", "3/8", "1", "3.5"] and "~1.8 h with 2 runners" in out[3]


def test_jobs_runners_share_the_grid_each_run_once(tmp_path, capsys):
    """`--jobs 2` starts two real runners (papermill, one thread each) that split a small grid: every run is done
    by exactly one of them (one training attempt, one done.json), and the summary counts every run once."""
    p = tmp_path / "grid.yaml"
    p.write_text(f"out: {tmp_path / 'out'}\ndatasets: [nuclei]\nseeds: [0]\n"
                 "shared: {steps: 2, crop: 64, batch_size: 2, eval_angles: [0, 90]}\n"
                 "configs:\n  none: {mode: none}\n  rotaug: {mode: rotaug}\n")
    assert main([str(p), "--jobs", "2", "--no-report"]) == 0
    runs = load_grid(p)
    assert "2 ran, 0 skipped, 0 failed" in capsys.readouterr().out
    for r in runs:
        done = json.loads((r.out_dir / "done.json").read_text())
        assert done["name"] == r.name and (r.out_dir / "run.ipynb").exists()
        assert sorted(d.name for d in (r.out_dir / "logs").iterdir()) == ["attempt0"], r.name   # trained once
    assert main([str(p), "--jobs", "2", "--no-report"]) == 0                                    # all done: nothing runs
    assert "0 ran, 2 skipped, 0 failed" in capsys.readouterr().out


def test_jobs_must_be_positive(grid, capsys):
    assert main([str(grid), "--jobs", "0"]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err


def test_the_grid_bar_names_runs_and_their_steps(tmp_path):
    "The bar used to sit at '0/3 ?run/s' for minutes: it now says which runs are training and at which step."
    from mars_nb.ablate import run_step
    r = Run("craters-none-s0", "none", "craters", 0, {"steps": 600}, tmp_path / "r")
    assert run_step(r) == ""                                               # nothing logged yet
    (tmp_path / "r" / "logs" / "attempt0").mkdir(parents=True)
    (tmp_path / "r" / "logs" / "attempt1").mkdir(parents=True)
    (tmp_path / "r" / "logs" / "attempt0" / "metrics.csv").write_text("epoch,step,train/loss\n0,9,1.0\n0,19,0.9\n")
    (tmp_path / "r" / "logs" / "attempt1" / "metrics.csv").write_text("epoch,step,train/loss\n0,229,0.5\n0,239,0.4\n")
    assert run_step(r) == "step 240/600"                                   # the latest attempt's last step


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parent.parent / "grids").glob("*.yaml")))
def test_the_committed_grids_expand(name):
    "Every grid in grids/ is valid: each of its runs' parameters builds a configuration."
    from conftest import ROOT
    runs = load_grid(ROOT / "grids" / f"{name}.yaml")
    assert runs and len({r.name for r in runs}) == len(runs)


def test_the_regime_grid_offers_unlabelled_crops_where_labels_are_scarce():
    from conftest import ROOT
    from mars_nb.config import config_from_params
    runs = {r.name: config_from_params(**r.params) for r in load_grid(ROOT / "grids" / "regimes.yaml")}
    assert len(runs) == (7 * 8 + 2 * 5 + 4 * 4) * 5   # 8 configurations in 7 regimes; mars-off, rotaug-bn in the 5 with unlabelled
    # crops; the 3 re-weighted at 10 % labels and the centred pixel tap in the 4 label-scarce ones
    assert runs["trees-l10-mars-pixel-centred-x100-s1"].mars["stages"]["pixel_decoder"]["distance"] == "cosine_centred"
    for control in ("-mars-off-", "-rotaug-bn-"):
        assert {n.rsplit(control, 1)[0] for n in runs if control in n} == {
            "craters-l5", "craters-l10", "craters-l25", "craters-l100", "trees-l10"}
        assert all(runs[n].data.unlabelled for n in runs if control in n)
    assert {n.rsplit("-mars-hybrid-scarce-", 1)[0] for n in runs if "-mars-hybrid-scarce-" in n} == {
        "craters-l5", "craters-l10", "craters-l25", "trees-l10"}
    assert runs["craters-l10-rotaug-bn-s2"].train.bn_batches > 0 and runs["craters-l10-rotaug-s2"].train.bn_batches == 0
    l10 = runs["craters-l10-mars-pixel-s3"]
    assert l10.data.labelled == 0.1 and l10.data.unlabelled and l10.data.folds == 5
    unseen = runs["craters-unseen-rotaug-any-s0"]
    assert unseen.train.angles.values == unseen.train.view1_angles.values == [-45.0, 45.0]
    assert not runs["trees-l100-outcons-s0"].data.unlabelled and runs["trees-l10-outcons-s0"].data.labelled == 0.1


def test_the_lite0_regimes_join_the_regime_study_without_a_name_in_common():
    from conftest import ROOT
    from mars_nb.config import config_from_params
    lite0 = {r.name: r for r in load_grid(ROOT / "grids" / "regimes-lite0.yaml")}
    tiny = {r.name: r for r in load_grid(ROOT / "grids" / "regimes.yaml")}
    assert len(lite0) == 2 * 10 * 5 + 10 and not set(lite0) & set(tiny)  # 10 configurations (mars-off, rotaug-bn and
    assert {n for n in lite0 if "-x" in n} == {f"craters-l10-lite0-mars-pixel{c}-x100-s{s}"       # pseudo among them),
                                               for c in ("", "-centred") for s in range(5)}       # + 2 at 10 %
    assert {r.out_dir.parent for r in lite0.values()} == {r.out_dir.parent for r in tiny.values()}    # one report
    cfg = config_from_params(**lite0["craters-l10-lite0-mars-hybrid-s3"].params)
    assert cfg.model.preset == "lite0" and cfg.data.labelled == 0.1 and cfg.data.unlabelled
    off = config_from_params(**lite0["craters-l100-lite0-mars-off-s0"].params)
    assert off.data.unlabelled and off.mars["stages"]["backbone"]["weight"] == 0


def test_the_unseen_all_regime_turns_view_2_everywhere_and_keeps_labels_within_45_degrees():
    from conftest import ROOT
    from mars_nb.config import AnglePolicy, config_from_params
    grid = {r.name: r for r in load_grid(ROOT / "grids" / "regimes-unseen-all.yaml")}
    study = [r for g in ("regimes", "regimes-lite0") for r in load_grid(ROOT / "grids" / f"{g}.yaml")]
    assert len(grid) == 9 * 5 and not set(grid) & {r.name for r in study}    # 7 configurations, 2 more at x100
    assert {r.out_dir.parent for r in grid.values()} == {r.out_dir.parent for r in study}         # one report
    for name in ("craters-unseen-all-mars-pixel-s2", "craters-unseen-all-rotaug-s0", "craters-unseen-all-pseudo-s4"):
        cfg = config_from_params(**grid[name].params)
        assert cfg.train.angles == AnglePolicy("range", [0.0, 360.0]) and cfg.train.view1_angles is None
        assert cfg.train.label_angles == AnglePolicy("range", [-45.0, 45.0]) and cfg.data.folds == 5, name
        assert not cfg.data.unlabelled and cfg.data.labelled == 1.0, name


def test_an_attempt_removes_the_sockets_a_killed_kernel_left(grid, monkeypatch):
    import socket
    import papermill
    from mars_nb.ablate import execute
    run = load_grid(grid)[0]
    run.out_dir.mkdir(parents=True)
    left = socket.socket(socket.AF_UNIX)
    left.bind(str(run.out_dir / "kernel-ipc-1")); left.close()            # what a kernel killed mid-run leaves behind
    (run.out_dir / "config.yaml").write_text("kept: true\n")
    seen = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **kw: seen.append(sorted(p.name for p in run.out_dir.iterdir())))
    execute(run)
    assert seen == [["config.yaml"]]

"""The papermill template trains, evaluates and writes its files; bad parameters stop it before training."""
import json

import pytest

from conftest import ROOT

pm = pytest.importorskip("papermill")
TEMPLATE = ROOT / "nbs" / "experiments" / "run.ipynb"


def test_template_has_a_parameters_cell():
    import nbformat
    nb = nbformat.read(TEMPLATE, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "steps =" in tagged[0].source


def test_run_notebook_with_a_handful_of_steps(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    pm.execute_notebook(str(TEMPLATE), str(out / "run.ipynb"), kernel_name="python3", progress_bar=False, cwd=str(tmp_path),
                        parameters={"steps": 3, "mode": "mars", "mars": {"preset": "hybrid"}, "dataset": "nuclei",
                                    "eval_angles": [0, 90], "eval_split": "val", "out_dir": str(out)})
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "mars" and metrics["steps"] == 3 and 0 <= metrics["fg_iou_0"] <= 1
    assert metrics["split"] == "val"
    for f in ("config.yaml", "sweep.csv", "features.csv", "iou_vs_angle.png", "stage_maps.png", "model.safetensors",
              "tiles.npz"):
        assert (out / f).exists(), f
    # the per-tile confusion counts of the sweep, on the tiles of the split it was asked for
    import numpy as np
    from mars_nb.losses import resolve_config
    from mars_nb.config import RunConfig
    from mars_nb.pairs import dataset_for
    cfg = RunConfig.from_yaml(out / "config.yaml")
    assert cfg.eval.split == "val" and cfg.mars == resolve_config("hybrid")   # the resolved MARS config is recorded
    with np.load(out / "tiles.npz") as t:
        n_tiles = len(dataset_for(cfg).test_tiles("val", cfg.data.crop))
        assert t["confusion"].shape == (2, n_tiles, 2, 2) and t["angles"].tolist() == [0.0, 90.0]
    # the exploration notebook loads the finished run and shows it at any angle
    pm.execute_notebook(str(ROOT / "nbs" / "experiments" / "explore.ipynb"), str(tmp_path / "explore.ipynb"),
                        kernel_name="python3", progress_bar=False, cwd=str(tmp_path),
                        parameters={"run_dir": str(out), "angle": 30.0, "tile": 1})


def test_bad_parameter_stops_before_training(tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match="expected an integer"):
        pm.execute_notebook(str(TEMPLATE), str(tmp_path / "run.ipynb"), kernel_name="python3", progress_bar=False,
                            parameters={"steps": "ten", "out_dir": str(tmp_path)})
    assert not (tmp_path / "checkpoints").exists()


def test_report_notebook_rebuilds_the_committed_report_elsewhere(tmp_path):
    """The report notebook reads the committed runs and writes the whole report to `dest`, leaving reports/ alone."""
    reports = ROOT / "reports"
    before = (reports / "summary.csv").read_text()
    pm.execute_notebook(str(ROOT / "nbs" / "experiments" / "report.ipynb"), str(tmp_path / "report.ipynb"),
                        kernel_name="python3", progress_bar=False, cwd=str(tmp_path),
                        parameters={"root": str(reports), "dest": str(tmp_path / "out"), "panels": False})
    out = tmp_path / "out"
    figures = {p.name for p in (out / "figures").glob("*.png")}
    assert {"iou_vs_angle.png", "consistency_vs_angle.png", "summary_bars.png", "training_curves.png",
            "feature_consistency.png"} <= figures
    summary = (out / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("dataset,config") and len(summary) > 1
    assert "## Reading" in (out / "README.md").read_text()
    assert (reports / "summary.csv").read_text() == before


def test_report_notebook_without_runs_says_what_to_do(tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match="no finished run"):
        pm.execute_notebook(str(ROOT / "nbs" / "experiments" / "report.ipynb"), str(tmp_path / "report.ipynb"),
                            kernel_name="python3", progress_bar=False, cwd=str(tmp_path),
                            parameters={"root": str(tmp_path)})


# ---------------------------------------------------------------------------------------------
# the report's comparisons: per-tile confusion counts (tiles.npz), a tile bootstrap, verdicts with detectable effects

def test_template_parameters_are_the_run_parameters():
    "Every run parameter (folds, view1_angles and eval_split among them) is a parameter of the template, and only those."
    import ast
    import nbformat
    from mars_nb.config import RUN_PARAMS
    cell = next(c for c in nbformat.read(TEMPLATE, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    names = {t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign) for t in node.targets}
    assert names == set(RUN_PARAMS) | {"out_dir"}
    assert {"folds", "view1_angles", "eval_split"} <= names


def test_explore_finds_the_repository_from_anywhere_and_says_how_to_get_weights(tmp_path):
    "It failed unless run from its own folder, and pointed at the hours-long grid rather than the quick one."
    with pytest.raises(pm.PapermillExecutionError, match=r"reports/runs/craters-none-s9 has no model\.safetensors.*"
                                                          r"make reports-quick"):
        pm.execute_notebook(str(ROOT / "nbs" / "experiments" / "explore.ipynb"), str(tmp_path / "explore.ipynb"),
                            kernel_name="python3", progress_bar=False, cwd=str(tmp_path),
                            parameters={"run_dir": "reports/runs/craters-none-s9"})

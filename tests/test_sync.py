"""The package is generated from the notebooks: export and clean must leave no diff."""
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

BIN = Path(sys.executable).parent


def _snapshot(base: Path) -> dict[str, bytes]:
    files = list((base / "mars_nb").glob("*.py")) + list((base / "nbs").rglob("*.ipynb"))
    return {str(f.relative_to(base)): f.read_bytes() for f in files if ".ipynb_checkpoints" not in f.parts}


def test_export_and_clean_leave_no_diff(tmp_path):
    for name in ("nbs", "mars_nb"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    before = _snapshot(tmp_path)
    for cmd in ("nbdev-export", "nbdev-clean"):
        subprocess.run([str(BIN / cmd)], cwd=tmp_path, check=True, capture_output=True)
    after = _snapshot(tmp_path)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"out of sync with the notebooks (run `make export`): {changed}"


def test_readme_is_generated_from_index():
    venv = Path(sys.executable).parent.parent
    out = subprocess.run(["make", "-s", "print-readme", f"VENV={venv}"], cwd=ROOT, check=True, capture_output=True, text=True)
    assert (ROOT / "README.md").read_text() == out.stdout, "README.md is stale: run `make readme`"

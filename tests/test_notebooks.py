"""Every notebook in nbs/ is a test: it must run top to bottom (its asserts are checks).

Each notebook runs in its own process with `IN_TEST=1`, which the notebooks read to keep their
parameters small.
"""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb"))

RUN = "import sys; from nbdev.test import test_nb; ok, _ = test_nb(sys.argv[1]); sys.exit(0 if ok else 1)"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(nb):
    env = {**os.environ, "IN_TEST": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-c", RUN, str(nb)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{nb.name} failed:\n{proc.stderr[-6000:]}"

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


def test_committed_outputs_hold_nothing_that_changes_between_runs():
    """The chapters are committed with their outputs (`make chapters`), scrubbed so that a refresh shows in a diff only
    where a result changed: no execution counts, warnings, progress bars, widget ids, addresses or temporary folders."""
    import importlib.util
    import json
    spec = importlib.util.spec_from_file_location("chapters", ROOT / "tools" / "chapters.py")
    chapters = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chapters)
    for nb in NOTEBOOKS:
        for i, cell in enumerate(json.loads(nb.read_text())["cells"]):
            where = f"{nb.name} cell {i}"
            assert cell.get("execution_count") is None, where
            for out in cell.get("outputs", []):
                assert out.get("name") != "stderr" and chapters.WIDGET not in out.get("data", {}), where
                texts = [out.get("text", "")] + [out.get("data", {}).get(m, "") for m in ("text/plain", "text/html")]
                for t in texts:
                    t = "".join(t) if isinstance(t, list) else t
                    assert chapters.scrub_text(t) == t and "\r" not in t, f"{where}: {t[:200]!r}"

"""Run the chapters of `nbs/` top to bottom and keep their outputs: `make chapters` (or name some chapters).

A reader opening a chapter in JupyterLab or on a code host sees its figures, tables and printed checks without
running it. The outputs are scrubbed of what changes from one run to the next (execution counts, memory addresses,
temporary folders, progress bars, warnings, widget ids), so a refresh shows in a diff only where a result changed.
The test suite runs every chapter too, but in memory and with `IN_TEST=1`: it never rewrites them."""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from mars_nb.ablate import _kernel_manager          # local IPC sockets, as the grid's runs use

NBS = Path(__file__).resolve().parent.parent / "nbs"

WIDGET = "application/vnd.jupyter.widget-view+json"
VOLATILE = (                                              # (pattern, what stands in for it)
    (re.compile(r" at 0x[0-9a-fA-F]+"), " at 0x…"),          # object reprs
    (re.compile(r"[^\s'\"()]*/tmp\w{8}[^\s'\"()]*"), "<tmp>"),  # tempfile.mkdtemp() folders and what lies in them
)


def scrub_text(text: str) -> str:
    "`text` with the parts that change from run to run replaced."
    for pattern, stand_in in VOLATILE:
        text = pattern.sub(stand_in, text)
    return text


def scrub(nb) -> None:
    "Keep what a reader needs (stdout, results, figures, tables); drop stderr and widgets; scrub the rest."
    for cell in nb.cells:
        if cell.cell_type != "code": continue
        cell.execution_count = None
        kept = []
        for out in cell.outputs:
            if out.output_type == "stream" and out.name == "stderr": continue      # warnings and progress bars
            if WIDGET in out.get("data", {}): continue                             # ids differ on every run
            if out.output_type == "stream":
                out.text = scrub_text(out.text.split("\r")[-1] if "\r" in out.text else out.text)
            elif out.output_type == "error":
                raise RuntimeError(f"cell raised {out.ename}: {out.evalue}")
            else:
                if out.output_type == "execute_result": out.execution_count = None
                for mime in ("text/plain", "text/html", "text/markdown"):
                    if mime in out.get("data", {}): out.data[mime] = scrub_text(out.data[mime])
            kept.append(out)
        cell.outputs = kept


def refresh(path: Path, timeout: int = 1800) -> float:
    "Execute chapter `path` in place (its folder as working directory), scrub it; returns the seconds it took."
    nb = nbformat.read(path, as_version=4)
    t0 = time.time()
    with contextlib.chdir(path.parent):         # the kernel's folder, where client and kernel meet on IPC sockets
        NotebookClient(nb, timeout=timeout, kernel_name="python3", kernel_manager_class=_kernel_manager()).execute()
    scrub(nb)
    nbformat.write(nb, path)
    return time.time() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("chapters", nargs="*", help="notebook names in nbs/ (default: all)")
    a = ap.parse_args(argv)
    paths = [NBS / (c if c.endswith(".ipynb") else c + ".ipynb") for c in a.chapters] or sorted(NBS.glob("*.ipynb"))
    if missing := [p.name for p in paths if not p.exists()]:
        ap.error(f"no chapter(s) {missing} in {NBS}")
    os.environ.pop("IN_TEST", None); os.environ.pop("MPLBACKEND", None)    # the full chapters, figures inline
    for p in paths:
        print(f"{p.name}: {refresh(p):.0f} s", flush=True)
    subprocess.run([Path(sys.executable).parent / "nbdev-clean"], check=True, cwd=NBS.parent)  # the house format
    return 0


if __name__ == "__main__":
    sys.exit(main())

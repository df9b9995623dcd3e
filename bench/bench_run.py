"""One whole default run: the reference path against the fast one, side by side.

What a researcher waits for is not a training step but a run: 600 training steps, the rotation sweep,
feature consistency and the run notebook's figures, executed through papermill as `mars-ablate` runs
it. This script times exactly that, for the reference path (`channels_last: false`, the code that
produced the committed results) and the fast path (`channels_last: true`), and writes

    run_seconds.<config>.<path>   wall time of the run (done.json `seconds`)
    run_speedup.<config>          reference seconds / fast seconds: throughput of the fast path over the reference
    run_speedup                   geometric mean over the configurations                          (goal >= 2.0)

Method
- One `mars-ablate --jobs 2` grid on the craters (fold 0, seed 0) with the configurations of the
  default grid named in `--config` (default `rotaug` and `mars-hybrid`), each twice: reference and
  fast, listed next to each other. The two runners take runs in that order, so a reference run and
  its fast twin start together and share the machine alike (one core each on 2 cores, as
  `make reports` runs); when the fast one ends first, the next run starts beside the slower one, so
  every run has a neighbour except, for a while, the last.
- The runs go to a temporary folder (`--keep DIR` to keep them); nothing is cached between runs.
- The result is merged into `--out` (default reports/bench.json) beside the step ratios that
  `bench_mars.py` writes there; run it after it (`make bench` does).

Usage: python bench/bench_run.py [--steps 600] [--config rotaug --config mars-hybrid] [--out reports/bench.json]
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PATHS = {"reference": False, "fast": True}          # path name -> channels_last
GOAL = 2.0


def bench_grid(configs: list[str], steps: int) -> dict:
    "The grid: the default grid's shared settings and the named configurations, each on both paths, twins adjacent."
    default = yaml.safe_load((ROOT / "grids" / "default.yaml").read_text())
    unknown = sorted(set(configs) - set(default["configs"]))
    if unknown: raise SystemExit(f"unknown configuration(s) {unknown}; the default grid has {list(default['configs'])}")
    runs = {f"{c}-{p}": {**default["configs"][c], "channels_last": cl} for c in configs for p, cl in PATHS.items()}
    return {"datasets": ["craters"], "seeds": [0], "shared": {**default["shared"], "steps": steps},
            "per_dataset": default.get("per_dataset", {}), "configs": runs}


def measure(configs: list[str], steps: int, work: Path) -> dict:
    "Run the grid with two runners and read every run's wall time."
    grid = work / "grid.yaml"
    grid.write_text(yaml.safe_dump(bench_grid(configs, steps), sort_keys=False))
    cmd = [str(Path(sys.executable).parent / "mars-ablate"), str(grid), "--jobs", "2", "--out", str(work), "--no-report"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0: raise SystemExit(f"the benchmark grid failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    res = {}
    for c in configs:
        for p in PATHS:
            res[f"run_seconds.{c}.{p}"] = json.loads((work / "runs" / f"craters-{c}-{p}-s0" / "done.json").read_text())["seconds"]
        res[f"run_speedup.{c}"] = res[f"run_seconds.{c}.reference"] / res[f"run_seconds.{c}.fast"]
    res["run_speedup"] = math.exp(sum(math.log(res[f"run_speedup.{c}"]) for c in configs) / len(configs))
    res["run_steps"] = steps
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=600, help="training steps of each run (default 600, as the default grid)")
    ap.add_argument("--config", action="append", help="a configuration of grids/default.yaml (repeatable; default "
                    "rotaug and mars-hybrid)")
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench.json"), help="JSON file to merge the results into")
    ap.add_argument("--keep", help="keep the runs in this folder (default: a temporary one)")
    a = ap.parse_args(argv)
    if a.steps < 1: ap.error(f"--steps must be >= 1, got {a.steps}")
    configs = a.config or ["rotaug", "mars-hybrid"]
    if a.keep:
        Path(a.keep).mkdir(parents=True, exist_ok=True)
        res = measure(configs, a.steps, Path(a.keep))
    else:
        with tempfile.TemporaryDirectory() as tmp: res = measure(configs, a.steps, Path(tmp))
    out = Path(a.out)
    merged = {**(json.loads(out.read_text()) if out.exists() else {}), **res}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=1) + "\n")
    print(f"{'run':<22}{'reference s':>13}{'fast s':>9}{'speedup':>9}")
    for c in configs:
        print(f"{c:<22}{res[f'run_seconds.{c}.reference']:>13.1f}{res[f'run_seconds.{c}.fast']:>9.1f}"
              f"{res[f'run_speedup.{c}']:>9.2f}")
    print(f"run_speedup (geometric mean) {res['run_speedup']:.2f}  goal >= {GOAL}  -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does the fast path give the same science? Runs of the fast path against their reference twins, paired by seed.

A faster path (channels-last convolutions) computes the same maths in another order, so its rounding differs and
a 600-step training drifts onto another trajectory: a fast run is a re-run of its reference twin with other
training noise, on the same fold, config and seed. The question is whether the metrics shift as a whole. For each
configuration and metric this script writes the mean paired difference (fast - reference) with its 95 % Student-t
interval, and the training noise it implies (the standard deviation of the paired differences over sqrt 2: how much
one run moves when only its rounding changes), beside the spread across replicates of the reference (folds and
seeds together) for scale.

    reports/fastpath/same_science.json   one row per (config, metric)
    reports/fastpath/README.md           the same as a table, with the reading

Usage: python bench/same_science.py [--reference reports] [--fast reports/fastpath]
(after `mars-ablate grids/fastpath.yaml`; `make same-science` runs both)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from mars_nb.results import collect, mean_ci

ROOT = Path(__file__).resolve().parent.parent
METRICS = {"fg_iou_mean": "IoU mean", "fg_iou_0": "IoU 0°", "fg_iou_worst": "IoU worst", "miou_mean": "mIoU mean",
           "consistency_mean": "consistency"}


def paired_paths(reference: pd.DataFrame, fast: pd.DataFrame, metrics=tuple(METRICS)) -> pd.DataFrame:
    """Per (dataset, config, metric) of the `fast` runs: n pairs (same dataset, config and seed in `reference`),
    mean paired difference fast - reference and its 95 % CI half-width, the training noise sd(diff)/sqrt 2, and the
    standard deviation of the reference across its paired seeds."""
    key = ["dataset", "config", "seed"]
    both = fast.merge(reference, on=key, suffixes=("_fast", "_ref"), how="left")
    missing = both[both[f"{metrics[0]}_ref"].isna()]
    if len(missing): raise ValueError(f"no reference twin for {missing[key].to_dict('records')}")
    rows = []
    for (dataset, config), g in both.groupby(["dataset", "config"], sort=False):
        for m in metrics:
            d = (g[f"{m}_fast"] - g[f"{m}_ref"]).to_numpy(float)
            mean, ci, n = mean_ci(d)
            rows.append({"dataset": dataset, "config": config, "metric": m, "n": n, "diff": mean, "ci": ci,
                         "training_noise": float(d.std(ddof=1) / np.sqrt(2)) if n > 1 else float("nan"),
                         "replicate_sd": float(g[f"{m}_ref"].std(ddof=1)) if n > 1 else float("nan")})
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    "The table and its reading: a metric moved when its interval excludes 0."
    lines = ["| dataset | config | metric | n | fast - reference [95 % CI] | training noise (sd) | replicate sd |",
             "|---|---|---|---:|---|---:|---:|"]
    for r in table.itertuples():
        lines.append(f"| {r.dataset} | {r.config} | {METRICS.get(r.metric, r.metric)} | {r.n} | {r.diff:+.4f} "
                     f"[{r.diff - r.ci:+.4f}, {r.diff + r.ci:+.4f}] | {r.training_noise:.4f} | {r.replicate_sd:.4f} |")
    moved = table[(table["diff"] - table["ci"] > 0) | (table["diff"] + table["ci"] < 0)]
    verdict = ("No metric moved: every interval contains 0." if moved.empty else
               "Moved (interval excludes 0): " + ", ".join(f"{r.config} {METRICS.get(r.metric, r.metric)}"
                                                          for r in moved.itertuples()) + ".")
    widest = table.loc[table["ci"].idxmax()]
    return "\n".join([*lines, "", verdict + f" The widest interval is ±{widest.ci:.4f} ({widest.config}, "
                      f"{METRICS.get(widest.metric, widest.metric)}): a shift of the fast path larger than that would "
                      "have been seen."])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", default=str(ROOT / "reports"), help="folder whose runs/ holds the reference runs")
    ap.add_argument("--fast", default=str(ROOT / "reports" / "fastpath"), help="folder whose runs/ holds the fast runs")
    a = ap.parse_args(argv)
    table = paired_paths(collect(a.reference)[0], collect(a.fast)[0])
    fast = Path(a.fast)
    (fast / "same_science.json").write_text(json.dumps(table.to_dict("records"), indent=1) + "\n")
    text = markdown(table)
    (fast / "README.md").write_text(
        "# The fast path's science check\n\nEach run of `grids/fastpath.yaml` (channels-last convolutions) paired with "
        "its twin of the default grid (`grids/default.yaml`, the reference path): same dataset, configuration, seed "
        "and fold. Written by `bench/same_science.py`.\n\n" + text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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


def _triples(text: str) -> set[tuple[float, float, float]]:
    "Every 'difference [low, high]' quoted in `text` (signs as + - or the typographic minus)."
    import re
    num = r"([+\-−]?\d+\.\d{3})"
    return {tuple(float(x.replace("−", "-")) for x in m) for m in re.findall(rf"{num} \[{num}, {num}\]", text)}


def test_every_interval_the_readme_quotes_is_in_a_committed_report():
    "A number in the README comes from reports/: each quoted difference and interval is a row of a comparisons.csv."
    import pandas as pd
    rows = set()
    for f in (ROOT / "reports").rglob("comparisons.csv"):
        c = pd.read_csv(f)
        rows |= {(round(d, 3), round(lo, 3), round(hi, 3)) for d, lo, hi in zip(c["diff"], c["lo"], c["hi"])}
    quoted = _triples((ROOT / "README.md").read_text())
    assert len(quoted) >= 10, "the README quotes its comparisons"
    stray = quoted - rows
    assert not stray, f"README intervals not found in any reports/**/comparisons.csv: {sorted(stray)}"
    assert _triples("x −0.041 [−0.093, +0.004] y +0.5 [1.0, 2.0]") == {(-0.041, -0.093, 0.004)}


def test_the_study_grids_use_the_weights_val_chose():
    """Every consistency weight in the study grids is the one `choose_weights` reads off a committed val grid: at full
    labels (reports/weights/) for every tap and control, at 10 % labels (reports/weights-l10/) for the taps the regime
    study re-weights where labels are scarce — exactly those whose choice changed (on Lite0, some of them), named by the
    multiplier."""
    import pandas as pd
    import yaml
    from mars_nb.results import weight_multiplier
    from mars_nb.report import choose_weights

    def chosen(report):
        c = choose_weights(pd.read_csv(ROOT / "reports" / report / "weight_curves.csv"))
        return dict(zip(c["tap"], c["weight"]))

    def weights(cfg): return {k: v["weight"] for k, v in cfg["mars"]["stages"].items()}

    stage = {"backbone": "backbone", "pixel": "pixel_decoder", "attention": "attention"}
    full, scarce = chosen("weights"), chosen("weights-l10")
    grids = {n: yaml.safe_load((ROOT / "grids" / f"{n}.yaml").read_text())["configs"]
             for n in ("default", "regimes", "regimes-lite0", "regimes-unseen-all")}
    for name, configs in grids.items():
        for tap, key in stage.items():
            if name != "regimes-lite0" or f"mars-{tap}" in configs:          # Lite0 runs fewer taps
                assert weights(configs[f"mars-{tap}"]) == {key: full[tap]}, (name, tap)
        assert weights(configs["mars-hybrid"]) == {stage[t]: full[t] for t in stage}
        assert weights(configs["outcons"]) == {"output": full["output"]}
        if "mars-paper" in configs: assert weights(configs["mars-paper"]) == {"backbone": full["paper"]}
    configs = grids["regimes"]
    assert weights(configs.pop("mars-hybrid-scarce")) == {stage[t]: scarce[t] for t in stage}
    changed = {t for t in stage if scarce[t] != full[t]}
    # the pixel-decoder tap on the centred cosine exists only as a scarce-label tap, its multiplier on the pixel base
    centred = {"pixel-centred": "pixel"} if "pixel-centred" in scarce else {}
    reweighted = {n: weight_multiplier(n) for n in configs if weight_multiplier(n)[1] is not None}
    assert {name[len("mars-"):] for name, _ in reweighted.values()} == changed | set(centred)
    lite0 = {n: weight_multiplier(n) for g in ("regimes-lite0", "regimes-unseen-all") for n in grids[g]
             if weight_multiplier(n)[1] is not None}                    # the other grids: some of the same taps
    assert lite0 and {name[len("mars-"):] for name, _ in lite0.values()} <= changed | set(centred)
    for g in ("regimes-lite0", "regimes-unseen-all"):
        same = lambda a, b: (a["mode"], a["mars"]) == (b["mode"], b["mars"])
        assert all(same(configs.get(n, grids[g][n]), grids[g][n]) for n in grids[g] if n in lite0), g   # one meaning
    configs = {**configs, **grids["regimes-lite0"], **grids["regimes-unseen-all"]}
    for n, (name, mult) in {**reweighted, **lite0}.items():
        tap = name[len("mars-"):]
        base = centred.get(tap, tap)
        assert weights(configs[n]) == {stage[base]: scarce[tap]} and mult == round(scarce[tap] / full[base]), n
        distances = {v.get("distance", "cosine") for v in configs[n]["mars"]["stages"].values()}
        assert distances == ({"cosine_centred"} if tap in centred else {"cosine"} if base != "attention" else {"js"}), n

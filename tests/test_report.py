"""The report chapters (08_results, 08a_compare, 08b_report): runs gathered into a table, paired tile-bootstrap
comparisons checked against an independent foreground IoU, the regime maps, and the report written from them."""
import json

import pytest


def test_verdict_words():
    from mars_nb.compare import verdict
    assert verdict(0.05, 0.01, 0.09, 3, 0.02) == "helps: +0.050 [+0.010, +0.090], detectable ≥ 0.020"
    assert verdict(-0.05, -0.09, -0.01, 3, 0.02) == "hurts: -0.050 [-0.090, -0.010], detectable ≥ 0.020"
    assert verdict(0.01, -0.02, 0.04, 3) == "no detectable difference: +0.010 [-0.020, +0.040]"   # mde unknown: not said
    assert verdict(0.01, float("nan"), float("nan"), 1).startswith("+0.010 on one replicate")
    assert verdict(float("nan"), 0.0, 0.0, 3) == "not comparable"


def _fg_iou(conf):
    "Independent: foreground IoU (class 1 of 2) of counts [..., angles, 2, 2] pooled already, mean over angles."
    tp, fn, fp = conf[..., 1, 1], conf[..., 1, 0], conf[..., 0, 1]
    return (tp / (tp + fn + fp)).mean(-1)


def _fake_root(root, configs, seeds=(0, 1, 2), tiles=6, angles=(0.0, 90.0), without_tiles=(), dataset="craters",
               train=None):
    """Finished runs of made-up per-tile counts: config -> true positives added per tile (better configs, more);
    `train`: the runs' TrainConfig (its angle policy decides which angles they saw)."""
    import numpy as np
    import pandas as pd
    from mars_nb.evaluate import write_sweep
    from mars_nb.config import DataConfig, RunConfig
    for ci, (config, bonus) in enumerate(configs.items()):
        for seed in seeds:
            rng = np.random.default_rng([ci, seed])
            conf = np.zeros((len(angles), tiles, 2, 2), np.int64)
            conf[..., 1, 1] = rng.integers(20, 40, (len(angles), tiles)) + bonus
            conf[..., 1, 0] = rng.integers(5, 20, (len(angles), tiles))
            conf[..., 0, 1] = rng.integers(5, 20, (len(angles), tiles))
            conf[..., 0, 0] = 400 - conf.sum((-2, -1))
            pooled = conf.sum(1)
            fg = pooled[:, 1, 1] / (pooled[:, 1, 1] + pooled[:, 1, 0] + pooled[:, 0, 1])
            bg = pooled[:, 0, 0] / (pooled[:, 0, 0] + pooled[:, 1, 0] + pooled[:, 0, 1])
            df = pd.DataFrame({"angle": list(angles), "miou": (fg + bg) / 2, "fg_iou": fg, "consistency": 1.0,
                               "n_tiles": tiles, "iou_background": bg, "iou_crater": fg})
            name = f"{dataset}-{config}-s{seed}"
            out = root / "runs" / name
            write_sweep(df, out, extra={"name": name, "dataset": dataset, "seed": seed},
                        confusion=None if config in without_tiles else conf)
            kw = {"train": train} if train is not None else {}
            RunConfig(name=name, data=DataConfig(dataset="craters"), **kw).to_yaml(out / "config.yaml")
            (out / "done.json").write_text(json.dumps({"name": name, "config": config, "dataset": dataset, "seed": seed}))
    return root


def test_compare_pairs_replicates_and_tiles(tmp_path):
    import numpy as np
    from mars_nb.results import collect
    from mars_nb.compare import MDE_FACTOR, compare, run_confusion, tile_bootstrap
    root = _fake_root(tmp_path, {"rotaug": 0, "mars-x": 15, "nolog": 0}, without_tiles=("nolog",))
    runs, _ = collect(root)
    c = compare(root, runs, "mars-x", "rotaug", "craters", n=500)
    ca = np.stack([run_confusion(root, f"craters-mars-x-s{s}") for s in range(3)])
    cb = np.stack([run_confusion(root, f"craters-rotaug-s{s}") for s in range(3)])
    expect = float(np.mean(_fg_iou(ca.sum(2))) - np.mean(_fg_iou(cb.sum(2))))
    assert c["n"] == 3 and c["diff"] == pytest.approx(expect, abs=1e-12) and c["diff"] > 0.1
    assert c["lo"] < c["diff"] < c["hi"] and c["lo"] > 0
    assert c["mde"] == pytest.approx(MDE_FACTOR * c["se"]) and 2.7 < MDE_FACTOR < 2.9 and c["se"] > 0
    same = compare(root, runs, "rotaug", "rotaug", "craters", n=200)     # a configuration against itself: exactly 0
    assert same["diff"] == 0 and same["lo"] == same["hi"] == 0
    assert np.isnan(compare(root, runs, "nolog", "rotaug", "craters")["diff"])   # no tiles.npz: nothing to bootstrap
    with pytest.raises(ValueError, match="same replicates and tiles"):
        tile_bootstrap(ca, cb[:, :, :3])


def test_comparisons_read_each_config_against_rotaug_and_the_strongest_control(tmp_path):
    from mars_nb.results import collect, summary_table
    from mars_nb.compare import comparisons
    from mars_nb.report import write_report
    root = _fake_root(tmp_path / "grid", {"none": -10, "rotaug": 0, "outcons": 8, "mars-x": 20})
    runs, _ = collect(root)
    table = summary_table(runs)
    comps = comparisons(root, runs, table)
    pairs = [(r.config, r.control) for r in comps.itertuples()]
    assert pairs == [("none", "rotaug"), ("none", "outcons"), ("rotaug", "outcons"), ("outcons", "rotaug"),
                     ("mars-x", "rotaug"), ("mars-x", "outcons")]
    assert (comps.set_index(["config", "control"]).loc[("mars-x", "outcons"), "lo"] > 0)
    write_report(root, panels=False, dest=tmp_path / "out")
    readme = (tmp_path / "out" / "README.md").read_text()
    assert (tmp_path / "out" / "comparisons.csv").exists() and "## Comparisons" in readme
    assert "- `mars-x`: helps: +" in readme and "detectable ≥" in readme


def test_a_regime_trained_on_some_angles_is_read_on_the_angles_it_never_saw(tmp_path):
    import numpy as np
    import pandas as pd
    from mars_nb.results import angle_set, collect, seen_angles, summary_table
    from mars_nb.compare import comparisons, regime_effects
    from mars_nb.report import plot_metric_vs_angle, write_report
    from mars_nb.config import AnglePolicy, TrainConfig
    angles = (0.0, 30.0, 90.0, 180.0, 270.0, 330.0)
    limited = TrainConfig(mode="rotaug", angles=AnglePolicy("range", [-45.0, 45.0]))
    root = _fake_root(tmp_path / "g", {"rotaug": 0, "outcons": 5, "mars-x": 15}, angles=angles, dataset="craters-unseen",
                      train=limited)
    _fake_root(root, {"rotaug": 0, "rotaug-any": 3, "mars-x": -6}, angles=angles, dataset="craters-full",
               train=TrainConfig(mode="rotaug", angles=AnglePolicy("range", [0.0, 360.0])))
    run = root / "runs" / "craters-unseen-rotaug-s0"
    np.testing.assert_array_equal(seen_angles(run, angles), [True, True, False, False, False, True])   # -45..45 mod 360
    np.testing.assert_array_equal(angle_set(run, angles, "reversed"), [False, False, False, True, False, False])  # 135..225
    with pytest.raises(ValueError, match="not one of"): angle_set(run, angles, "upright")
    runs, sweeps = collect(root)
    fig = plot_metric_vs_angle(sweeps)
    shaded = {ax.get_title(): [p.get_x() + p.get_width() / 2 for p in ax.patches] for ax in fig.axes if ax.get_title()}
    assert shaded == {"craters-unseen": [0.0, 30.0, 330.0], "craters-full": []}, "the angles seen in training, shaded"
    u = runs[runs["dataset"] == "craters-unseen"]
    sw = pd.read_csv(run / "sweep.csv")
    assert u.set_index("run").loc["craters-unseen-rotaug-s0", "fg_iou_unseen"] == sw["fg_iou"][[2, 3, 4]].mean()
    assert u.set_index("run").loc["craters-unseen-rotaug-s0", "fg_iou_reversed"] == sw["fg_iou"][3]          # 180° only
    assert runs[runs["dataset"] == "craters-full"]["fg_iou_unseen"].isna().all(), "seen everything: no split"
    table = summary_table(runs)
    comps = comparisons(root, runs, table)
    assert set(comps[comps["dataset"] == "craters-unseen"]["angles"]) == {"all", "unseen", "reversed"}
    at180 = comps[(comps["dataset"] == "craters-unseen") & (comps["angles"] == "reversed")].iloc[0]
    assert at180["diff"] == pytest.approx(                                  # the paired difference at 180° alone
        u[u["config"] == at180["config"]]["fg_iou_reversed"].mean() - u[u["config"] == at180["control"]]["fg_iou_reversed"].mean())
    assert set(comps[comps["dataset"] == "craters-full"]["angles"]) == {"all"}
    eff = regime_effects(comps, table).set_index("dataset")
    assert eff.loc["craters-unseen", "angles"] == "unseen" and eff.loc["craters-unseen", "control"] == "outcons"
    assert eff.loc["craters-full", "control"] == "rotaug-any" and eff.loc["craters-full", "hi"] < 0
    assert list(eff["config"]) == ["mars-x", "mars-x"], "controls are the reference, not cells"
    write_report(root, panels=False)
    readme = (root / "README.md").read_text()
    assert (root / "figures" / "regime_map.png").exists() and "regime_map.png" in readme
    rot = regime_effects(comps, table, ("mars-off", "rotaug")).set_index("dataset")    # no mars-off here: rotaug
    assert set(rot["control"]) == {"rotaug"} and rot.loc["craters-unseen", "angles"] == "unseen"
    assert rot.loc["craters-full", "lo"] < 0 < rot.loc["craters-unseen", "lo"]         # mars-x: -6 there, +15 here
    assert readme.index("regime_map.png") < readme.index("regime_map_consistency.png") < readme.index("## Summary")
    assert "IoU unseen" in readme and "over the angles no run was trained on" in readme and "| unseen |" in readme
    assert "IoU reversed" in readme and "a half-turn from trained ones" in readme and "| reversed |" in readme
    lines = readme.splitlines()                      # each map's numbers below its figure, a column per regime
    at = lines.index("| config | craters-full − rotaug-any | craters-unseen − outcons (unseen angles) |")
    assert lines.index("![regime_map.png](figures/regime_map.png)") == at - 2
    f, u = (eff.loc[d] for d in ("craters-full", "craters-unseen"))
    assert lines[at + 2] == (f"| mars-x | **{f['diff']:+.3f}** [{f['lo']:+.3f}, {f['hi']:+.3f}] ≥ {f['mde']:.3f} | "
                             f"**{u['diff']:+.3f}** [{u['lo']:+.3f}, {u['hi']:+.3f}] ≥ {u['mde']:.3f} |")
    assert "| config | craters-full − rotaug | craters-unseen − rotaug (unseen angles) |" in lines     # the second map
    assert lines[at + 4].startswith("2 of 2 cells exclude zero (1 above, 1 below)"), "and what chance alone would give"


def test_the_report_gives_every_class_by_name():
    "Per-class IoU used to exist only in each run's sweep.csv; the report showed an undefined 'foreground IoU'."
    import pandas as pd
    from mars_nb.results import class_iou_markdown
    runs = pd.DataFrame({"dataset": ["cells"] * 4, "config": ["rotaug", "rotaug", "mars", "mars"], "seed": [0, 1, 0, 1],
                         "iou_background_mean": [0.9, 0.92, 0.91, 0.93], "iou_nucleus_mean": [0.5, 0.52, 0.6, 0.62],
                         "iou_membrane_mean": [0.3, 0.32, 0.2, 0.22]})
    text = class_iou_markdown(runs, ["rotaug", "mars"])
    assert "| config | background | nucleus | membrane |" in text
    assert "| rotaug | 0.910 ± 0.127 | 0.510 ± 0.127 | 0.310 ± 0.127 |" in text


def test_a_regime_still_running_is_tabled_but_not_compared(tmp_path):
    import pandas as pd
    from types import SimpleNamespace
    from mars_nb.results import collect
    from mars_nb.report import unfinished, write_report
    root = _fake_root(tmp_path / "g", {"rotaug": 0, "outcons": 5, "mars-x": 15}, dataset="craters-a")
    _fake_root(root, {"rotaug": 0, "mars-x": 15}, seeds=(0,), dataset="craters-b")   # outcons not begun, mars-x 1 of 3
    grid = [SimpleNamespace(name=f"{d}-{c}-s{s}", dataset=d) for d in ("craters-a", "craters-b")
            for c in ("rotaug", "outcons", "mars-x") for s in (0, 1, 2)]
    runs, _ = collect(root)
    assert unfinished(runs, grid) == {"craters-b": (2, 9)} and unfinished(runs, grid[:9]) == {}
    write_report(root, panels=False)                       # not told the grid: craters-b's lone runs are compared ...
    assert "craters-b" in set(pd.read_csv(root / "comparisons.csv")["dataset"])
    write_report(root, panels=False, expected=grid)        # ... told: tabled, but neither compared nor read
    assert (root / "figures" / "regime_map.png").exists()   # craters-a is whole: mapped
    readme = (root / "README.md").read_text()
    assert set(pd.read_csv(root / "comparisons.csv")["dataset"]) == {"craters-a"}
    assert "**In progress.** Still running: craters-b (2 of 9)." in readme
    assert "**craters-a.**" in readme and "**craters-b.**" not in readme
    assert set(pd.read_csv(root / "summary.csv")["dataset"]) == {"craters-a", "craters-b"}
    write_report(root, panels=False, expected=grid + [SimpleNamespace(name="craters-a-mars-y-s0", dataset="craters-a")])
    assert not (root / "comparisons.csv").exists(), "nothing whole to compare: no table left from the last report"
    assert not (root / "figures" / "regime_map.png").exists(), "nor a map"
    assert "## Comparisons" not in (root / "README.md").read_text()


def test_a_report_says_which_tiles_it_scored(tmp_path):
    "Runs evaluated on the val band (the weight sweep) are reported as such, not as test results."
    from mars_nb.report import write_report
    root = _fake_root(tmp_path / "g", {"rotaug": 0, "mars-x": 5}, seeds=(0, 1))
    write_report(root, panels=False)
    assert "on held-out test tiles." in (root / "README.md").read_text()
    for m in root.glob("runs/*/metrics.json"):
        m.write_text(json.dumps({**json.loads(m.read_text()), "split": "val"}))
    write_report(root, panels=False)
    assert "on held-out val tiles." in (root / "README.md").read_text()


def test_the_replicates_figure_draws_every_run_and_joins_each_replicate(tmp_path):
    import numpy as np
    from mars_nb.results import collect
    from mars_nb.report import plot_replicates
    root = _fake_root(tmp_path, {"rotaug": 0, "mars-x": 15})
    runs, _ = collect(root)
    ax = plot_replicates(runs, order=["rotaug", "mars-x"]).axes[0]
    dots = np.concatenate([c.get_offsets() for c in ax.collections])
    assert len(dots) == len(runs) == 6 and len(ax.lines) == 3                  # a dot per run, a line per seed
    by_seed = runs.pivot_table(index="seed", columns="config", values="fg_iou_mean")[["rotaug", "mars-x"]]
    np.testing.assert_allclose(sorted(l.get_ydata()[1] - l.get_ydata()[0] for l in ax.lines),
                               sorted(by_seed["mars-x"] - by_seed["rotaug"]))  # each line joins one seed's runs


def test_a_tap_is_read_against_mars_off_where_the_regime_has_it(tmp_path):
    "mars-off (the same training, consistency at 0) is what isolates the term: every config is compared with it."
    from mars_nb.results import collect, summary_table
    from mars_nb.compare import comparisons, regime_effects
    # pseudo is the strongest control here, so mars-off is compared with because it is a reference, not the strongest
    root = _fake_root(tmp_path / "g", {"rotaug": 0, "mars-off": 10, "pseudo": 25, "mars-x": 12}, dataset="craters-l10")
    _fake_root(root, {"rotaug": 0, "mars-x": 12}, dataset="craters-unseen")
    runs, _ = collect(root)
    table = summary_table(runs)
    comps = comparisons(root, runs, table)
    l10 = comps[comps["dataset"] == "craters-l10"]
    assert set(l10[l10["config"] == "mars-x"]["control"]) == {"rotaug", "mars-off", "pseudo"}
    assert set(l10[l10["config"] == "rotaug"]["control"]) == {"mars-off", "pseudo"}
    eff = regime_effects(comps, table, ("mars-off", "rotaug")).set_index("dataset")
    assert eff.loc["craters-l10", "control"] == "mars-off" and eff.loc["craters-unseen", "control"] == "rotaug"
    vs_rotaug = l10.set_index(["config", "control"]).loc[("mars-x", "rotaug"), "diff"]
    assert abs(eff.loc["craters-l10", "diff"]) < vs_rotaug / 3          # most of what mars-x gains, mars-off has


def test_rotaug_bn_is_a_reference_and_never_a_column_of_the_map(tmp_path):
    "Every configuration is compared with rotaug-bn where a regime has it; as a control it is no cell of a regime map."
    from mars_nb.results import collect, summary_table
    from mars_nb.compare import comparisons, regime_effects
    root = _fake_root(tmp_path / "g", {"rotaug": 0, "rotaug-bn": 5, "pseudo": 25, "mars-x": 12}, dataset="craters-l10")
    runs, _ = collect(root)
    table = summary_table(runs)
    comps = comparisons(root, runs, table)
    assert set(comps[comps["config"] == "mars-x"]["control"]) == {"rotaug", "rotaug-bn", "pseudo"}
    assert set(regime_effects(comps, table)["config"]) == {"mars-x"}


def test_the_shortcut_check_finds_the_shared_component_of_a_committed_pixel_run():
    """The committed val run of the pixel-decoder tap at x100 agrees across views through a component every pixel
    shares (its coarsest map almost all spatial mean, cosine near 1, centred cosine far below); at weight 0 not."""
    import pandas as pd
    from conftest import ROOT
    from mars_nb.report import shortcut_check, shortcut_markdown
    root = ROOT / "reports" / "weights-l10"
    if not (root / "runs" / "craters-l10-pixel-x100-s0" / "model.safetensors").exists():
        pytest.skip("run weights are not committed (.gitignore): `make weights` recreates them")
    runs = pd.read_csv(root / "runs.csv")
    check = shortcut_check(root, runs[runs["run"].isin(["craters-l10-pixel-x100-s0", "craters-l10-mars-off-s0"])],
                           angles=(90.0,), n_tiles=2).set_index(["config", "tap"])
    x100, off = check.loc[("pixel-x100", "pixel_decoder.ms0")], check.loc[("mars-off", "pixel_decoder.ms0")]
    assert x100["mean_share"] > 0.99 and x100["consistency"] > 0.99 > x100["consistency_centred"] + 0.2
    assert off["mean_share"] < x100["mean_share"] and off["consistency"] < 0.9
    table = shortcut_markdown(check.reset_index()).splitlines()
    assert table[0] == "| config | mask_features | ms0 | ms1 | ms2 |" and table[2].startswith("| mars-off | ")
    assert f"{x100['mean_share']:.3f} · {x100['consistency']:.3f} · {x100['consistency_centred']:.3f}" in table[3]


def test_a_run_with_labels_at_some_angles_only_was_trained_on_the_angles_they_cover(tmp_path):
    "View 2 at every angle, labels within ±45° (`label_angles`): the angles seen in training are the labelled ones."
    import numpy as np
    from mars_nb.config import AnglePolicy, DataConfig, RunConfig, TrainConfig
    from mars_nb.results import angle_set, seen_angles
    t = TrainConfig(angles=AnglePolicy("range", [0.0, 360.0]), label_angles=AnglePolicy("range", [-45.0, 45.0]))
    RunConfig(name="r", data=DataConfig(dataset="craters"), train=t).to_yaml(tmp_path / "config.yaml")
    angles = (0.0, 30.0, 90.0, 180.0, 330.0)
    np.testing.assert_array_equal(seen_angles(tmp_path, angles), [True, True, False, False, True])
    np.testing.assert_array_equal(angle_set(tmp_path, angles, "reversed"), [False, False, False, True, False])

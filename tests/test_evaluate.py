"""The rotation sweep on hand-made predictions whose IoUs are computed by hand."""
import math

import pandas as pd
import pytest
import torch

import numpy as np

from mars_nb.evaluate import class_iou, feature_consistency, summarize, sweep, tile_confusion, write_sweep
from mars_nb.views import IGNORE


class Square:
    """A one-tile dataset: an 8×8 tile whose label is a 4×4 square in the top-left quadrant.
    Tiles rotate by exact rot90 (angles are multiples of 90°), so every IoU is a count of pixels."""
    name, class_names, num_classes, num_channels = "square", ["background", "thing"], 2, 1

    def __init__(self):
        self.label = torch.zeros(8, 8, dtype=torch.long); self.label[:4, :4] = 1

    def test_tiles(self, split="test", size=8): return ["only"]

    def tile(self, spec, angle):
        k = int(angle // 90)
        lab = torch.rot90(self.label, k)
        valid = torch.ones(8, 8, dtype=torch.bool); valid[7, 7] = False
        return {"image": lab[None].float(), "label": lab, "valid": torch.rot90(valid, k)}


def fixed_top_left(model, images):
    "Predicts the top-left quadrant whatever the image: right at 0°, rotation-blind elsewhere."
    p = torch.zeros(images.shape[0], 8, 8, dtype=torch.long); p[:, :4, :4] = 1
    return p


def read_image(model, images):
    "Predicts the image itself: a perfect, perfectly rotation-equivariant model."
    return images[:, 0].long()


def shifted(model, images):
    "The image shifted one column right: equivariant under rotation? No — and imperfect."
    return torch.roll(images[:, 0].long(), 1, dims=-1)


def test_sweep_on_hand_made_predictions():
    ds = Square()
    df = sweep(torch.nn.Linear(1, 1), ds, [0, 90, 180], tile_size=8, progress=False, predict=fixed_top_left)
    # 0°: prediction = label. fg 16/16; bg 47/47 (63 valid pixels, corner (7,7) ignored)
    assert df.loc[0, "fg_iou"] == 1.0 and df.loc[0, "miou"] == 1.0
    # 90°: label is the bottom-left quadrant, prediction top-left: fg IoU 0, bg 31/63 (valid corner is top-right → (0,7))
    assert df.loc[1, "fg_iou"] == 0.0 and math.isclose(df.loc[1, "iou_background"], 31 / 63, rel_tol=1e-6)
    # consistency at 90°: the prediction rotated back (bottom-right quadrant... of the upright frame) vs top-left
    assert df.loc[1, "consistency"] < 0.5
    perfect = sweep(torch.nn.Linear(1, 1), ds, [0, 90, 180, 270], tile_size=8, progress=False, predict=read_image)
    assert (perfect["fg_iou"] == 1).all() and (perfect["consistency"] == 1).all()


def test_shifted_prediction_iou_by_hand():
    ds = Square()
    df = sweep(torch.nn.Linear(1, 1), ds, [0], tile_size=8, progress=False, predict=shifted)
    # square cols 0-3 → predicted cols 1-4: overlap 4×3 = 12, union 16 + 16 − 12 = 20
    assert math.isclose(df.loc[0, "fg_iou"], 12 / 20, rel_tol=1e-6)
    # background: 63 valid; label bg 47, predicted bg 47, intersection 47 − 4 = 43; union 51
    assert math.isclose(df.loc[0, "iou_background"], 43 / 51, rel_tol=1e-6)


def test_class_iou_skips_ignore_and_invalid():
    target = torch.tensor([[1, 1, IGNORE, 0]])
    pred = torch.tensor([[1, 0, 1, 1]])
    valid = torch.tensor([[True, True, True, False]])
    iou = class_iou(pred, target, 2, valid)
    assert torch.allclose(iou, torch.tensor([0.0, 0.5]))


def test_summary_by_hand():
    df = pd.DataFrame({"angle": [0.0, 90.0, 180.0], "fg_iou": [0.8, 0.5, 0.7],
                       "miou": [0.9, 0.6, 0.8], "consistency": [1.0, 0.7, 0.9]})
    s = summarize(df)
    assert s["fg_iou_0"] == 0.8 and s["fg_iou_worst"] == 0.5 and s["fg_iou_worst_angle"] == 90.0
    assert math.isclose(s["fg_iou_drop"], 0.3) and math.isclose(s["fg_iou_mean"], 2.0 / 3)


def test_sweep_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one angle"):
        sweep(torch.nn.Linear(1, 1), Square(), [], progress=False)


def test_feature_consistency_is_one_at_zero_and_below_elsewhere():
    from mars_nb.data import load_dataset
    from mars_nb.model import build_model
    torch.manual_seed(0)
    fc = feature_consistency(build_model("tiny").eval(), load_dataset("craters"), [0, 45], n_tiles=2, progress=False)
    at0, at45 = fc[fc.angle == 0], fc[fc.angle == 45]
    assert set(fc.stage) == {"backbone", "pixel_decoder", "attention"}
    assert (at0.consistency > 0.9999).all() and (at45.consistency < 0.9999).all()
    feat = fc[fc.stage != "attention"]
    assert (feat[feat.angle == 0].consistency_centred > 0.9999).all() and fc[fc.stage == "attention"].mean_share.isna().all()
    assert ((feat.mean_share > 0) & (feat.mean_share < 1)).all()


def test_the_shared_component_of_a_map_is_measured_and_left_out(monkeypatch):
    "A map plus a large vector shared by every pixel: the cosine near 1, the centred cosine and the share as by hand."
    import mars_nb.evaluate as ev
    torch.manual_seed(0)
    m1, m2 = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    valid = torch.zeros(6, 6, dtype=torch.bool); valid[1:5, 1:5] = True
    shared = 30 * torch.randn(1, 4, 1, 1)
    monkeypatch.setattr(ev, "aligned_stage_maps", lambda *a, **k: {"pixel_decoder.ms0": (m1 + shared, m2 + shared, valid)})
    ds = type("DS", (), {"test_tiles": lambda self, split, size: [0, 1],
                         "tiles": lambda self, specs, angle: {"image": torch.zeros(2, 1, 8, 8)}})()
    row = ev.feature_consistency(torch.nn.Linear(1, 1), ds, [90], progress=False).iloc[0]
    a, b = (m[:, :, 1:5, 1:5].flatten(2) for m in (m1 + shared, m2 + shared))         # [B, C, 16]
    ca, cb = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    centred = torch.nn.functional.cosine_similarity(ca, cb, dim=1).mean()
    share = torch.stack([a[i].mean(-1).pow(2).sum() / a[i].pow(2).sum(0).mean() for i in range(2)]).mean()
    assert row.consistency > 0.99 and abs(row.consistency_centred - float(centred)) < 1e-5 and abs(centred) < 0.5
    assert abs(row.mean_share - float(share)) < 1e-5 and row.mean_share > 0.95


# ---------------------------------------------------------------------------------------------
# per-tile confusion counts: what a tile-level bootstrap of the summary needs


def test_tile_confusion_by_hand():
    # two 2x3 tiles, 3 classes; rows: target class, columns: predicted class
    target = torch.tensor([[[0, 1, 2], [2, 2, IGNORE]],
                           [[1, 1, 1], [0, 0, 0]]])
    pred = torch.tensor([[[0, 2, 2], [1, 2, 0]],
                         [[1, 0, 1], [0, 2, 0]]])
    valid = torch.ones(2, 2, 3, dtype=torch.bool)
    valid[1, 0, 0] = False                                     # tile 1: its (0, 0) pixel is outside the valid region
    cm = tile_confusion(pred, target, 3, valid)
    assert cm.shape == (2, 3, 3) and cm.dtype == torch.int64
    assert cm[0].tolist() == [[1, 0, 0],     # target 0: predicted 0
                              [0, 0, 1],     # target 1: predicted 2
                              [0, 1, 2]]     # target 2: predicted 2, 1, 2; the ignored pixel counts nowhere
    assert cm[1].tolist() == [[2, 0, 1],
                              [1, 1, 0],     # (0, 0) not valid: only (0, 1) -> 0 and (0, 2) -> 1
                              [0, 0, 0]]
    assert torch.equal(tile_confusion(pred, target, 3), tile_confusion(pred, target, 3, torch.ones_like(valid)))
    assert int(tile_confusion(pred, target, 3).sum()) == 11    # 12 pixels, one IGNORE


def test_pooled_tile_confusion_reproduces_class_iou():
    g = torch.Generator().manual_seed(0)
    for k in (2, 4):
        target = torch.randint(0, k, (6, 16, 16), generator=g)
        target[torch.rand(target.shape, generator=g) < 0.1] = IGNORE
        pred = torch.randint(0, k, (6, 16, 16), generator=g)
        valid = torch.rand(target.shape, generator=g) > 0.2
        if k == 4:
            target[target == 3] = 0; pred[pred == 3] = 1       # a class in neither map: NaN in both
        cm = tile_confusion(pred, target, k, valid).double()
        for tiles in (slice(None), slice(2, 3)):
            c = cm[tiles].sum(0)
            inter, union = c.diagonal(), c.sum(0) + c.sum(1) - c.diagonal()
            iou = torch.where(union > 0, inter / union.clamp_min(1), torch.tensor(float("nan")))
            ref = class_iou(pred[tiles], target[tiles], k, valid[tiles]).double()
            assert torch.allclose(iou, ref, equal_nan=True, atol=1e-6), (k, iou, ref)
            if k == 4:
                assert torch.isnan(iou[3]) and torch.isnan(ref[3])


class TwoSquares(Square):
    "Two 8x8 tiles: the square of `Square`, and its mirror image (a square in the top-right quadrant)."
    def test_tiles(self, split="test", size=8): return ["left", "right"]

    def tile(self, spec, angle):
        t = super().tile(spec, angle)
        if spec == "right":
            k = int(angle // 90)
            lab = torch.rot90(torch.flip(self.label, dims=(-1,)), k)
            t = {**t, "image": lab[None].float(), "label": lab}
        return t


def test_sweep_per_tile_confusion_shapes_and_counts():
    ds = TwoSquares()
    df, conf = sweep(torch.nn.Linear(1, 1), ds, [0, 90, 180], tile_size=8, progress=False, predict=fixed_top_left,
                     per_tile=True)
    assert isinstance(conf, np.ndarray) and conf.shape == (3, 2, 2, 2) and conf.dtype == np.int64
    assert df.equals(sweep(torch.nn.Linear(1, 1), ds, [0, 90, 180], tile_size=8, progress=False, predict=fixed_top_left))
    assert (conf.sum((-2, -1)) == 63).all()                           # every valid pixel of every tile, once
    assert conf[0, 0].tolist() == [[47, 0], [0, 16]]                  # 0°, left tile: prediction = label
    assert conf[1, 0].tolist() == [[31, 16], [16, 0]]                 # 90°: label bottom-left, prediction top-left
    # right tile at 0°: square top-right, prediction top-left; the invalid corner (7, 7) is background
    assert conf[0, 1].tolist() == [[31, 16], [16, 0]]
    # pooled over tiles, each angle's counts give that row's IoUs
    for i, row in df.iterrows():
        c = conf[i].sum(0)
        iou = np.diag(c) / (c.sum(0) + c.sum(1) - np.diag(c))
        assert np.allclose(iou, [row["iou_background"], row["iou_thing"]]), (row["angle"], iou)


def test_write_sweep_writes_tiles_npz_that_round_trips(tmp_path):
    df, conf = sweep(torch.nn.Linear(1, 1), TwoSquares(), [0, 90, 180, 270], tile_size=8, progress=False,
                     predict=shifted, per_tile=True)
    metrics = write_sweep(df, tmp_path / "run", extra={"name": "x"}, confusion=conf)
    assert metrics["name"] == "x" and (tmp_path / "run" / "sweep.csv").exists() and (tmp_path / "run" / "metrics.json").exists()
    with np.load(tmp_path / "run" / "tiles.npz") as f:
        assert set(f.files) == {"confusion", "angles"}
        assert f["confusion"].dtype == np.int64 and np.array_equal(f["confusion"], conf)
        assert f["angles"].tolist() == [0.0, 90.0, 180.0, 270.0] == df["angle"].tolist()
    from mars_nb.compare import run_confusion
    (tmp_path / "runs").mkdir()
    (tmp_path / "run").rename(tmp_path / "runs" / "run")
    assert np.array_equal(run_confusion(tmp_path, "run"), conf)       # what the report reads back
    write_sweep(df, tmp_path / "plain")                                # without confusion counts: no tiles.npz
    assert not (tmp_path / "plain" / "tiles.npz").exists() and (tmp_path / "plain" / "sweep.csv").exists()
    assert run_confusion(tmp_path, "missing") is None


def test_sweep_per_tile_on_craters_matches_the_summary():
    "A real sweep: per-tile counts for every crater test tile, pooled back they give each angle's foreground IoU."
    from mars_nb.data import load_dataset
    from mars_nb.model import build_model
    from mars_nb.compare import mean_fg_iou
    torch.manual_seed(0)
    ds = load_dataset("craters")
    df, conf = sweep(build_model("tiny").eval(), ds, [0, 30], batch_size=16, tile_size=128, progress=False, per_tile=True)
    assert conf.shape == (2, len(ds.test_tiles("test", 128)), 2, 2)
    assert np.allclose(mean_fg_iou(conf.sum(1)), df["fg_iou"].mean(), equal_nan=True)


def test_stage_map_colours_without_valid_cells_are_grey():
    "A coarse level whose valid region the margin erodes away is drawn grey, not a crash (it was: quantile of nothing)."
    from mars_nb.evaluate import pca_rgb
    f = torch.randn(8, 2, 2)
    a, b = pca_rgb(f, f, torch.zeros(2, 2, dtype=torch.bool))
    assert a.shape == b.shape == (2, 2, 3) and (a == 0.5).all() and (b == 0.5).all()
    a, _ = pca_rgb(torch.randn(8, 4, 4), torch.randn(8, 4, 4), torch.ones(4, 4, dtype=torch.bool))
    assert a.shape == (4, 4, 3) and a.std() > 0

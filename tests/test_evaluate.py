"""The rotation sweep on hand-made predictions whose IoUs are computed by hand."""
import math

import pandas as pd
import pytest
import torch

from mars_nb.evaluate import class_iou, feature_consistency, summarize, sweep
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

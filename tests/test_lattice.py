"""The lattice every tap carries is the network's real one: an independent two-view check.

`tap_meta` states (or, for an unknown backbone, measures) where cell j of every map sits in the image.
These tests check that statement against the network itself, without going through
`measure_lattice`: a copy of the backbone whose kernels are averaged over the eight symmetries of
the square (`d4_symmetrized`) is as rotation-equivariant as its sampling allows, so its maps of a
smooth image x and of rotate(x, θ) must agree once view 2 is warped back — on the right lattice. On a
wrong one the warp is off by a fraction of a cell (at 180° on a stride-8 corner lattice taken for a
centred one: 7/8 of a cell) and the agreement drops. The agreement is the mean cosine over channels of
view 1's map and view 2's warped map on the valid cells (margin 1).

Thresholds were set from measurements (see the constants below). The decisive check compares lattices on
the same maps (the ratio of their misalignments), so it does not hinge on how well a random network's
features agree in absolute terms; the absolute floor (HIGH) guards against a comparison that went wrong.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mars_nb.d2 as d2
from mars_nb.model import build_model
from mars_nb.taps import Taps, d4_symmetrized, measure_lattice, stage_taps, tap_meta
from mars_nb.views import Lattice, crop_extent, rotate, warp_back

from d2_stand_in import MaskFormer, PatchStemNet, ResNet

ANGLES = (37.0, 90.0, 180.0, 270.0)
QUARTERS = (90.0, 180.0, 270.0)
LEVELS = tuple(f"backbone.res{i}" for i in range(2, 6))

# Measured here (the models and inputs of the tests below; other model seeds gave the same picture): on the
# tap's lattice the mean cosine at the quarter turns is >= 0.9966 (HF tiny), 0.9979 (r50), 0.9955 (ResNet
# stand-in), 0.9989 (patch-stem stand-in); at 37° it is >= 0.9898 (HF tiny), 0.9968 (r50), 0.9981 (patch stem)
# but 0.953 on the ResNet stand-in (res5): at an oblique angle the deep levels' receptive fields reach the
# zero-filled corners of the rotated view, which view 1 does not have - not a lattice effect. At 90/180/270°
# the centred assumption on a corner lattice leaves 16-30x (HF tiny, ResNet stand-in) and 9-20x (r50) the
# misalignment (1 - cosine) of the right lattice at strides 4 and 8; e.g. HF tiny at 180°: stride 4 0.9966 vs
# centred 0.9455, stride 8 0.9970 vs 0.9339 (one 9x9 box filter instead of two gives 0.980 vs 0.930 and
# 0.988 vs 0.931, the numbers of the issue that motivated these tests, and ratios of only 3.6-7).
HIGH = 0.97            # quarter turns
HIGH_OBLIQUE = 0.97    # 37° (0.93 for the ResNet stand-ins, see above)
RATIO = 3.0            # the wrong lattice's misalignment over the right one's, at least


def smooth_images(n: int, size: int, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """n smooth random images [n, channels, size, size]: white noise averaged twice over 9x9 pixels (a 17x17
    triangle filter; after one box filter the fine detail left cuts the contrast between lattices 3-4 fold)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size + 16, size + 16, generator=g)
    return F.avg_pool2d(F.avg_pool2d(x, 9, 1), 9, 1)


def two_view_agreement(backbone: nn.Module, maps: dict, lattices: dict, x: torch.Tensor, angles=ANGLES) -> dict:
    """{(map name, lattice label, angle): mean cosine} of the D4-symmetrized `backbone`'s map of x and its map
    of rotate(x, angle) warped back on that lattice (`lattices`: name -> {label: Lattice})."""
    net = d4_symmetrized(backbone)
    size = tuple(x.shape[-2:])
    out = {}
    with torch.no_grad():
        out1 = net(x)
        for th in angles:
            out2 = net(rotate(x, th))
            for name, select in maps.items():
                f1, f2 = select(out1), select(out2)
                for label, lat in lattices[name].items():
                    al, valid = warp_back(f2, th, size, lat, margin=1)
                    assert valid.any(), (name, label, th)
                    cos = F.cosine_similarity(crop_extent(f1, size, lat.stride), al, dim=1)  # [B, h, w]
                    out[name, label, th] = cos[:, valid].mean().item()
    return out


def table(res: dict) -> str:
    "The measurements, one line per (map, lattice), for assertion messages."
    rows = {}
    for (name, label, th), c in res.items():
        rows.setdefault((name, label), []).append(f"{th:g}°: {c:.4f}")
    return "\n".join(f"{n} {l}: " + ", ".join(v) for (n, l), v in rows.items())


def assert_right_lattice_wins(res: dict, wrong: dict, high: float = HIGH, high_oblique: float = HIGH_OBLIQUE):
    """The tap's lattice ('tap') agrees well at every angle (`high` at the quarter turns, `high_oblique` else),
    and at the quarter turns each wrong lattice leaves clearly more misalignment (1 - cosine) than it:
    `wrong` = {label: {stride: least ratio}}."""
    msg = "\n" + table(res)
    for (name, label, th), c in res.items():
        least = high if th in QUARTERS else high_oblique
        if label == "tap":
            assert c >= least, f"{name} at {th:g}° on the tap's lattice: cosine {c:.4f} < {least}" + msg
    for label, ratios in wrong.items():
        for (name, lab, th), c in res.items():
            s = 2 ** int(name[-1])
            if lab != label or s not in ratios or th not in QUARTERS:
                continue
            good = res[name, "tap", th]
            assert 1 - c >= ratios[s] * (1 - good), (f"{name} (stride {s}) at {th:g}°: {label} {c:.4f} is not clearly "
                                                     f"worse than the tap's lattice {good:.4f}" + msg)


CENTRED_LOSES = {"centred": {4: RATIO, 8: RATIO}}   # for a corner lattice


def level_lattices(meta: dict, extra=("centred",)) -> dict:
    "name -> {'tap': the tap's lattice, and the named alternatives} for the four backbone levels."
    make = {"centred": Lattice.centred, "corner": Lattice.corner}
    return {n: {"tap": meta[n].lattice, **{k: make[k](meta[n].stride) for k in extra}} for n in LEVELS}


# ---------------------------------------------------------------------------------------------
# Hugging Face family
# ---------------------------------------------------------------------------------------------
def hf_maps() -> dict:
    return {f"backbone.res{i + 2}": (lambda out, i=i: out.feature_maps[i]) for i in range(4)}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny").eval()


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    return build_model("r50").eval()


def test_hf_tiny_two_views_agree_on_the_taps_lattice(tiny):
    meta = tap_meta(tiny)
    assert [meta[n].lattice for n in LEVELS] == [Lattice.corner(s) for s in (4, 8, 16, 32)]   # declared: ResNet
    res = two_view_agreement(tiny.model.pixel_level_module.encoder, hf_maps(), level_lattices(meta),
                             smooth_images(2, 256))
    assert_right_lattice_wins(res, CENTRED_LOSES)


@pytest.mark.slow
def test_hf_r50_two_views_agree_on_the_taps_lattice(r50):
    meta = tap_meta(r50)
    assert [meta[n].lattice for n in LEVELS] == [Lattice.corner(s) for s in (4, 8, 16, 32)]
    res = two_view_agreement(r50.model.pixel_level_module.encoder, hf_maps(), level_lattices(meta),
                             smooth_images(1, 128))
    assert_right_lattice_wins(res, CENTRED_LOSES)


def assert_resnet_offsets(found: dict):
    "Every level measured on a ResNet sits within 0.75 px of offset 0.5 (corner), far from stride/2 (centred)."
    for name, lat in found.items():
        assert abs(lat.offset - 0.5) <= 0.75, (name, lat)
        assert abs(lat.offset - lat.stride / 2) >= 1.0, (name, lat)
    assert [lat.stride for lat in found.values()] == [4, 8, 16, 32]


def test_measure_lattice_hf_tiny_is_corner(tiny):
    # measured 0.49, 0.46, 0.62, 0.27 px (strides 4..32); over five model seeds all within 0.25 px of 0.5
    assert_resnet_offsets(measure_lattice(tiny.model.pixel_level_module.encoder, hf_maps(), snap=None))


@pytest.mark.slow
def test_measure_lattice_hf_r50_is_corner(r50):
    # measured 0.78, 0.63, 0.56, 0.61 px (strides 4..32); 8 samples instead of 16 halve the cost (model seed 1:
    # 0.67, 0.39, 0.89, 0.26 px)
    assert_resnet_offsets(measure_lattice(r50.model.pixel_level_module.encoder, hf_maps(), samples=8, snap=None))


# ---------------------------------------------------------------------------------------------
# detectron2 family: the stand-in of d2_stand_in.py (as in test_taps.py) with its two real conv backbones
# ---------------------------------------------------------------------------------------------
def d2_maps() -> dict:
    return {f"backbone.res{i}": (lambda out, i=i: out[f"res{i}"]) for i in range(2, 6)}


def maskformer(backbone_cls) -> MaskFormer:
    torch.manual_seed(0)
    return MaskFormer(backbone_cls()).eval()


@pytest.fixture(scope="module")
def d2_resnet():
    return maskformer(ResNet)


@pytest.fixture(scope="module")
def d2_patch():
    m = maskformer(PatchStemNet)
    with pytest.warns(UserWarning, match="no known lattice"):
        tap_meta(m)                                   # measured now, cached with the model
    return m


def test_d2_resnet_stand_in_is_declared_corner_and_two_views_agree(d2_resnet):
    meta = tap_meta(d2_resnet)
    assert [meta[n].lattice for n in LEVELS] == [Lattice.corner(s) for s in (4, 8, 16, 32)]
    res = two_view_agreement(d2_resnet.backbone, d2_maps(), level_lattices(meta), smooth_images(2, 256))
    assert_right_lattice_wins(res, CENTRED_LOSES, high_oblique=0.93)   # 37°: 0.953 at res5 (see HIGH)


def test_d2_patch_stem_is_measured_with_a_warning():
    m = maskformer(PatchStemNet)
    with pytest.warns(UserWarning, match=r"PatchStemNet .*no known lattice.*res2 offset 2 px.*res5 offset 2 px"):
        meta = tap_meta(m)
    assert [meta[n].lattice for n in LEVELS] == [Lattice(s, 2.0) for s in (4, 8, 16, 32)]
    assert meta["backbone.res2"].lattice == Lattice.centred(4)       # at stride 4 offset 2 is the centre
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tap_meta(m) is meta                                    # cached: measured (and warned) once


def test_d2_patch_stem_two_views_agree_on_the_measured_lattice(d2_patch):
    meta = tap_meta(d2_patch)
    res = two_view_agreement(d2_patch.backbone, d2_maps(), level_lattices(meta, ("centred", "corner")),
                             smooth_images(2, 256))
    # Offset 2 against corner (0.5) and centred (s/2). At stride 4 centred IS offset 2 (the same lattice, and
    # rot90 is exact there: misalignment ~0); corner misses by 1.5 px: 3/8 of a cell at stride 4 (ratio ~1e9),
    # 3/16 at stride 8 (measured ratio 1.89-2.24), under 1/10 at 16 and 32 (ratio 0.99-1.17: too close to tell
    # apart, not asserted). Centred misses by s/2 - 2 px: ratios measured 3.40-3.90 (stride 8), 4.12-5.18 (16),
    # 6.41-7.20 (32).
    assert meta["backbone.res2"].lattice == Lattice.centred(4)
    assert_right_lattice_wins(res, {"corner": {4: RATIO, 8: 1.5}, "centred": {8: 2.5, 16: RATIO, 32: RATIO}})


def test_measure_lattice_patch_stem_finds_offset_2():
    torch.manual_seed(0)
    bb = PatchStemNet()
    assert measure_lattice(bb, d2_maps()) == {n: Lattice(s, 2.0) for n, s in zip(LEVELS, (4, 8, 16, 32))}
    for name, lat in measure_lattice(bb, d2_maps(), snap=None).items():    # measured 1.98, 2.03, 1.97, 2.06 px
        assert abs(lat.offset - 2.0) < 0.25, (name, lat)


def test_measure_lattice_d2_resnet_stand_in_is_corner():
    torch.manual_seed(0)
    assert_resnet_offsets(measure_lattice(ResNet(), d2_maps(), snap=None))      # measured 0.24, 0.63, 0.39, 0.36 px


def test_real_detectron2_backbone_lattice():
    if not d2.have_detectron2():
        reason = (d2.missing_reason() or "").split(". ")[0]
        pytest.skip(f"needs detectron2 and the official Mask2Former (mars_nb.d2.have_detectron2() is False: {reason}; "
                    "install: see mars_nb.d2.INSTALL_HINT)")
    cfg = d2.build_config("tiny", "craters", crop=64, batch_size=2, device="cpu")
    torch.manual_seed(0)
    model = d2.build_mars_model(cfg).eval()
    assert type(model.backbone).__name__ == "ResNet"
    meta = tap_meta(model)
    assert [meta[n].lattice for n in LEVELS] == [Lattice.corner(s) for s in (4, 8, 16, 32)]
    channels = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)).in_channels
    res = two_view_agreement(model.backbone, d2_maps(), level_lattices(meta), smooth_images(2, 256, channels))
    assert_right_lattice_wins(res, CENTRED_LOSES, high_oblique=0.93)   # as the ResNet stand-in (not measured here)
    assert_resnet_offsets(measure_lattice(model.backbone, d2_maps(), in_channels=channels, snap=None))


# ---------------------------------------------------------------------------------------------
# the pixel decoder, attention and output taps inherit the backbone's lattice
# ---------------------------------------------------------------------------------------------
def assert_inherited(model: nn.Module, layers: int):
    meta = tap_meta(model)
    by_stride = {meta[n].stride: meta[n].lattice for n in LEVELS}
    assert sorted(by_stride) == [4, 8, 16, 32]
    for i, s in enumerate((32, 16, 8)):
        assert meta[f"pixel_decoder.ms{i}"].lattice == by_stride[s] == Lattice(s, by_stride[s].offset)
    assert meta["pixel_decoder.mask_features"].lattice == by_stride[4]
    attention = sorted(n for n in meta if n.startswith("attention."))
    assert attention == sorted(f"attention.layer{i}" for i in range(layers))
    for i in range(layers):
        m = meta[f"attention.layer{i}"]
        assert m.lattice == meta[f"pixel_decoder.ms{i % 3}"].lattice and m.level == i % 3
    assert meta["output.classes"].lattice == meta["pixel_decoder.mask_features"].lattice
    return meta


def assert_taps_carry(model: nn.Module, meta: dict, run):
    "Taps of every stage carry tap_meta's lattices (attention taps also get their grid)."
    with Taps(model, stage_taps(model, ("backbone", "pixel_decoder", "attention", "output"))) as taps:
        with torch.no_grad():
            run()
    carried = taps.check().meta
    assert set(carried) == set(meta)
    assert all(carried[n].lattice == meta[n].lattice for n in meta)


def test_hf_tiny_inherits_the_backbone_lattice(tiny):
    meta = assert_inherited(tiny, len(tiny.model.transformer_module.decoder.layers))
    assert meta["pixel_decoder.ms2"].lattice == Lattice.corner(8)
    assert_taps_carry(tiny, meta, lambda: tiny(pixel_values=torch.randn(2, 1, 64, 64)))


@pytest.mark.parametrize("which", ["d2_resnet", "d2_patch"])
def test_d2_stand_ins_inherit_the_backbone_lattice(which, request):
    model = request.getfixturevalue(which)
    meta = assert_inherited(model, len(model.sem_seg_head.predictor.transformer_cross_attention_layers))
    offset = {"d2_resnet": 0.5, "d2_patch": 2.0}[which]          # declared corner / measured (see above)
    assert meta["attention.layer0"].lattice == Lattice(32, offset)
    assert meta["output.classes"].lattice == Lattice(4, offset)
    assert_taps_carry(model, meta, lambda: model(torch.randn(2, 1, 64, 64)))

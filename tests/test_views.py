"""Geometry of views: rotations, valid masks, rotate-then-crop, warp-back, attention alignment, matching.

References are independent of the module's grid code: torch.rot90, hand-made small tensors, analytic
fields evaluated with numpy at hand-rotated pixel-centre coordinates, and closed-form areas.

Maps live on a `Lattice`: cell j of a stride-s map sits at s*j + offset image pixels. Only a centred lattice
(offset s/2: pooling, patches, fields sampled at (j + 1/2)s) is symmetric about the centre of a map that
tiles the image, so only there is warp-back at a multiple of 90° a rot90 of the cells; on a corner lattice
(offset 1/2: ResNets) the rotated cells fall between cells and warp-back interpolates.
"""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mars_nb.views import (IGNORE, Lattice, align_attention, crop_extent, footprint_radius, match_queries, rotate,
                           rotate_labels, rotated_crop, rotated_crops, valid_mask, warp_back)

STRIDES = (4, 8, 16, 32)


# ---------------------------------------------------------------- rotate / rotate_labels
def test_rotate_ccw_by_hand():
    x = torch.tensor([[1., 2.], [3., 4.]])
    # CCW as displayed: the top-right value moves to the top-left
    assert torch.equal(rotate(x, 90), torch.tensor([[2., 4.], [1., 3.]]))
    y = torch.arange(9.).reshape(3, 3)
    assert torch.equal(rotate(y, 90), torch.tensor([[2., 5., 8.], [1., 4., 7.], [0., 3., 6.]]))
    assert torch.equal(rotate(y, -90), torch.tensor([[6., 3., 0.], [7., 4., 1.], [8., 5., 2.]]))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rotate_quarter_turns_exact(k):
    x = torch.randn(2, 3, 17, 17)
    assert torch.equal(rotate(x, 90 * k), torch.rot90(x, k, dims=(-2, -1)))
    assert torch.equal(rotate(x, 90 * k - 360), torch.rot90(x, k, dims=(-2, -1)))
    lab = torch.randint(0, 5, (2, 16, 16))
    out = rotate_labels(lab, 90 * k)
    assert out.dtype == lab.dtype and torch.equal(out, torch.rot90(lab, k, dims=(-2, -1)))


def test_rotate_zero_is_copy_and_180_nonsquare_exact():
    x = torch.randn(1, 6, 10)
    out = rotate(x, 0)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    assert torch.equal(rotate(x, 180), torch.rot90(x, 2, dims=(-2, -1)))


def test_rotate_general_angle_matches_analytic_field():
    # bilinear rotation of a smooth field at image resolution vs the field evaluated at hand-rotated coords
    H, W, th = 40, 64, 23.0
    f = lambda X, Y: np.sin(X / 7.0 + 0.3) * np.cos(Y / 9.0)
    Y, X = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    img = torch.tensor(f(X, Y))
    c, s = math.cos(math.radians(th)), math.sin(math.radians(th))
    x, y = X - W / 2, Y - H / 2
    ref = f(W / 2 + x * c - y * s, H / 2 + x * s + y * c)
    out = rotate(img, th).numpy()
    v = valid_mask((H, W), th, margin=1).numpy()
    # bilinear error bound (h=1 px): (1/8)(|kx|+|ky|)^2 with k = (1/7, 1/9)
    assert np.abs(out - ref)[v].max() <= (1 / 7 + 1 / 9) ** 2 / 8 + 1e-9


def test_rotate_labels_45_corners_ignored_centre_kept():
    lab = torch.ones(31, 31, dtype=torch.long)
    lab[15, 15] = 3
    out = rotate_labels(lab, 45)
    for r, c in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        assert out[r, c] == IGNORE
    assert out[15, 15] == 3
    assert set(out.unique().tolist()) == {1, 3, IGNORE}
    # the ignored pixels are exactly the invalid ones
    assert torch.equal(out == IGNORE, ~valid_mask((31, 31), 45))
    assert (rotate_labels(lab, 45, ignore_index=-1) == -1).sum() == (out == IGNORE).sum()


def test_rotate_nonsquare_90_fills():
    x = torch.ones(1, 20, 40)
    out = rotate(x, 90, fill=-1.0)
    assert out.shape == x.shape
    v = valid_mask((20, 40), 90)
    assert (out[0][v] == 1).all() and (out[0][~v] == -1).all()
    # 20x40 rotated by 90 about the centre: the valid band is the central 20 columns
    assert v.sum() == 20 * 20 and v[:, 10:30].all()


# ---------------------------------------------------------------- valid_mask
def test_valid_mask_area_45():
    frac = valid_mask((512, 512), 45).float().mean().item()
    assert abs(frac - 2 * (math.sqrt(2) - 1)) < 0.005


@pytest.mark.parametrize("th", [10.0, 30.0, 60.0, 123.0])
def test_valid_mask_area_general(th):
    # overlap area of a square and its rotated copy: 1 - t * (something) -> compare with a polygon clip in numpy
    N = 400
    frac = valid_mask((N, N), th).float().mean().item()
    ref = _square_overlap(th)
    assert abs(frac - ref) < 0.005


def _square_overlap(th):
    # area of unit square ∩ rotated unit square (centred), by Sutherland–Hodgman clipping
    sq = np.array([[-.5, -.5], [.5, -.5], [.5, .5], [-.5, .5]])
    c, s = math.cos(math.radians(th)), math.sin(math.radians(th))
    poly = [tuple(p) for p in sq @ np.array([[c, s], [-s, c]])]
    for a, b in zip(sq, np.roll(sq, -1, 0)):
        inside = lambda p: (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0]) >= 0
        out = []
        for i, p in enumerate(poly):
            q = poly[i - 1]
            if inside(p):
                if not inside(q):
                    out.append(_intersect(q, p, a, b))
                out.append(p)
            elif inside(q):
                out.append(_intersect(q, p, a, b))
        poly = out
    P = np.array(poly)
    return 0.5 * abs(np.dot(P[:, 0], np.roll(P[:, 1], 1)) - np.dot(P[:, 1], np.roll(P[:, 0], 1)))


def _intersect(p, q, a, b):
    p, q, a, b = map(np.asarray, (p, q, a, b))
    d1, d2 = q - p, b - a
    t = ((a[0] - p[0]) * d2[1] - (a[1] - p[1]) * d2[0]) / (d1[0] * d2[1] - d1[1] * d2[0])
    return tuple(p + t * d1)


def test_valid_mask_margin_erodes():
    assert valid_mask((64, 64), 0).all()
    m2 = valid_mask((64, 64), 0, margin=2)
    assert m2.sum() == 60 * 60 and m2[2:62, 2:62].all()
    v0, v3 = valid_mask((64, 64), 30), valid_mask((64, 64), 30, margin=3)
    assert (v3 <= v0).all() and v3.sum() < v0.sum()
    # Euclidean erosion: every kept pixel is >= 3 px from every dropped pixel of v0's complement boundary
    kept = torch.nonzero(v3).float() + 0.5
    gone = torch.nonzero(~v0).float() + 0.5
    assert torch.cdist(kept, gone).min() > 3 - 1e-6


def test_valid_mask_nonsquare_is_rotated_canvas():
    # valid_mask(size, a) = C ∩ R_a C: at -a it is the mirror image (left-right) of the one at a
    v, vm = valid_mask((48, 80), 20), valid_mask((48, 80), -20)
    assert torch.equal(v, torch.flip(vm, dims=(-1,)))
    assert valid_mask((48, 80), 180).all()


# ---------------------------------------------------------------- rotated_crop
def test_rotated_crop_zero_is_slicing_and_quarters_exact():
    src = torch.randn(3, 150, 170)
    r0, c0, h = 40, 55, 48
    up = src[:, r0:r0 + h, c0:c0 + h]
    centre = (r0 + h / 2, c0 + h / 2)
    assert torch.equal(rotated_crop(src, centre, (h, h), 0), up)
    for k in (1, 2, 3):
        assert torch.equal(rotated_crop(src, centre, (h, h), 90 * k), torch.rot90(up, k, dims=(-2, -1)))
    # odd size: centre on a half pixel
    up = src[:, 10:25, 20:35]
    assert torch.equal(rotated_crop(src, (17.5, 27.5), (15, 15), 270), torch.rot90(up, 3, dims=(-2, -1)))
    # labels (2-d, integer)
    lab = torch.randint(0, 4, (150, 170))
    assert torch.equal(rotated_crop(lab, centre, (h, h), 90, mode="nearest"),
                       torch.rot90(lab[r0:r0 + h, c0:c0 + h], 1))


def test_rotated_crop_general_angle_no_fill_and_analytic():
    H, W = 220, 260
    f = lambda X, Y: np.sin(X / 8.0) + np.cos(Y / 11.0 + 0.5)
    Yg, Xg = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    src = torch.tensor(f(Xg, Yg), dtype=torch.float32)
    cy, cx, h, w, th = 110.0, 131.0, 64, 96, 57.0
    assert min(cy, H - cy, cx, W - cx) >= footprint_radius((h, w))
    out = rotated_crop(src, (cy, cx), (h, w), th, fill=float("nan")).numpy()
    assert not np.isnan(out).any()
    c, s = math.cos(math.radians(th)), math.sin(math.radians(th))
    y, x = np.meshgrid(np.arange(h) + 0.5 - h / 2, np.arange(w) + 0.5 - w / 2, indexing="ij")
    ref = f(cx + x * c - y * s, cy + x * s + y * c)
    assert np.abs(out - ref).max() <= (1 / 8 + 1 / 11) ** 2 / 8 + 1e-5
    lab = rotated_crop((src > 0).long(), (cy, cx), (h, w), th, mode="nearest")
    assert lab.dtype == torch.long and not (lab == IGNORE).any()


def test_rotated_crop_outside_source_gets_fill():
    src = torch.ones(100, 100)
    out = rotated_crop(src, (10.0, 10.0), (40, 40), 30, fill=-5.0)
    assert (out == -5).any() and (out == 1).any()
    lab = rotated_crop(torch.zeros(100, 100, dtype=torch.long), (10.0, 10.0), (40, 40), 30, mode="nearest")
    assert (lab == IGNORE).any()
    assert (rotated_crop(src, (500.0, 500.0), (8, 8), 10, fill=2.0) == 2).all()


def test_footprint_radius():
    assert footprint_radius((128, 128)) == pytest.approx(64 * math.sqrt(2))
    assert footprint_radius((30, 40)) == pytest.approx(25.0)


# ---------------------------------------------------------------- Lattice
@pytest.mark.parametrize("stride, offset, match", [
    (0, 0.0, "stride must be a positive integer"),
    (-8, 4.0, "stride must be a positive integer"),
    (8.0, 4.0, "stride must be a positive integer"),       # a float, even a whole one
    ("8", 4.0, "stride must be a positive integer"),
    (True, 0.5, "stride must be a positive integer"),
    (None, 0.5, "stride must be a positive integer"),
    (8, -0.5, r"offset must be a number of pixels in \[0, stride=8\]"),
    (8, 8.5, r"offset must be a number of pixels in \[0, stride=8\]"),
    (4, 4.01, r"\[0, stride=4\]"),
    (8, float("nan"), "offset must be"),
    (8, float("inf"), "offset must be"),
    (8, "4", "offset must be"),
    (8, None, "offset must be"),
    (8, True, "offset must be"),
    (8, torch.tensor(4.0), "offset must be"),
])
def test_lattice_rejects_bad_stride_and_offset(stride, offset, match):
    with pytest.raises(ValueError, match=match):
        Lattice(stride, offset)


def test_lattice_constructors_and_accepted_values():
    assert Lattice.centred(8) == Lattice(8, 4.0) and Lattice.centred(8).is_centred
    assert Lattice.corner(8) == Lattice(8, 0.5) and not Lattice.corner(8).is_centred
    assert Lattice.centred(1) == Lattice.corner(1)          # stride 1: both are the pixel centres
    assert Lattice.centred(3) == Lattice(3, 1.5)
    for offset in (0, 0.0, 2.5, 8):                           # both ends of [0, stride] are allowed
        assert Lattice(8, offset).offset == offset
    lat = Lattice(np.int64(16), np.float32(2.0))              # numpy numbers are stored as int / float
    assert type(lat.stride) is int and type(lat.offset) is float and lat == Lattice(16, 2.0)
    assert Lattice(8, 4) == Lattice.centred(8) and hash(Lattice(8, 4)) == hash(Lattice.centred(8))
    with pytest.raises(dataclasses.FrozenInstanceError):
        lat.offset = 0.5
    for make in (Lattice.centred, Lattice.corner):
        with pytest.raises(ValueError, match="stride must be a positive integer"):
            make(0)


@pytest.mark.parametrize("lattice, size, centre", [
    # (H/2 - offset)/stride + 1/2 per axis, by hand (cell j spans [j, j+1) in map coordinates)
    (Lattice.centred(8), (128, 128), (8.0, 8.0)),              # (64 - 4)/8 + 1/2: the map's own centre
    (Lattice.corner(8), (128, 128), (8.4375, 8.4375)),         # (64 - 0.5)/8 + 1/2 = 7.9375 + 0.5
    (Lattice(8, 2.0), (128, 128), (8.25, 8.25)),               # (64 - 2)/8 + 1/2 = 7.75 + 0.5
    (Lattice(8, 1.5), (100, 150), (6.5625, 9.6875)),           # (50 - 1.5)/8 + 1/2, (75 - 1.5)/8 + 1/2
    (Lattice.centred(16), (96, 160), (3.0, 5.0)),              # (48 - 8)/16 + 1/2, (80 - 8)/16 + 1/2
    (Lattice.corner(16), (96, 160), (3.46875, 5.46875)),       # 47.5/16 + 1/2, 79.5/16 + 1/2
    (Lattice.centred(8), (100, 100), (6.25, 6.25)),            # 12.5 cells: not the 13-cell grid's centre 6.5
    (Lattice.corner(1), (5, 7), (2.5, 3.5)),                   # stride 1: the image centre itself
])
def test_lattice_centre_by_hand(lattice, size, centre):
    assert lattice.centre(size) == centre                      # binary fractions: exact


def test_lattice_centre_rejects_bad_image_size():
    for size in [(0, 8), (8,), (8.0, 8), None]:
        with pytest.raises(ValueError, match="image_size"):
            Lattice.corner(8).centre(size)


def test_warp_back_ramp_at_180_corner_shifts_centred_flips():
    # View 2's stride-8 map of a 128x128 image (16x16 cells) is the ramp r rotated 180° cell for cell:
    # t = rot180(r), t[k] = r[15 - k] along each axis (channel 0: row ramp j, channel 1: column ramp i).
    # Corner lattice (cell i at 8i + 0.5 px): the 180° turn about the image centre (64 px) sends view-1 cell i to
    # 128 - (8i + 0.5) = 8(15.875 - i) + 0.5 px, i.e. view-2 cell index 15.875 - i: between cells (the lattice is
    # not symmetric about the image centre). t is linear, so bilinear interpolation there is exact:
    # t(15.875 - i) = r(15 - 15.875 + i) = r(i) - 7/8. Warp-back gives the ramp 7/8 of a cell back on both axes
    # (7/8 = 2 * (s/2 - offset)/s: twice the lattice's offset from the centred one, in cells).
    # Valid at margin 1/2 (map coordinates, cell i centred at i + 1/2, rotation centre c = 8.4375): the source
    # point 2c - (i + 1/2) = 16.375 - i must lie in [1/2, 15.5], so i >= 0.875: cells 1..15 on each axis
    # (and every one of them interpolates between two real cells).
    j, i = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    r = torch.stack([j, i]).to(torch.float64)[None]          # [1, 2, 16, 16]
    t = torch.rot90(r, 2, dims=(-2, -1))
    al, v = warp_back(t, 180, (128, 128), Lattice.corner(8), margin=0.5)
    want_v = torch.zeros(16, 16, dtype=torch.bool)
    want_v[1:, 1:] = True
    assert torch.equal(v, want_v)
    assert torch.allclose(al[..., v], (r - 7 / 8)[..., v], atol=1e-12, rtol=0)
    assert (al[..., ~v] == 0).all()
    # the same map on a centred lattice: cell i at 8i + 4 px goes to 128 - 8i - 4 = 8(15 - i) + 4, exactly cell
    # 15 - i: the exact flip, every cell valid
    al, v = warp_back(t, 180, (128, 128), Lattice.centred(8))
    assert torch.equal(al, r) and torch.equal(al, torch.rot90(t, 2, dims=(-2, -1))) and v.all()


# ---------------------------------------------------------------- warp_back
@pytest.mark.parametrize("stride", STRIDES)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_warp_back_quarter_turns_exact(stride, k):
    # rot90 of the cells is the rotation only on a centred lattice (cells at (j + 1/2)s, symmetric about the
    # centre of a map that tiles the image): the case this test checks
    n = 128 // stride
    f = torch.randn(2, 3, n, n)
    al, v = warp_back(torch.rot90(f, k, dims=(-2, -1)), 90 * k, (128, 128), Lattice.centred(stride))
    assert torch.equal(al, f) and v.all() and v.shape == (n, n)


def _field(X, Y):
    # low-frequency sinusoids in physical pixel units
    return np.sin(2 * np.pi * X / 300 + 0.4) * np.cos(2 * np.pi * Y / 260 - 0.2) + 0.5 * np.sin(2 * np.pi * (X - Y) / 350)


_K = [(2 * np.pi / 300, 2 * np.pi / 260, 1.0), (2 * np.pi / 350, 2 * np.pi / 350, 0.5)]


def _bilinear_bound(cell):
    # |bilinear interpolation error| <= cell^2/8 * sum_n a_n (|kx_n| + |ky_n|)^2
    return cell ** 2 / 8 * sum(a * (kx + ky) ** 2 for kx, ky, a in _K)


def _view_maps(H, W, lattice, th):
    """View-1 and view-2 maps of the analytic field sampled on `lattice` (cell j at stride * j + offset px; the
    centred lattice is the (j + 1/2) * stride grid), view 2 rotated by hand in numpy."""
    st, o = lattice.stride, lattice.offset
    h, w = math.ceil(H / st), math.ceil(W / st)
    Y, X = np.meshgrid(np.arange(h) * st + o, np.arange(w) * st + o, indexing="ij")
    f1 = _field(X, Y)
    c, s = math.cos(math.radians(th)), math.sin(math.radians(th))
    x, y = X - W / 2, Y - H / 2
    f2 = _field(W / 2 + x * c - y * s, H / 2 + x * s + y * c)  # view 2 = content rotated CCW by th
    return torch.tensor(f1)[None, None], torch.tensor(f2)[None, None]


@pytest.mark.parametrize("make", [Lattice.centred, Lattice.corner])
@pytest.mark.parametrize("size", [(128, 128), (96, 160)])
@pytest.mark.parametrize("stride", STRIDES)
@pytest.mark.parametrize("th", [15.0, 37.0, 60.0, 123.0])
def test_warp_back_arbitrary_angle_recovers_field(make, size, stride, th):
    # the reference is the field sampled on the lattice itself, so it holds for either lattice
    H, W = size
    f1, f2 = _view_maps(H, W, make(stride), th)
    al, v = warp_back(f2, th, size, make(stride), margin=0.5)  # half a cell in: all 4 bilinear neighbours are real
    assert v.any() and al.shape == f1.shape
    err = (al - f1)[0, 0][v].abs().max().item()
    assert err <= _bilinear_bound(stride) + 1e-9, (err, _bilinear_bound(stride))
    assert (al[0, 0][~v] == 0).all()


@pytest.mark.parametrize("stride", STRIDES)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_warp_back_corner_lattice_quarter_turns_follow_the_field(stride, k):
    # on a corner lattice a quarter turn moves cells between cells: warp-back interpolates and follows the
    # field, while rot90 (the centred assumption) is off by (s/2 - 1/2) px per axis, far beyond the
    # interpolation bound
    lat = Lattice.corner(stride)
    f1, f2 = _view_maps(128, 128, lat, 90.0 * k)
    al, v = warp_back(f2, 90 * k, (128, 128), lat, margin=0.5)
    assert v.any() and not v.all()
    assert (al - f1)[0, 0][v].abs().max() <= _bilinear_bound(stride) + 1e-9
    permuted = torch.rot90(f2, -k, dims=(-2, -1))
    assert (permuted - f1)[0, 0][v].abs().max() > 2 * _bilinear_bound(stride)


def test_warp_back_against_image_resolution_rotation():
    # rotate the field at image resolution with `rotate`, pool to stride 8, warp back: close to the pooled upright.
    # Average pooling puts cell j's value at the centre of its block, (j + 1/2)s: a centred lattice.
    H, W, s, th = 96, 160, 8, 37.0
    Y, X = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    img = torch.tensor(_field(X, Y))[None, None]
    v1 = F.avg_pool2d(img, s)
    v2 = F.avg_pool2d(rotate(img, th), s)
    al, v = warp_back(v2, th, (H, W), Lattice.centred(s), margin=1.5)
    assert (al - v1)[0, 0][v].abs().max() < 2 * _bilinear_bound(s)


def test_warp_back_padding_only_unpadded_extent():
    H = W = 100
    for stride in STRIDES:
        hp = 128 // stride
        hv = math.ceil(H / stride)
        lat = Lattice.centred(stride)  # the analytic field sampled at (j + 1/2) * stride
        f1, f2 = _view_maps(H, W, lat, 30.0)  # analytic maps on the unpadded extent
        t = torch.full((1, 1, hp, hp), 1e6, dtype=f2.dtype)  # padding: garbage that must never leak
        t[..., :hv, :hv] = f2
        al, v = warp_back(t, 30.0, (H, W), lat, margin=0.5)
        assert al.shape == (1, 1, hv, hv) and v.shape == (hv, hv)
        assert al.abs().max() < 10
        assert (al - f1)[0, 0][v].abs().max() <= _bilinear_bound(stride) + 1e-9
        # also at margin 0 nothing of the padding gets in, on either lattice
        assert warp_back(t, 30.0, (H, W), lat)[0].abs().max() < 10
        assert warp_back(t, 30.0, (H, W), Lattice.corner(stride))[0].abs().max() < 10
    # at 0 degrees warp_back is the crop of the extent, whatever the lattice
    t = torch.randn(2, 4, 8, 8)
    for lat in (Lattice.centred(16), Lattice.corner(16), Lattice(16, 3.0)):
        al, v = warp_back(t, 0, (100, 100), lat)
        assert torch.equal(al, t[..., :7, :7]) and v.all()
    assert torch.equal(crop_extent(t, (100, 100), 16), t[..., :7, :7])


def test_warp_back_nondivisible_quarter_turn_uses_physical_centre():
    # 100x100 at stride 4 is 25 cells (divisible): exact. At stride 8 (12.5 -> 13 cells) the physical
    # centre is 6.25 cells, not the grid centre: the rotation must follow the analytic field, not rot90.
    # (The field is sampled at (j + 1/2) * 8: a centred lattice, whose centre is (50 - 4)/8 + 1/2 = 6.25.)
    f1, f2 = _view_maps(100, 100, Lattice.centred(8), 90.0)
    al, v = warp_back(f2, 90.0, (100, 100), Lattice.centred(8), margin=0.5)
    assert (al - f1)[0, 0][v].abs().max() <= _bilinear_bound(8) + 1e-9
    assert not v.all()


def test_warp_back_is_differentiable():
    for lat in (Lattice.centred(4), Lattice.corner(4)):
        for angle in (33, 90):
            t = torch.randn(1, 2, 16, 16, requires_grad=True)
            al, v = warp_back(t, angle, (64, 64), lat)
            al.sum().backward()
            assert t.grad is not None and t.grad.abs().sum() > 0
    # on a centred lattice a quarter turn is a permutation of the cells: the gradient of sum(al^2) is 2t
    t2 = torch.randn(1, 2, 16, 16, requires_grad=True)
    warp_back(t2, 90, (64, 64), Lattice.centred(4))[0].pow(2).sum().backward()
    assert torch.allclose(t2.grad, 2 * t2.detach())


def test_warp_back_margin():
    z = torch.zeros(1, 1, 16, 16)
    for lat in (Lattice.centred(8), Lattice.corner(8)):
        _, v0 = warp_back(z, 45, (128, 128), lat)
        _, v1 = warp_back(z, 45, (128, 128), lat, margin=1)
        assert (v1 <= v0).all() and v1.sum() < v0.sum()
    # centred lattice: a quarter turn permutes the cells, so margin 1 drops exactly the outer ring
    _, vq = warp_back(z, 90, (128, 128), Lattice.centred(8), margin=1)
    assert vq.sum() == 14 * 14 and vq[1:15, 1:15].all()
    # corner lattice (centre c = 8.4375 cells): at 90° cell (j, i) reads view 2 at row 2c - (i + 1/2),
    # column j + 1/2; margin 1 keeps rows 1..14 and the columns with 2c - (i + 1/2) in [1, 15], i.e. i in 2..14
    _, vq = warp_back(z, 90, (128, 128), Lattice.corner(8), margin=1)
    want = torch.zeros(16, 16, dtype=torch.bool)
    want[1:15, 2:15] = True
    assert torch.equal(vq, want) and vq.sum() == 14 * 13


def test_grid_cache_is_bounded_and_hit():
    from mars_nb import views
    # on CPU warp_back uses the sparse operator: built once per (angle, grid, margin), then reused
    views._warp_operator.cache_clear()
    for _ in range(3):
        warp_back(torch.zeros(1, 1, 8, 8), 17, (64, 64), Lattice.centred(8))
    info = views._warp_operator.cache_info()
    assert info.hits >= 2 and info.misses == 1 and info.maxsize is not None
    # images: rotate keeps its grid_sample grid cached the same way
    views._grid.cache_clear()
    for _ in range(3):
        rotate(torch.zeros(1, 1, 8, 8), 17)
    info = views._grid.cache_info()
    assert info.hits >= 2 and info.maxsize is not None


def test_sparse_warp_matches_grid_sample_values_and_gradients():
    # the CPU operator against grid_sample (the path other devices take), padded maps, margins, odd sizes
    from mars_nb import views
    torch.manual_seed(0)
    # rotation centre by hand: (H/2 - offset)/stride + 1/2 per axis (H / (2 stride) for the centred lattice)
    for (H, W), stride, offset, th, margin in [((128, 128), 8, 4.0, 37.0, 0), ((100, 150), 16, 8.0, 200.0, 1),
                                               ((96, 160), 4, 2.0, 301.5, 0.5), ((128, 128), 8, 0.5, 37.0, 0),
                                               ((128, 128), 8, 0.5, 90.0, 1), ((100, 150), 16, 3.0, 180.0, 0.5)]:
        lat = Lattice(stride, offset)
        hp, wp = -(-H // 32) * 32 // stride, -(-W // 32) * 32 // stride
        t = torch.randn(2, 3, hp, wp, dtype=torch.float64, requires_grad=True)
        al, v = warp_back(t, th, (H, W), lat, margin)
        tc = crop_extent(t, (H, W), stride)
        c = ((H / 2 - offset) / stride + 0.5, (W / 2 - offset) / stride + 0.5)
        ref = views._sample(tc, views._angle(-th), tuple(tc.shape[-2:]), c, c, "bilinear").masked_fill(~v, 0)
        g = torch.randn_like(ref)
        (ga,) = torch.autograd.grad((al * g).sum(), t)
        (gr,) = torch.autograd.grad((ref * g).sum(), t)
        assert torch.allclose(al, ref, atol=1e-12) and torch.allclose(ga, gr, atol=1e-12)
        assert (ga[..., tc.shape[-2]:, :] == 0).all() and (ga[..., tc.shape[-1]:] == 0).all()  # padding gets nothing
    # float32 and half precision go through the same operator (half computed in float32)
    t = torch.randn(1, 4, 16, 16)
    lat = Lattice.corner(8)
    ref = warp_back(t.double(), 33.0, (128, 128), lat)[0]
    assert torch.allclose(warp_back(t, 33.0, (128, 128), lat)[0].double(), ref, atol=1e-5)
    assert warp_back(t.bfloat16(), 33.0, (128, 128), lat)[0].dtype == torch.bfloat16


def test_rotated_crops_match_one_by_one():
    torch.manual_seed(0)
    scene = torch.randn(3, 300, 280)
    labels = torch.randint(0, 4, (300, 280))
    centers = [(150, 140), (100, 90), (200.5, 180.5), (20, 30), (150, 200)]  # one clipped, one off-grid
    for th in (0.0, 90.0, 15.0, 233.0):
        many = rotated_crops(scene, centers, (64, 48), th)
        one = torch.stack([rotated_crop(scene, c, (64, 48), th) for c in centers])
        assert many.shape == (5, 3, 64, 48) and torch.allclose(many, one, atol=1e-6)
        lm = rotated_crops(labels, centers, (64, 48), th, mode="nearest")
        assert torch.equal(lm, torch.stack([rotated_crop(labels, c, (64, 48), th, mode="nearest") for c in centers]))
    with pytest.raises(ValueError, match="at least one centre"):
        rotated_crops(scene, [], (8, 8), 10)


# ---------------------------------------------------------------- align_attention
def test_align_attention_rows_and_zero_outside():
    B, Q, h, w = 2, 6, 4, 5  # stride-32 level of a 100x150 image padded to 128x160 -> extent 4x5
    a1 = torch.softmax(torch.randn(B, Q, h * w), -1)
    a2 = torch.softmax(torch.randn(B, Q, h * w), -1)
    p1, p2, v = align_attention(a1, a2, (h, w), 30, (100, 150), Lattice.centred(32))
    assert p1.shape == p2.shape == (B, Q, 4, 5) and v.shape == (4, 5) and not v.all()
    for p in (p1, p2):
        assert torch.allclose(p.sum((-2, -1)), torch.ones(B, Q), atol=1e-6)
        assert (p[..., ~v] == 0).all() and (p >= 0).all()
    # view 1 rows are the valid part of a1 renormalized
    g1 = a1.reshape(B, Q, h, w) * v
    assert torch.allclose(p1, g1 / g1.sum((-2, -1), keepdim=True), atol=1e-6)


def test_align_attention_per_head_and_identity():
    # rot90 of the key grid is the 90° rotation on a centred lattice only (see test_align_attention_uses_the_lattice)
    B, H_, Q, h, w = 1, 4, 3, 8, 8
    a = torch.softmax(torch.randn(B, H_, Q, h * w), -1)
    p1, p2, v = align_attention(a, torch.rot90(a.reshape(B, H_, Q, h, w), 1, dims=(-2, -1)).reshape(B, H_, Q, -1),
                                (h, w), 90, (128, 128), Lattice.centred(16))
    assert p1.shape == (B, H_, Q, h, w) and v.all()
    assert torch.allclose(p1, p2, atol=1e-7) and torch.allclose(p1.sum((-2, -1)), torch.ones(B, H_, Q))


def test_align_attention_eps_safe():
    B, Q, h, w = 1, 2, 8, 8
    a = torch.zeros(B, Q, h * w)
    a[0, 0, 0] = 1.0  # all mass in a corner that is invalid at 45 degrees
    a[0, 1] = 1.0 / (h * w)
    p1, p2, v = align_attention(a, a, (h, w), 45, (64, 64), Lattice.centred(8))
    assert not v[0, 0]
    assert torch.isfinite(p1).all() and torch.allclose(p1.sum((-2, -1)), torch.ones(B, Q))
    assert torch.allclose(p1[0, 0][v], torch.full((int(v.sum()),), 1 / v.sum().item()))


def test_align_attention_gradient():
    a2 = torch.softmax(torch.randn(1, 3, 16), -1).requires_grad_()
    a1 = torch.softmax(torch.randn(1, 3, 16), -1)
    p1, p2, v = align_attention(a1, a2, (4, 4), 20, (128, 128), Lattice.corner(32))
    (p2 ** 2).sum().backward()
    assert a2.grad is not None and torch.isfinite(a2.grad).all()


def test_align_attention_uses_the_lattice():
    # keys on a lattice: view 2's rows are warped back like a map on that lattice. At 180° that is rot180 on a
    # centred lattice (so identical rows agree exactly) and an interpolation on a corner one.
    g = torch.Generator().manual_seed(0)
    B, Q, h, w = 1, 3, 8, 8
    a = torch.softmax(torch.randn(B, Q, h * w, generator=g, dtype=torch.float64), -1)
    a2 = torch.rot90(a.reshape(B, Q, h, w), 2, dims=(-2, -1)).reshape(B, Q, -1)
    p1, p2, v = align_attention(a, a2, (h, w), 180, (128, 128), Lattice.centred(16))
    assert v.all() and torch.allclose(p1, p2, atol=1e-12)
    lat = Lattice.corner(16)
    p1, p2, v = align_attention(a, a2, (h, w), 180, (128, 128), lat, margin=0.5)
    w2, vw = warp_back(a2.reshape(B, Q, h, w), 180, (128, 128), lat, margin=0.5)
    assert torch.equal(v, vw) and not v.all()
    ref = w2 / w2.sum((-2, -1), keepdim=True)
    assert torch.allclose(p2, ref, atol=1e-7) and (p2[..., ~v] == 0).all()
    assert not torch.allclose(p1, p2, atol=1e-3)


# ---------------------------------------------------------------- match_queries
def test_match_queries_recovers_permutation():
    g = torch.Generator().manual_seed(3)
    B, Q, n = 3, 8, 40
    yy, xx = torch.meshgrid(torch.arange(n) + 0.5, torch.arange(n) + 0.5, indexing="ij")
    m1 = torch.zeros(B, Q, n, n)
    for b in range(B):
        cen = 6 + (n - 12) * torch.rand(Q, 2, generator=g)
        for q in range(Q):
            m1[b, q] = 6 - ((yy - cen[q, 0]) ** 2 + (xx - cen[q, 1]) ** 2).sqrt()  # logits of discs
    perms = torch.stack([torch.randperm(Q, generator=g) for _ in range(B)])
    m2 = m1[torch.arange(B)[:, None], perms]  # view 2 query j holds view 1's query perms[b, j]
    perm = match_queries(m1, m2, torch.ones(n, n, dtype=torch.bool))
    assert perm.dtype == torch.long and perm.shape == (B, Q)
    # view 2 query perm[b, i] corresponds to view 1 query i
    assert torch.equal(torch.gather(perms, 1, perm), torch.arange(Q).expand(B, Q))
    # probabilities work too; and through a rotation + warp back
    assert torch.equal(match_queries(m1.sigmoid(), m2.sigmoid(), torch.ones(n, n, dtype=torch.bool)), perm)
    m2w, v = warp_back(rotate(m2, 25), 25, (n, n), Lattice.centred(1))  # stride 1: pixels (= Lattice.corner(1))
    assert torch.equal(match_queries(m1, m2w, v, logits=True), perm)


# ---------------------------------------------------------------- bad inputs
C4 = Lattice.centred(4)


@pytest.mark.parametrize("call, match", [
    (lambda: rotate(torch.zeros(5), 10), "at least 2 dims"),
    (lambda: rotate(torch.zeros(4, 4), 10, mode="cubic"), "mode must be one of"),
    (lambda: rotate(torch.zeros(4, 4), float("nan")), "finite"),
    (lambda: rotate(torch.zeros(4, 4), "90"), "real number"),
    (lambda: rotate(torch.zeros(4, 4, dtype=torch.long), 10), "floating"),
    (lambda: rotate_labels(torch.zeros(4, 4), 10), "integer dtype"),
    (lambda: valid_mask((0, 4), 10), "positive integers"),
    (lambda: valid_mask((4, 4), 10, margin=-1), "margin"),
    (lambda: rotated_crop(torch.zeros(8, 8), (4, 4), (2, -2), 10), "positive integers"),
    (lambda: rotated_crop(torch.zeros(8, 8), (4, None), (2, 2), 10), "center"),
    (lambda: rotated_crop(torch.zeros(8, 8, dtype=torch.long), (4, 4), (2, 2), 10), "floating source"),
    (lambda: rotated_crops(torch.zeros(8, 8), [(4, 4), (4, 5)], (2, 2), 10, mode="cubic"), "mode must be one of"),
    (lambda: rotated_crops(torch.zeros(8, 8, dtype=torch.long), [(4, 4)], (2, 2), 10), "floating source"),
    (lambda: footprint_radius((3,)), "positive integers"),
    (lambda: warp_back(torch.zeros(1, 4, 4), 10, (16, 16), C4), "4-d"),
    (lambda: warp_back(torch.zeros(1, 1, 4, 4), 10, (16, 16), 4), "lattice must be a Lattice"),  # the old int stride
    (lambda: warp_back(torch.zeros(1, 1, 4, 4), 10, (16, 16), None), "lattice must be a Lattice"),
    (lambda: warp_back(torch.zeros(1, 1, 4, 4), 10, (16, 16), Lattice(0, 0)), "stride must be a positive integer"),
    (lambda: warp_back(torch.zeros(1, 1, 4, 4), 10, (20, 16), Lattice.corner(4)), "needs at least"),
    (lambda: warp_back(torch.zeros(1, 1, 4, 4), 10, (16, -1), Lattice.corner(4)), "image_size"),
    (lambda: warp_back(torch.zeros(1, 1, 4, 4), 10, (16, 16), Lattice.corner(4), margin=-1), "margin"),
    (lambda: crop_extent(torch.zeros(3, 3), (16, 16), 4), "needs at least"),
    (lambda: align_attention(torch.zeros(1, 2, 16), torch.zeros(1, 2, 16), (4, 5), 10, (16, 16), C4), "h\\*w"),
    (lambda: align_attention(torch.zeros(1, 2, 16), torch.zeros(1, 3, 16), (4, 4), 10, (16, 16), C4), "same shape"),
    (lambda: align_attention(torch.zeros(2, 16), torch.zeros(2, 16), (4, 4), 10, (16, 16), C4), "a1 must be"),
    (lambda: align_attention(torch.zeros(1, 2, 16), torch.zeros(1, 2, 16), (4, 4), 10, (16, 16), 4), "lattice must be a Lattice"),
    (lambda: match_queries(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4), torch.ones(4, 4, dtype=torch.bool)), "same shape"),
    (lambda: match_queries(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4), torch.ones(5, 5, dtype=torch.bool)), "valid"),
])
def test_bad_inputs_raise_helpful_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_align_attention_empty_valid_gives_zeros():
    a = torch.softmax(torch.randn(1, 2, 16), -1)
    for lat in (Lattice.centred(32), Lattice.corner(32)):   # margin 2 of a 4x4 grid: no cell centre is 2 inside
        p1, p2, v = align_attention(a, a, (4, 4), 45, (128, 128), lat, margin=2)
        assert not v.any() and (p1 == 0).all() and (p2 == 0).all()


def test_half_precision_inputs_keep_dtype_and_accuracy():
    f1, f2 = _view_maps(128, 128, Lattice.centred(8), 37.0)
    ref, v = warp_back(f2.float(), 37.0, (128, 128), Lattice.centred(8))
    for dt in (torch.float16, torch.bfloat16):
        al, v2 = warp_back(f2.to(dt), 37.0, (128, 128), Lattice.centred(8))
        assert al.dtype == dt and torch.equal(v, v2)
        assert (al.float() - ref).abs().max() < 0.02
    assert rotate(torch.randn(2, 8, 8, dtype=torch.bfloat16), 20).dtype == torch.bfloat16

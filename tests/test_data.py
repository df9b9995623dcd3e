"Tests for mars_nb.data: shipped datasets, spatial splits, rotation through the dataset path, folder errors."
import math

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from scipy import ndimage

from mars_nb.data import (TREE_SCENES, DatasetError, SceneDataset, TileSpec, band_regions, crater_scene, craters,
                          disc_instances, ellipse_instances, fold_parts, folder, labelled_parts, load_dataset, nuclei,
                          quiet_cut, semi_supervised, split_files, split_summary, trees, voc_boxes)
from mars_nb.views import IGNORE, footprint_radius, shared_region


@pytest.fixture(scope="module")
def cds():
    return craters()


@pytest.fixture(scope="module")
def nds():
    return nuclei()


@pytest.fixture(scope="module")
def tds():
    return trees()


def _rot(t, k):
    return torch.rot90(t, k, dims=(-2, -1))


def _corner(spec):
    (cy, cx), (h, w) = spec.center, spec.size
    return int(cy - h / 2), int(cx - w / 2)


# ---------------------------------------------------------------- masks from the catalog

def test_disc_masks_match_direct_distance_test(cds):
    "Semantic crater labels equal an independent 'inside any disc' test on a window of the tile."
    _, cat, _ = crater_scene()
    r0, c0, n = 400, 40, 200
    rr, cc = np.mgrid[r0:r0 + n, c0:c0 + n]
    inside = np.zeros((n, n), bool)
    for x, y, d in cat[["x", "y", "diameter"]].to_numpy():
        inside |= (cc - x) ** 2 + (rr - y) ** 2 <= (d / 2) ** 2
    assert inside.sum() > 500
    np.testing.assert_array_equal(cds.labels[0][r0:r0 + n, c0:c0 + n].numpy(), inside.astype(np.int64))


def test_disc_instances_hand_case():
    d = disc_instances((5, 5), [2, 2], [2, 2], [5, 2])
    expect = np.array([[0, 1, 1, 1, 0], [1, 1, 2, 1, 1], [1, 2, 2, 2, 1], [1, 1, 2, 1, 1], [0, 1, 1, 1, 0]])
    np.testing.assert_array_equal(d, expect)


def test_ellipse_instances_hand_case():
    "rx=2, ry=1 about pixel (row 1, col 2): the middle row whole, one pixel above and below; a small one on top."
    e = ellipse_instances((3, 5), [2, 4], [1, 2], [2, 0.5], [1, 0.5])
    np.testing.assert_array_equal(e, [[0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 0, 2]])


def test_ellipse_instances_match_the_multiplied_out_inequality():
    "Against ry²(c−x)² + rx²(r−y)² ≤ rx²ry² over every pixel (centres off the grid, so no pixel sits on a boundary)."
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 60, 30) + 0.013, rng.uniform(0, 40, 30) + 0.017
    rx, ry = rng.uniform(1, 9, 30), rng.uniform(1, 9, 30)
    got = ellipse_instances((40, 60), x, y, rx, ry)
    rr, cc = np.mgrid[0:40, 0:60]
    want = np.zeros((40, 60), np.int32)
    for i in np.argsort(-(rx * ry), kind="stable"):
        want[ry[i] ** 2 * (cc - x[i]) ** 2 + rx[i] ** 2 * (rr - y[i]) ** 2 <= (rx[i] * ry[i]) ** 2] = i + 1
    np.testing.assert_array_equal(got, want)


def test_crater_dataset_basics(cds):
    assert cds.class_names == ["background", "crater"] and cds.num_classes == 2 and cds.num_channels == 1
    assert cds.images[0].shape == (1, 1700, 1700) and cds.images[0].dtype == torch.float32
    assert int(cds.instances[0].max()) == 409 and len(torch.unique(cds.instances[0])) == 410
    y0, y1, x0, x1 = cds.regions["train"]
    train = cds.images[0][:, y0:y1, x0:x1]
    assert abs(float(train.mean())) < 1e-3 and abs(float(train.std()) - 1) < 1e-3, "normalized with train statistics"


# ---------------------------------------------------------------- rotation through the dataset path

@pytest.mark.parametrize("k", [1, 2, 3])
def test_crater_tile_quarter_turns_are_exact_rot90(cds, k):
    for spec in cds.test_tiles()[:4]:
        up, rot = cds.tile(spec, 0), cds.tile(spec, 90 * k)
        r0, c0 = _corner(spec)
        h, w = spec.size
        assert torch.equal(up["label"], cds.labels[0][r0:r0 + h, c0:c0 + w])
        assert torch.equal(up["image"], cds.images[0][:, r0:r0 + h, c0:c0 + w])
        assert torch.equal(rot["label"], _rot(up["label"], k))
        assert torch.equal(rot["image"], _rot(up["image"], k))
        assert torch.equal(rot["instance"], _rot(up["instance"], k))
        assert rot["valid"].all()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_nuclei_tile_quarter_turns_are_exact_rot90(nds, k):
    for spec in nds.test_tiles():
        up, rot = nds.tile(spec, 0), nds.tile(spec, 90 * k)
        assert torch.equal(rot["label"], _rot(up["label"], k)) and torch.equal(rot["image"], _rot(up["image"], k))
        assert torch.equal(rot["valid"], up["valid"])          # the inscribed disk at every angle


@pytest.mark.parametrize("size", [64, 128])
def test_rotate_then_crop_at_90_is_rot90_of_upright_crop(cds, size):
    spec = cds.test_tiles(size=size)[5]
    assert torch.equal(cds.tile(spec, 90)["image"], _rot(cds.tile(spec, 0)["image"], 1))
    assert torch.equal(cds.tile(spec, -90)["label"], _rot(cds.tile(spec, 0)["label"], -1))


def _reference_rotated_crop(src: np.ndarray, center, size, angle, order):
    "Independent rotate-then-crop with scipy: output offset p=(x,y) samples the source at R^-1 p (CCW, y down)."
    h, w = size
    t = math.radians(angle)
    y, x = np.mgrid[0:h, 0:w] + 0.5
    y, x = y - h / 2, x - w / 2
    sy = center[0] + x * math.sin(t) + y * math.cos(t)
    sx = center[1] + x * math.cos(t) - y * math.sin(t)
    if order == 0:  # nearest: the pixel that contains the sample point
        return src[np.floor(sy).astype(int), np.floor(sx).astype(int)]
    return ndimage.map_coordinates(src, [sy - 0.5, sx - 0.5], order=1)


@pytest.mark.parametrize("angle", [30.0, 135.0, 212.5])
def test_rotated_tile_matches_independent_resampling(cds, angle):
    spec = cds.test_tiles()[7]
    t = cds.tile(spec, angle)
    lab = _reference_rotated_crop(cds.labels[0].numpy(), spec.center, spec.size, angle, 0)
    img = _reference_rotated_crop(cds.images[0][0].numpy().astype(np.float64), spec.center, spec.size, angle, 1)
    assert (t["label"].numpy() == lab).mean() > 0.999   # nearest: only exact ties may differ
    np.testing.assert_allclose(t["image"][0].numpy(), img, atol=1e-4)
    assert t["valid"].all() and (t["label"] != IGNORE).all()


# ---------------------------------------------------------------- splits

@pytest.mark.parametrize("name", ["craters", "nuclei"])
def test_split_regions_tile_the_scene_disjointly(cds, nds, name):
    ds = cds if name == "craters" else nds
    H, W = ds.labels[0].shape
    count = np.zeros((H, W), int)
    for y0, y1, x0, x1 in ds.regions.values():
        count[y0:y1, x0:x1] += 1
    assert count.max() == 1, "a pixel belongs to two splits"
    assert count.min() == 1, "every pixel belongs to a split"
    assert set(ds.regions) == {"train", "val", "test"}


def test_crater_test_tile_footprints_inside_test_region(cds):
    y0, y1, x0, x1 = cds.regions["test"]
    tiles = cds.test_tiles()
    assert len(tiles) >= 20 and tiles == cds.test_tiles()
    for t in tiles:
        (cy, cx), R = t.center, footprint_radius(t.size)
        assert y0 <= cy - R and cy + R <= y1 and x0 <= cx - R and cx + R <= x1
    assert len({t.center for t in tiles}) == len(tiles)


def test_nuclei_test_tiles_inside_test_region(nds):
    y0, y1, x0, x1 = nds.regions["test"]
    for t in nds.test_tiles():
        r0, c0 = _corner(t)
        assert y0 <= r0 and r0 + t.size[0] <= y1 and x0 <= c0 and c0 + t.size[1] <= x1


def test_crater_counts_per_split_sum_to_409(cds):
    s = split_summary(cds).set_index("split")
    assert s.objects.sum() == 409 and (s.objects > 50).all() and (s.tiles > 0).all()
    _, cat, _ = crater_scene()
    for split, (y0, y1, _, _) in cds.regions.items():   # independent count by centre row
        assert s.objects[split] == int(((np.round(cat.y) >= y0) & (np.round(cat.y) < y1)).sum())


def test_nuclei_counts(nds):
    s = split_summary(nds).set_index("split")
    assert s.objects.sum() == 125 and int(nds.instances[0].max()) == 125


def test_band_regions_rejects_bad_fractions():
    with pytest.raises(ValueError, match="fractions"):
        band_regions(100, 100, (0.5, 0.5))
    with pytest.raises(ValueError, match="fractions"):
        band_regions(100, 100, (0.5, 0.5, 0.0))


def _split_indicator_dataset():
    "A 300x300 scene whose pixel value is its split id (train 0, val 1, test 2)."
    img = torch.zeros(1, 300, 300)
    img[:, 0:100], img[:, 100:160] = 1.0, 2.0
    parts = {"train": [(0, (160, 300, 0, 300))], "val": [(0, (0, 100, 0, 300))], "test": [(0, (100, 160, 0, 300))]}
    return SceneDataset("toy", ["a", "b"], [img], [img[0].long()], parts, tile_mode="crop")


def test_sample_views_never_leave_the_train_region():
    ds = _split_indicator_dataset()
    for i, angle in enumerate([0, 17, 45, 90, 133, 270]):
        v = ds.sample_views("train", 64, angle, np.random.default_rng(i))
        for k in ("image1", "image2"):
            assert (v[k] == 0).all(), f"{k} at {angle} deg holds pixels of another split"
        assert (v["label2"] == 0).all(), "fill or foreign labels entered view 2"
    with pytest.raises(DatasetError, match=r"92x92"):
        ds.sample_views("test", 64, 0, np.random.default_rng(0))   # a 60-row band is too small
    with pytest.raises(ValueError, match="valid splits"):
        ds.sample_views("holdout", 64, 0, np.random.default_rng(0))


# ---------------------------------------------------------------- training pairs

def test_sample_views_deterministic_and_view2_is_rotated_view1(cds):
    a = cds.sample_views("train", 128, 90.0, np.random.default_rng(123))
    b = cds.sample_views("train", 128, 90.0, np.random.default_rng(123))
    c = cds.sample_views("train", 128, 90.0, np.random.default_rng(124))
    assert set(a) == {"image1", "label1", "image2", "label2", "instance1", "instance2"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["image1"], c["image1"])
    for k in ("image", "label", "instance"):
        assert torch.equal(a[f"{k}2"], _rot(a[f"{k}1"], 1))
    assert a["image1"].shape == (1, 128, 128) and a["image1"].dtype == torch.float32
    assert a["label1"].shape == (128, 128) and a["label1"].dtype == torch.int64 and a["label2"].dtype == torch.int64


def test_sample_views_odd_angle_has_no_fill(cds, nds):
    for ds in (cds, nds):
        v = ds.sample_views("train", 128, 33.0, np.random.default_rng(5))
        assert (v["label2"] != IGNORE).all() and (v["label1"] != IGNORE).all()
        assert torch.equal(torch.unique(v["label2"]), torch.unique(v["label1"])) or v["label1"].sum() == 0


@pytest.mark.parametrize("a1, a2", [(90.0, 180.0), (270.0, 90.0), (0.0, 270.0), (180.0, 0.0)])
def test_sample_views_angle1_turns_view_1_about_the_same_centre(cds, a1, a2):
    "Quarter turns are exact: both views are rot90s of the upright crop drawn with the same generator."
    up = cds.sample_views("train", 128, 0.0, np.random.default_rng(9))
    v = cds.sample_views("train", 128, a2, np.random.default_rng(9), angle1=a1)
    for k in ("image", "label", "instance"):
        assert torch.equal(v[f"{k}1"], _rot(up[f"{k}1"], int(a1) // 90)), k
        assert torch.equal(v[f"{k}2"], _rot(up[f"{k}1"], int(a2) // 90)), k
    assert torch.equal(cds.sample_views("train", 128, a2, np.random.default_rng(9))["image1"], up["image1"])  # default: upright


def test_sample_views_at_any_angle1_have_no_fill(cds):
    v = cds.sample_views("train", 128, 200.0, np.random.default_rng(2), angle1=33.0)
    assert (v["label1"] != IGNORE).all() and (v["label2"] != IGNORE).all()
    up = cds.sample_views("train", 128, 0.0, np.random.default_rng(2))
    ref = _reference_rotated_crop(up["image1"][0].numpy().astype(np.float64), (64, 64), (128, 128), 33.0, 1)
    yy, xx = np.mgrid[0:128, 0:128] + 0.5
    inner = (yy - 64) ** 2 + (xx - 64) ** 2 <= 60 ** 2          # where the upright crop holds the turned one's source
    np.testing.assert_allclose(v["image1"][0].numpy()[inner], ref[inner], atol=1e-4)


# ---------------------------------------------------------------- spatial cross-validation

def _rows(parts):
    "Per split, the set of rows its regions cover (every region spans the full width)."
    return {s: {r for _, (y0, y1, _, _) in ps for r in range(y0, y1)} for s, ps in parts.items()}


@pytest.mark.parametrize("height, folds", [(1700, 5), (1700, 3), (101, 4), (50, 7)])
def test_fold_parts_cover_every_row_once_as_test_and_once_as_val(height, folds):
    as_test, as_val = np.zeros(height, int), np.zeros(height, int)
    for k in range(folds):
        parts = fold_parts(height, 40, folds, k)
        assert list(parts) == ["train", "val", "test"] and len(parts["val"]) == len(parts["test"]) == 1
        rows = _rows(parts)
        assert sum(len(r) for r in rows.values()) == height and set().union(*rows.values()) == set(range(height))
        for s in ("test", "val"):
            (scene, (y0, y1, x0, x1)), = parts[s]
            assert scene == 0 and (x0, x1) == (0, 40) and abs((y1 - y0) - height / folds) < 1
        as_test[list(rows["test"])] += 1
        as_val[list(rows["val"])] += 1
        train = sorted(r for _, r in parts["train"])
        assert all(a[1] < b[0] for a, b in zip(train, train[1:])), f"fold {k}: neighbouring train bands not merged: {train}"
        assert len(train) == (2 if 1 <= k <= folds - 3 else 1)     # two only when test + val cut the train bands
    assert (as_test == 1).all() and (as_val == 1).all()


def test_fold_parts_by_hand():
    assert fold_parts(1700, 1700, 5, 2) == {"train": [(0, (0, 680, 0, 1700)), (0, (1360, 1700, 0, 1700))],
                                            "val": [(0, (1020, 1360, 0, 1700))], "test": [(0, (680, 1020, 0, 1700))]}
    assert fold_parts(1700, 1700, 5, 4) == {"train": [(0, (340, 1360, 0, 1700))], "val": [(0, (0, 340, 0, 1700))],
                                            "test": [(0, (1360, 1700, 0, 1700))]}


@pytest.mark.parametrize("folds, fold", [(2, 0), (5, 5), (5, -1), (5.0, 1), (5, 1.0), (None, 0)])
def test_fold_parts_rejects_bad_folds(folds, fold):
    with pytest.raises(ValueError, match=r"need folds >= 3 and 0 <= fold < folds"):
        fold_parts(1700, 1700, folds, fold)


def test_crater_folds_put_every_crater_in_one_split_and_in_one_test_fold():
    _, cat, _ = crater_scene()
    tested = np.zeros(len(cat), int)
    for k in range(5):
        ds = craters(folds=5, fold=k)
        obj = ds.objects
        assert len(obj) == 409 and set(obj.split) == {"train", "val", "test"}, "a crater in no split (or another name)"
        rows = _rows(ds.parts)
        centre = np.floor(cat.y.to_numpy() + 0.5).astype(int)          # independent: the split that holds the centre row
        expect = np.array([next(s for s, r in rows.items() if c in r) for c in centre], dtype=object)
        assert (obj.split.to_numpy() == expect).all()
        tested += (obj.split == "test").to_numpy()
        s = split_summary(ds).set_index("split")
        assert s.objects.sum() == 409 and (s.tiles > 0).all()
    assert (tested == 1).all(), "a crater is tested in no fold or in several"


# ---------------------------------------------------------------- nuclei tiles with fill

def test_nuclei_tiles_are_scored_on_one_region_at_every_angle(nds):
    "Fill-mode tiles: the disk inscribed in the tile, at 0° too — no fill, no lost corner, the same pixels every angle."
    spec = nds.test_tiles()[0]
    t0, t45, t30 = nds.tile(spec, 0), nds.tile(spec, 45), nds.tile(spec, 30)
    disk = shared_region((128, 128))
    assert t0["valid"].dtype == torch.bool and all(torch.equal(t["valid"], disk) for t in (t0, t45, t30))
    assert abs(disk.float().mean().item() - math.pi / 4) < 0.01          # a disk, not the square
    for t in (t0, t45):
        assert (t["label"][~t["valid"]] == IGNORE).all() and (t["label"][t["valid"]] != IGNORE).all()
        assert (t["image"][:, ~t["valid"]] == 0).all()
    assert not t45["valid"][0, 0] and not t0["valid"][0, 0] and t45["valid"][64, 64]
    batch = nds.tiles(nds.test_tiles(), 45)
    assert batch["image"].shape == (4, 1, 128, 128) and batch["valid"].shape == (4, 128, 128)


# ---------------------------------------------------------------- folder datasets

def _make_folder(root, n=4, size=(48, 48), value=1):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        m = np.zeros(size, np.uint8)
        m[10:30, 5:25] = value
        Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(root / "images" / f"s{i}.png")
        Image.fromarray(m).save(root / "masks" / f"s{i}.png")
    return root


def test_folder_loads_and_splits_by_file(tmp_path):
    root = _make_folder(tmp_path / "d", n=6)
    ds = folder(root)
    assert ds.num_classes == 2 and ds.num_channels == 1 and len(ds.images) == 6
    files = {s: {ds.scene_names[i] for i, _ in p} for s, p in ds.parts.items()}
    assert set().union(*files.values()) == {f"images/s{i}.png" for i in range(6)}
    assert sum(len(f) for f in files.values()) == 6 and all(files.values())
    assert files == {s: {ds.scene_names[i] for i, _ in p} for s, p in folder(root).parts.items()}, "deterministic"
    assert split_files([f"s{i}" for i in range(6)]) == split_files([f"s{i}" for i in reversed(range(6))])
    s = split_summary(ds)
    assert s.objects.sum() == 6 and list(s.split) == ["train", "val", "test"]


def test_folder_palette_mask_gives_indices(tmp_path):
    root = _make_folder(tmp_path / "d", n=3)
    for i in range(3):
        m = Image.fromarray(np.array([[0, 1, 2] * 16] * 48, np.uint8), mode="P")
        m.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10] + [0] * (3 * 253))
        m.save(root / "masks" / f"s{i}.png")
    ds = folder(root, class_names=["bg", "a", "b"])
    assert set(torch.unique(ds.labels[1]).tolist()) == {0, 1, 2}


def test_folder_missing_pair(tmp_path):
    root = _make_folder(tmp_path / "d")
    (root / "masks" / "s2.png").unlink()
    with pytest.raises(DatasetError, match=r"images/s2\.png has no mask"):
        folder(root)


def test_folder_mask_without_image(tmp_path):
    root = _make_folder(tmp_path / "d")
    (root / "images" / "s3.png").unlink()
    with pytest.raises(DatasetError, match=r"masks/s3\.png has no image"):
        folder(root)


def test_folder_size_mismatch(tmp_path):
    root = _make_folder(tmp_path / "d")
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(root / "masks" / "s1.png")
    with pytest.raises(DatasetError, match=r"size mismatch: images/s1\.png is 48x48.*masks/s1\.png is 40x48"):
        folder(root)


def test_folder_label_out_of_range(tmp_path):
    root = _make_folder(tmp_path / "d", value=1)
    Image.fromarray(np.full((48, 48), 7, np.uint8)).save(root / "masks" / "s0.png")
    with pytest.raises(DatasetError, match=r"masks/s0\.png has label value\(s\) \[7\] out of range.*0\.\.1"):
        folder(root, num_classes=2)
    m = np.zeros((48, 48), np.uint8)
    m[0] = IGNORE
    Image.fromarray(m).save(root / "masks" / "s0.png")
    assert folder(root, num_classes=2).num_classes == 2, "IGNORE is always allowed"


def test_folder_empty(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        folder(tmp_path)
    with pytest.raises(DatasetError, match="masks/ is missing"):
        (tmp_path / "masks").rmdir()
        folder(tmp_path)


def test_folder_unreadable_files(tmp_path):
    root = _make_folder(tmp_path / "d")
    (root / "images" / "s0.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match=r"cannot read image images/s0\.png"):
        folder(root)
    root = _make_folder(tmp_path / "e")
    (root / "masks" / "s1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DatasetError, match=r"cannot read mask masks/s1\.png"):
        folder(root)


def test_folder_rgb_mask_rejected(tmp_path):
    root = _make_folder(tmp_path / "d")
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(root / "masks" / "s0.png")
    with pytest.raises(DatasetError, match=r"masks/s0\.png .*single-channel index or palette PNG"):
        folder(root)


def test_folder_too_small_for_rotated_crop(tmp_path):
    ds = folder(_make_folder(tmp_path / "d", n=4, size=(48, 48)))
    with pytest.raises(DatasetError, match=r"too small for a 64x64 training crop.*at least 92x92"):
        ds.sample_views("train", 64, 30.0, np.random.default_rng(0))
    v = ds.sample_views("train", 32, 90.0, np.random.default_rng(0))   # 48 >= ceil(32*sqrt 2) + rounding
    assert torch.equal(v["label2"], _rot(v["label1"], 1)) and "instance1" not in v


def test_folder_rgb_and_jpg_images(tmp_path):
    root = _make_folder(tmp_path / "d", n=3)
    for i in range(3):
        (root / "images" / f"s{i}.png").unlink()
        Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(root / "images" / f"s{i}.jpg")
    ds = folder(root)
    assert ds.num_channels == 3 and all(x.shape == (3, 48, 48) for x in ds.images)


def test_folder_mixed_channels_or_bit_depths_name_the_file(tmp_path):
    "An RGB image among grey ones used to make the whole set 3-channel; a 16-bit one was normalized as 8-bit."
    root = _make_folder(tmp_path / "d", n=5)
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(root / "images" / "s0.jpg")
    (root / "images" / "s0.png").unlink()
    with pytest.raises(DatasetError, match=r"images differ in channels: images/s0\.jpg has 3, 4 of 5 have 1"):
        folder(root)
    root = _make_folder(tmp_path / "e", n=5)
    Image.fromarray(np.full((48, 48), 40000, np.uint16)).save(root / "images" / "s2.png")
    with pytest.raises(DatasetError, match=r"bit depth\): images/s2\.png has uint16, 4 of 5 have uint8"):
        folder(root)


def test_folder_keeps_every_band_of_a_tiff_and_refuses_alpha(tmp_path):
    "A 4-band TIFF (RGB + near-infrared) used to be cut to 3 channels without a word."
    root = _make_folder(tmp_path / "d", n=3)
    rng = np.random.default_rng(0)
    for i in range(3):
        (root / "images" / f"s{i}.png").unlink()
        tifffile.imwrite(root / "images" / f"s{i}.tif", rng.integers(0, 4000, (48, 48, 4)).astype(np.uint16))
    ds = folder(root)
    assert ds.num_channels == 4 and ds.images[0].shape == (4, 48, 48)
    assert np.allclose([x.mean() for x in ds.images[0]], 0, atol=0.2)          # each band normalized on its own
    tifffile.imwrite(root / "images" / "s1.tif", rng.integers(0, 4000, (13, 48, 48)).astype(np.uint16))
    with pytest.raises(DatasetError, match="differ in channels: images/s1.tif has 13"):
        folder(root)                                                           # 13 bands are fine, mixing is not
    root = _make_folder(tmp_path / "e", n=3)
    Image.fromarray(np.zeros((48, 48, 4), np.uint8), mode="RGBA").save(root / "images" / "s1.png")
    with pytest.raises(DatasetError, match=r"images/s1\.png has an alpha channel"):
        folder(root)


def test_folder_declared_classes_make_a_stray_value_an_error(tmp_path):
    "A stray 3 in one mask of a 0-2 dataset used to become a fourth class without a word."
    root = _make_folder(tmp_path / "d", n=6)
    for i in range(6):
        m = np.zeros((48, 48), np.uint8); m[10:30, 5:25] = 1; m[35:45, 30:40] = 2
        if i == 4: m[5:9, 5:9] = 3
        Image.fromarray(m).save(root / "masks" / f"s{i}.png")
    with pytest.raises(DatasetError, match=r"masks/s4\.png has label value\(s\) \[3\] out of range: valid values are "
                                           r"0\.\.2 \(classes \['bg', 'a', 'b'\]\)"):
        folder(root, class_names=["bg", "a", "b"])
    split = tmp_path / "split.yaml"
    split.write_text("train: [s0, s1, s4]\nval: [s2, s3]\ntest: [s5]\n")
    with pytest.warns(UserWarning, match=r"value\(s\) \[3\] occur in very few masks.*masks/s4\.png.*declare class_names"):
        ds = folder(root, split_file=split)                                   # inferred: said, not silent
    assert ds.num_classes == 4


def test_folder_0_255_masks_are_refused_with_the_mapping_to_use(tmp_path):
    root = _make_folder(tmp_path / "d", n=4, value=255)
    with pytest.raises(DatasetError, match=r"only 0 and 255.*label_map=\{255: 1\}"):
        folder(root)
    ds = folder(root, label_map={255: 1})
    assert ds.num_classes == 2 and int((ds.labels[0] == 1).sum()) == 400


def test_folder_class_without_train_pixels_is_refused(tmp_path):
    root = _make_folder(tmp_path / "d", n=6)
    with pytest.raises(DatasetError, match=r"class\(es\) \['b'\] have no pixel in the train split"):
        folder(root, class_names=["bg", "a", "b"])


def test_folder_grouped_splits_keep_a_scene_together(tmp_path):
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True); (root / "masks").mkdir()
    m = np.zeros((48, 48), np.uint8); m[10:30, 5:25] = 1
    for scene in range(6):
        for t in range(3):
            Image.fromarray(np.full((48, 48), 10 * scene + t, np.uint8)).save(root / "images" / f"scene{scene}_t{t}.png")
            Image.fromarray(m).save(root / "masks" / f"scene{scene}_t{t}.png")
    ds = folder(root, group=r"^(scene\d+)_")
    scenes = {s: {ds.scene_names[i].split("/")[1].split("_")[0] for i, _ in p} for s, p in ds.parts.items()}
    assert all(scenes.values()) and sum(len(v) for v in scenes.values()) == 6, scenes      # no scene in two splits
    assert all(len(p) % 3 == 0 for p in ds.parts.values())
    with pytest.raises(DatasetError, match=r"matches nothing in the file name 'scene0_t0': every file needs a group"):
        folder(root, group=r"^(plate\d+)_")
    with pytest.raises(ValueError, match="not a regular expression"):
        folder(root, group="(unclosed")


def test_folder_split_file_fixes_the_split(tmp_path):
    root = _make_folder(tmp_path / "d", n=5)
    f = tmp_path / "split.yaml"
    f.write_text("train: [s0, s1, s2]\nval: [s3]\ntest: [s4]\n")
    ds = folder(root, split_file=f)
    assert {s: [ds.scene_names[i] for i, _ in p] for s, p in ds.parts.items()} == {
        "train": ["images/s0.png", "images/s1.png", "images/s2.png"], "val": ["images/s3.png"], "test": ["images/s4.png"]}
    f.write_text('{"train": ["s0", "s1"], "val": ["s3", "s1"], "test": ["s9"]}')
    with pytest.raises(DatasetError, match=r"in two splits: \['s1'\]; not in images/: \['s9'\]; in no split: \['s2', 's4'\]"):
        folder(root, split_file=f)


def test_folder_settings_are_run_parameters(tmp_path):
    from mars_nb.config import ConfigError, config_from_params
    from mars_nb.pairs import dataset_for
    root = _make_folder(tmp_path / "d", n=4, value=255)
    c = config_from_params(dataset="folder", root=str(root), class_names=["background", "leaf"], label_map={255: 1})
    assert c.data.class_names == ["background", "leaf"] and dataset_for(c).class_names == ["background", "leaf"]
    with pytest.raises(ConfigError, match="class_names=.* is only read for dataset 'folder', not 'craters'"):
        config_from_params(class_names=["a", "b"])
    with pytest.raises(ConfigError, match="give group or split_file, not both"):
        config_from_params(dataset="folder", root=str(root), group="x", split_file="y.yaml")


# ---------------------------------------------------------------- by name

def test_load_dataset_by_name():
    assert load_dataset("nuclei", tile_size=64).tile_size == 64
    with pytest.raises(ValueError, match="unknown dataset 'moon'; valid names: craters, nuclei, trees, folder"):
        load_dataset("moon")


def test_tile_spec_roundtrip(cds):
    spec = cds.test_tiles()[0]
    assert cds.tile(tuple(spec), 0)["label"].equal(cds.tile(TileSpec(*spec), 0)["label"])


def test_folder_test_images_are_scored_whole_at_every_angle(tmp_path):
    "A folder's test images used to be scored through one centred tile each (36 % of the pixels, borders never)."
    from mars_nb.evaluate import sweep
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True); (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        m = np.zeros((197, 233), np.uint8); m[20:60, 30:90] = 1; m[150:190, 200:230] = 1    # objects at the borders too
        Image.fromarray(rng.integers(0, 255, m.shape, dtype=np.uint8)).save(root / "images" / f"s{i}.png")
        Image.fromarray(m).save(root / "masks" / f"s{i}.png")
    ds = folder(root)
    specs = ds.test_tiles("test")
    assert len(specs) == len(ds.parts["test"]) and all(s.size == (320, 320) for s in specs)   # diagonal 305 -> 320
    for angle in (0, 90, 37, 180):
        t = ds.tile(specs[0], angle)
        n = int(t["valid"].sum())
        assert abs(n - 197 * 233) <= (0 if angle % 90 == 0 else 0.01 * 197 * 233), (angle, n)
        assert (t["label"][~t["valid"]] == IGNORE).all() and (t["image"][:, ~t["valid"]] == 0).all()
    up = ds.tile(specs[0], 0)
    scene = ds.parts["test"][0][0]
    assert torch.equal(up["label"][up["valid"]].reshape(197, 233), ds.labels[scene])      # every pixel, in place
    df = sweep(torch.nn.Linear(1, 1), ds, [0, 45], progress=False,
               predict=lambda model, x: torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.long))
    assert (df["n_tiles"] == len(specs)).all() and (df["fg_iou"] == 0).all()


# ---------------------------------------------------------------- trees


def test_quiet_cut_by_hand():
    top, bottom = [0, 5, 12], [10, 15, 20]          # rows each box covers
    assert quiet_cut(11, top, bottom, 3) == 11        # rows 11 and 12 are straddled by one box; 11 is nearer
    assert quiet_cut(13, top, bottom, 1) == 12        # 12: one box (5..15), 13 and 14: two
    assert quiet_cut(4, [0, 8], [3, 12], 2) == 4      # nothing straddles row 4 (box 0 ends at 3, box 1 starts at 8)
    assert quiet_cut(9, [0, 8], [3, 12], 5) == 8      # a cut at 8 leaves the box 8..12 whole below it
    assert quiet_cut(10, [0, 6], [3, 14], 6) == 6     # rows 7..14 cut the box 6..14: the nearest free row wins


def test_voc_boxes_reads_the_annotations(tmp_path):
    p = tmp_path / "a.xml"
    p.write_text("<annotation><object><name>Tree</name><bndbox><xmin>3</xmin><ymin>4</ymin><xmax>10</xmax>"
                 "<ymax>12</ymax></bndbox></object></annotation>")
    b = voc_boxes(p)
    assert b.to_dict("records") == [{"name": "Tree", "xmin": 3.0, "ymin": 4.0, "xmax": 10.0, "ymax": 12.0}]
    (tmp_path / "bad.xml").write_text("<annotation>")
    with pytest.raises(DatasetError, match="cannot read the annotations .*bad.xml"):
        voc_boxes(tmp_path / "bad.xml")


def test_trees_dataset_basics(tds):
    assert tds.class_names == ["background", "tree"] and tds.num_channels == 3 and len(tds.images) == 2
    assert len(tds.objects) == 574 + 279 and set(tds.objects.split) <= {"train", "val", "test", ""}
    assert (tds.objects[tds.objects.scene == 1].split == "train").all(), "the second tile is all train"
    pix = torch.cat([tds.images[i][:, y0:y1, x0:x1].flatten(1) for i, (y0, y1, x0, x1) in tds.parts["train"]], 1)
    assert pix.mean(1).abs().max() < 1e-3 and (pix.std(1) - 1).abs().max() < 1e-3, "normalized with train statistics"
    summary = split_summary(tds).set_index("split")
    assert (summary.tiles >= 40).all() and summary.loc["test", "objects"] >= 80


def test_trees_no_crown_is_in_two_splits(tds):
    "Every labelled crown pixel lies in its crown's split; a crown straddling a cut is IGNORE wherever it is."
    inst, label, o = tds.instances[0].numpy(), tds.labels[0].numpy(), tds.objects[tds.objects.scene == 0]
    split_of = dict(zip(o.id, o.split))
    for s, ((_, (y0, y1, x0, x1)), *_) in tds.parts.items():
        band_inst, band_label = inst[y0:y1, x0:x1], label[y0:y1, x0:x1]
        ids = np.unique(band_inst[band_label == 1])
        assert len(ids) and all(split_of[i] == s for i in ids if i), s
    cut = o[o.split == ""]
    assert 0 < len(cut) < 40
    straddlers = ellipse_instances(inst.shape, cut.x, cut.y, cut.rx, cut.ry) > 0
    assert (label[straddlers] == IGNORE).all() and (label[~straddlers] != IGNORE).all()


def test_trees_masks_are_the_ellipses_inscribed_in_the_boxes(tds):
    "Independent of the dataset code: the boxes of the annotation file, each pixel tested against its box's ellipse."
    from mars_nb.data import package_file
    b = voc_boxes(package_file("deepforest", "data", f"{TREE_SCENES[1]}.xml"))
    rr, cc = np.mgrid[0:200, 0:300]
    inside = np.zeros((200, 300), bool)
    for x0, y0, x1, y1 in b[["xmin", "ymin", "xmax", "ymax"]].to_numpy():
        inside |= ((cc - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** 2 + ((rr - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** 2 <= 1
    assert inside.sum() > 2000
    np.testing.assert_array_equal(tds.labels[1][:200, :300].numpy(), inside.astype(np.int64))


def test_trees_test_tiles_stay_in_the_test_band(tds):
    (_, (y0, y1, x0, x1)), = tds.parts["test"]
    tiles = tds.test_tiles()
    for t in tiles:
        (cy, cx), R = t.center, footprint_radius(t.size)
        assert t.scene == 0 and y0 <= cy - R and cy + R <= y1 and x0 <= cx - R and cx + R <= x1
    up, turned = tds.tile(tiles[0], 0), tds.tile(tiles[0], 90)
    torch.testing.assert_close(turned["image"], torch.rot90(up["image"], 1, dims=(-2, -1)))


# ---------------------------------------------------------------- labels for a fraction, unlabelled scenes


def test_labelled_parts_by_hand():
    parts = [(0, (0, 100, 0, 400)), (0, (200, 300, 0, 100))]          # 40 000 + 10 000 pixels
    lab, rest = labelled_parts(parts, 0.2)                              # 10 000: a 100 x 100 square in the larger part
    assert lab == [(0, (0, 100, 0, 100))]
    assert rest == [(0, (200, 300, 0, 100)), (0, (0, 100, 100, 400))]   # the other part, the strip right of the square
    lab, _ = labelled_parts(parts, 0.5)                                 # 25 000 > 100 rows: full height, 250 columns
    assert lab == [(0, (0, 100, 0, 250))]
    assert labelled_parts(parts, 1.0) == (parts, [])
    with pytest.raises(ValueError, match=r"labelled fraction must be in \(0, 1\], got 0"):
        labelled_parts(parts, 0)
    with pytest.raises(ValueError, match="more than the largest train part"):
        labelled_parts([(0, (0, 10, 0, 10)), (0, (20, 30, 0, 10)), (0, (40, 50, 0, 10))], 0.9)


@pytest.mark.parametrize("folds", [None, 5])
def test_semi_supervised_craters(cds, folds):
    full = cds if folds is None else craters(folds=folds, fold=0)
    area = lambda ps: sum((y1 - y0) * (x1 - x0) for _, (y0, y1, x0, x1) in ps)
    rects = []
    for f in (0.25, 0.10, 0.05):
        ds = load_dataset("craters", labelled=f, unlabelled=True, **({"folds": folds, "fold": 0} if folds else {}))
        (_, r), = ds.parts["train"]
        rects.append(r)
        assert abs(area(ds.parts["train"]) / area(full.parts["train"]) - f) < 0.01
        lab, ful = ds.labels[0], full.labels[0]
        y0, y1, x0, x1 = r
        assert torch.equal(lab[y0:y1, x0:x1], ful[y0:y1, x0:x1]), "the labelled rectangle keeps its labels"
        for s in ("val", "test"):
            assert ds.parts[s] == full.parts[s]
            for _, (a, b, c, d) in ds.parts[s]:
                assert torch.equal(lab[a:b, c:d], ful[a:b, c:d]), f"{s} untouched"
        train_mask = torch.zeros_like(lab, dtype=torch.bool)
        for _, (a, b, c, d) in full.parts["train"]: train_mask[a:b, c:d] = True
        train_mask[y0:y1, x0:x1] = False
        assert (lab[train_mask] == IGNORE).all(), "the rest of the train area is unlabelled"
        extra = ds.parts["unlabelled"][-5:]
        assert [i for i, _ in extra] == [1, 2, 3, 4, 5] and len(ds.images) == 6
        for i, _ in extra:
            x = ds.images[i]
            assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3, "own statistics"
            assert (ds.labels[i] == IGNORE).all()
        u = ds.sample_views("unlabelled", 128, 45.0, np.random.default_rng(3))
        assert (u["label1"] == IGNORE).all() and (u["label2"] == IGNORE).all()
        assert (ds.objects.split == "unlabelled").sum() > 0 and (ds.objects.split == "train").sum() > 0
    # nested: 5 % inside 10 % inside 25 %
    for (a0, a1, b0, b1), (c0, c1, d0, d1) in zip(rects[1:], rects[:-1]):
        assert c0 <= a0 and a1 <= c1 and d0 <= b0 and b1 <= d1


def test_semi_supervised_hides_the_labels_of_rest_pieces_too_small_for_a_crop(nds):
    "A strip of the rest narrower than a rotated crop is no unlabelled crop, but its labels are gone all the same."
    (_, (y0, y1, x0, x1)), = nds.parts["train"]                          # 256 x 512
    small = semi_supervised(nds, 0.8)               # 0.8 of it: 256 x 410 labelled, the rest 256 x 102 (a crop needs 182)
    (_, (a, b, c, d)), = small.parts["train"]
    assert (a, b, c, d) == (y0, y1, x0, x0 + 410) and "unlabelled" not in small.parts
    assert (small.labels[0][y0:y1, d:x1] == IGNORE).all() and (small.labels[0][y0:y1, d:x1] != IGNORE).sum() == 0
    assert (nds.labels[0][y0:y1, d:x1] != IGNORE).any(), "there were labels to hide"


def test_load_dataset_refuses_an_unlabelled_stream_it_cannot_offer():
    with pytest.raises(ValueError, match="'nuclei' has no unlabelled crops: give labelled < 1"):
        load_dataset("nuclei", unlabelled=True)
    assert "unlabelled" in load_dataset("nuclei", labelled=0.5, unlabelled=True).parts


def test_semi_supervised_refuses_extra_scenes_of_another_channel_count(nds):
    with pytest.raises(ValueError, match="extra scene 0 has 3 channels; nuclei has 1"):
        semi_supervised(nds, 0.5, [np.zeros((3, 300, 300), np.float32)])

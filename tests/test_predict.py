"""mars-predict: a trained run applied to new images, at any angle, written as PNG masks."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mars_nb.predict import image_files, main, predict_images
from mars_nb.config import config_from_params
from mars_nb.train import fit


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    fit(config_from_params(dataset="nuclei", mode="rotaug", steps=2, crop=64, batch_size=2), d, progress=False)
    return d


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    Image.fromarray(rng.integers(0, 255, (90, 70), dtype=np.uint8)).save(tmp_path / "in" / "a.png")
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "in" / "b.png")
    return tmp_path / "in"


def test_masks_cover_every_pixel_upright_and_at_quarter_turns(run, images, tmp_path):
    for angle in (0, 90):
        paths = predict_images(run, [images], tmp_path / f"o{angle}", angle=angle, progress=False)
        assert [p.name for p in paths] == ["a.png", "b.png"]
        a = np.asarray(Image.open(paths[0]))
        assert a.shape == (90, 70) and a.dtype == np.uint8 and set(np.unique(a)) <= {0, 1}   # no 255: every pixel
    at30 = np.asarray(Image.open(predict_images(run, [images / "a.png"], tmp_path / "o30", angle=30, progress=False)[0]))
    assert at30.shape == (90, 70) and set(np.unique(at30)) <= {0, 1, 255}


def test_probabilities_are_distributions_in_the_image_frame(run, images, tmp_path):
    predict_images(run, [images / "a.png"], tmp_path / "o", probs=True, progress=False)
    p = np.load(tmp_path / "o" / "a.npy").astype(np.float32)
    mask = np.asarray(Image.open(tmp_path / "o" / "a.png"))
    assert p.shape == (2, 90, 70) and np.allclose(p.sum(0), 1, atol=1e-2)
    assert (p.argmax(0) == mask).mean() > 0.99                     # the mask is the most probable class


def test_bad_inputs_are_named(run, images, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an image file nor a folder"):
        image_files([tmp_path / "nothing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        image_files([tmp_path / "empty"])
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"rgb\.png has 3 channel\(s\); the run .* was trained on 1"):
        predict_images(run, [tmp_path / "rgb.png"], tmp_path / "o", progress=False)
    assert main([str(run), str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2


def test_command_line(run, images, tmp_path):
    assert main([str(run), str(images), "--out", str(tmp_path / "cli"), "--angle", "15"]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["a.png", "b.png"]
    cli = Path(sys.executable).parent / "mars-predict"          # the console script of the installed package
    help_text = subprocess.run([str(cli), "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "--angle" in help_text.stdout

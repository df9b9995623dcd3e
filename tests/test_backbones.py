"""Tests for mars_nb.backbones and the lite0 presets: the ImageNet weights load into the network they fit, the
folded stem, Mask2Former with the swapped backbone (forward, a training step, its taps' lattice)."""
import pytest
import torch
import torch.nn.functional as F

from mars_nb.backbones import (LITE0_CHANNELS, Lite0Backbone, fold_input_kernels, lite0_weights_file,
                               load_lite0_weights, natural_image, variance_drift)
from mars_nb.model import build_model, mask2former_loss
from mars_nb.taps import measure_lattice, tap_meta
from mars_nb.views import Lattice


def test_fold_input_kernels_by_hand():
    w = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    assert fold_input_kernels(w, 3) is w
    assert fold_input_kernels(w, 1).flatten().tolist() == [6.0]
    assert fold_input_kernels(w, 2).flatten().tolist() == [1.5, 3.0]                       # cycled, x 3/2
    assert torch.allclose(fold_input_kernels(w, 5).flatten(), torch.tensor([1, 2, 3, 1, 2]) * 0.6)
    with pytest.raises(ValueError, match="num_channels must be >= 1"):
        fold_input_kernels(w, 0)


def test_every_backbone_tensor_comes_from_the_wheel():
    sd = torch.load(lite0_weights_file(), weights_only=True)
    bb = load_lite0_weights(Lite0Backbone(3))
    own = bb.state_dict()
    assert len(own) == len(sd) - 8                                   # all but the classifier head's 8 tensors
    assert all(torch.equal(own[k], sd[k]) for k in own)
    grey = load_lite0_weights(Lite0Backbone(1))
    assert torch.equal(grey._conv_stem.weight, sd["_conv_stem.weight"].sum(1, keepdim=True))


def test_a_wrong_file_is_refused(tmp_path):
    f = tmp_path / "other.pth"
    sd = torch.load(lite0_weights_file(), weights_only=True)
    sd["_blocks.3._depthwise_conv.weight"] = sd["_blocks.3._depthwise_conv.weight"][..., :3, :3]   # a 3x3 where 5x5 is
    torch.save(sd, f)
    with pytest.raises(RuntimeError, match="_blocks.3._depthwise_conv.weight"):
        load_lite0_weights(Lite0Backbone(3), f)


def test_lite0_refuses_inputs_with_other_channels():
    with pytest.raises(ValueError, match=r"expected pixel_values \[B, 1, H, W\]"):
        Lite0Backbone(1)(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("preset", ["lite0", "lite0-scratch"])
def test_lite0_presets_build_mask2former_on_the_lite0_backbone(preset):
    torch.manual_seed(0)
    m = build_model(preset, num_labels=2, num_channels=1)
    enc = m.model.pixel_level_module.encoder
    assert isinstance(enc, Lite0Backbone) and enc.channels == list(LITE0_CHANNELS) == [24, 40, 112, 320]
    pretrained = torch.equal(enc._blocks[5]._depthwise_conv.weight,
                             torch.load(lite0_weights_file(), weights_only=True)["_blocks.5._depthwise_conv.weight"])
    assert pretrained == (preset == "lite0")
    out = m(pixel_values=torch.randn(2, 1, 128, 128))
    assert out.masks_queries_logits.shape[-2:] == (32, 32)
    # one training step reaches the backbone
    loss = mask2former_loss(out, torch.randint(0, 2, (2, 128, 128)), m.config)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and enc._blocks[0]._depthwise_conv.weight.grad.abs().sum() > 0
    # the taps see the swapped backbone: its channels and its declared lattice
    meta = tap_meta(m)
    assert [meta[f"backbone.res{i}"].channels for i in range(2, 6)] == [24, 40, 112, 320]
    assert [meta[f"backbone.res{i}"].lattice for i in range(2, 6)] == [Lattice.corner(s) for s in (4, 8, 16, 32)]


def test_lite0_refuses_a_backbone_override():
    with pytest.raises(ValueError, match="brings its own backbone"):
        build_model("lite0-scratch", backbone_config={"depths": [2, 2, 2, 2]})
    with pytest.raises(ValueError, match="builds its own backbone; a checkpoint"):
        build_model("lite0", pretrained="some/checkpoint")


def test_a_swapped_backbone_declares_its_lattice_to_the_taps():
    "The taps read the lattice the encoder declares, not the one its (placeholder) ResNet config would give."
    m = build_model("lite0-scratch")
    m.model.pixel_level_module.encoder.lattice = "centred"              # an instance attribute: this model only
    assert [tap_meta(m)[f"backbone.res{i}"].lattice for i in range(2, 6)] == [Lattice.centred(s) for s in (4, 8, 16, 32)]


def test_lite0_declared_lattice_is_the_measured_one():
    "The lattice the backbone declares (corner: cell j on pixel s*j) is where its D4-symmetrized cells look."
    torch.manual_seed(0)
    found = measure_lattice(Lite0Backbone(1), {f"res{i + 2}": (lambda o, i=i: o.feature_maps[i]) for i in range(4)},
                            snap=None)
    assert Lite0Backbone.lattice == "corner"
    # measured 0.50, 0.58, 0.85, 0.88 px (strides 4..32); model seeds 1, 2: within 0.2 px of 0.5 up to stride 16, and
    # 1.44, 1.06 px at stride 32, where a cell's receptive field spans the whole 256-px probe (centred would be 16)
    for name, lat in found.items():
        assert abs(lat.offset - 0.5) <= max(0.75, lat.stride / 16) and abs(lat.offset - lat.stride / 2) >= 1.0, (name, lat)


def test_lite0_weights_compute_what_imagenet_training_saw():
    """On a natural photograph, every batch-norm layer's input has about the variance it had in ImageNet training
    (its running_var) with the network as written, and drifts away with the wrong activation or no shortcuts."""
    x = natural_image(256)
    net = load_lite0_weights(Lite0Backbone(3))
    right = variance_drift(net, x)
    assert net.training                                               # its mode is given back
    swish = load_lite0_weights(Lite0Backbone(3))
    for m in swish.modules():
        if hasattr(m, "act"): m.act = F.silu
    plain = load_lite0_weights(Lite0Backbone(3))
    for b in plain._blocks: b.shortcut = False
    wrong = {"swish": variance_drift(swish, x), "no shortcuts": variance_drift(plain, x)}
    assert right < 0.8 and wrong["swish"] > 1.5 * right and wrong["no shortcuts"] > 2 * right, (right, wrong)

"""Tests for mars_nb.model: presets, channel folding, padding, targets, semantic inference, training."""
import pytest
import torch
import torch.nn.functional as F

from mars_nb.model import (PRESETS, adapt_input_channels, build_model, pad_to_multiple, predict_semantic,
                           preset_config, semantic_probs, semantic_targets)

IGNORE = 255


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny", num_labels=2, num_channels=1)


def test_tiny_forward_shapes(tiny):
    out = tiny(pixel_values=torch.randn(2, 1, 128, 128))
    q = tiny.config.num_queries
    assert out.masks_queries_logits.shape == (2, q, 32, 32)
    assert out.class_queries_logits.shape == (2, q, 3)
    # >= 3 masked-attention layers so that every attention level (i % 3) is used
    assert len(tiny.model.transformer_module.decoder.layers) >= 3
    assert tiny.num_parameters() < 5_000_000


def test_r50_is_the_paper_architecture():
    cfg = preset_config("r50", num_labels=2, num_channels=3)
    bb = cfg.backbone_config
    assert bb.depths == [3, 4, 6, 3] and bb.layer_type == "bottleneck" and bb.hidden_sizes == [256, 512, 1024, 2048]
    assert cfg.hidden_dim == 256 and cfg.num_queries == 100 and cfg.encoder_layers == 6
    model = build_model("r50", num_labels=2, num_channels=3)
    assert len(model.model.transformer_module.decoder.layers) == 9
    # a ResNet-50 without its classifier head has 23,508,032 parameters (torchvision: 25,557,032 - fc 2,049,000)
    backbone = model.model.pixel_level_module.encoder
    assert sum(p.numel() for p in backbone.parameters()) == 23_508_032


def test_bad_presets_and_overrides():
    with pytest.raises(ValueError, match="r50"):
        build_model("huge")
    with pytest.raises(ValueError, match="num_querys"):
        build_model("tiny", num_querys=3)
    with pytest.raises(ValueError, match="pretrained="):
        build_model("pretrained")


def test_overrides_reach_config():
    m = build_model("tiny", num_labels=4, num_queries=8, backbone_config={"depths": [1, 1, 1, 1]})
    assert m.config.num_queries == 8 and m.config.num_labels == 4 and m.config.backbone_config.depths == [1, 1, 1, 1]
    assert m.class_predictor.out_features == 5
    assert "depths" in PRESETS["tiny"]["backbone_config"] and PRESETS["tiny"]["backbone_config"]["depths"] == [1, 1, 2, 1]


def test_pad_to_multiple():
    x = torch.arange(2 * 3 * 50 * 70, dtype=torch.float).reshape(2, 3, 50, 70)
    p, hw = pad_to_multiple(x, 32, value=-1.0)
    assert p.shape == (2, 3, 64, 96) and hw == (50, 70)
    assert torch.equal(p[..., :50, :70], x)
    assert (p[..., 50:, :] == -1).all() and (p[..., :, 70:] == -1).all()
    same, hw2 = pad_to_multiple(torch.zeros(1, 64, 32))
    assert same.shape == (1, 64, 32) and hw2 == (64, 32)
    y = torch.zeros(1, 33, 33, dtype=torch.long)
    py, _ = pad_to_multiple(y, 32, value=IGNORE)
    assert py.dtype == torch.long and py.shape == (1, 64, 64) and (py[:, 33:] == IGNORE).all()


def test_semantic_targets_against_loop():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (3, 9, 7), generator=g)
    labels[0][labels[0] == 2] = IGNORE          # class 2 absent from image 0
    labels[1, :3] = IGNORE
    labels[2] = 1                               # a single class
    masks, ids = semantic_targets(labels, num_labels=4)
    for b in range(3):
        present = [k for k in range(4) if (labels[b] == k).any()]
        assert ids[b].tolist() == present and ids[b].dtype == torch.long
        assert masks[b].dtype == torch.float and masks[b].shape == (len(present), 9, 7)
        for i, k in enumerate(present):
            assert torch.equal(masks[b][i], (labels[b] == k).float())
        # ignored pixels belong to no mask, every other pixel to exactly one
        cover = masks[b].sum(0)
        assert torch.equal(cover, (labels[b] != IGNORE).float())


def test_semantic_targets_empty_and_errors():
    masks, ids = semantic_targets(torch.full((1, 4, 4), IGNORE), num_labels=2)
    assert masks[0].shape == (0, 4, 4) and ids[0].numel() == 0
    with pytest.raises(ValueError, match="outside"):
        semantic_targets(torch.tensor([[[0, 5]]]), num_labels=2)
    with pytest.raises(ValueError, match="B, H, W"):
        semantic_targets(torch.zeros(4, 4, dtype=torch.long), num_labels=2)


def test_semantic_probs_against_loop():
    g = torch.Generator().manual_seed(2)
    B, Q, K, h, w = 2, 5, 3, 4, 6
    cl, ml = torch.randn(B, Q, K + 1, generator=g), torch.randn(B, Q, h, w, generator=g)
    ref = torch.zeros(B, K, h, w)
    for b in range(B):
        for q in range(Q):
            e = torch.exp(cl[b, q] - cl[b, q].max())
            p = e / e.sum()
            for k in range(K):
                ref[b, k] += p[k] * torch.sigmoid(ml[b, q])
    out = semantic_probs(cl, ml, (h, w))
    assert torch.allclose(out, ref, atol=1e-6)
    up = semantic_probs(cl, ml, (16, 24))
    assert torch.allclose(up, F.interpolate(ref, size=(16, 24), mode="bilinear", align_corners=False), atol=1e-6)
    with pytest.raises(ValueError):
        semantic_probs(cl, ml[:, :3], (h, w))


@pytest.mark.parametrize("training", [True, False])
def test_predict_semantic(tiny, training):
    tiny.train(training)
    x = torch.randn(2, 1, 100, 90)
    pred = predict_semantic(tiny, x)
    assert tiny.training == training
    assert pred.shape == (2, 100, 90) and pred.dtype == torch.long and not pred.requires_grad
    assert set(pred.unique().tolist()) <= {0, 1}
    # independent reference: pad by hand, forward in eval mode, upsample, crop, argmax
    tiny.eval()
    with torch.no_grad():
        xp = torch.zeros(2, 1, 128, 96)
        xp[..., :100, :90] = x
        out = tiny(pixel_values=xp)
        cls = out.class_queries_logits.softmax(-1)[..., :-1]
        seg = (cls[..., None, None] * out.masks_queries_logits.sigmoid()[:, :, None]).sum(1)
        ref = F.interpolate(seg, size=(128, 96), mode="bilinear", align_corners=False)[..., :100, :90].argmax(1)
    tiny.train(training)
    assert torch.equal(pred, ref)


@pytest.mark.parametrize("criterion", ["hf", "mask2former_loss"])
def test_tiny_loss_goes_down(criterion):
    "Both Hugging Face's criterion and ours (here with an ignored strip) train the tiny model."
    from mars_nb.model import mask2former_loss
    torch.manual_seed(0)
    model = build_model("tiny")
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[0, 10:40, 5:30] = 1
    labels[1, 30:60, 20:50] = 1
    images = torch.randn(2, 1, 64, 64, generator=g) * 0.5 + labels[:, None].float()
    mask_labels, class_labels = semantic_targets(labels, 2)
    ignored = labels.clone()
    ignored[:, :, 56:] = IGNORE
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        if criterion == "hf":
            loss = model(pixel_values=images, mask_labels=mask_labels, class_labels=class_labels).loss
        else:
            loss = mask2former_loss(model(pixel_values=images, output_auxiliary_logits=True), ignored, model.config,
                                    generator=g)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]


def test_pretrained_roundtrip_folds_channels(tmp_path):
    torch.manual_seed(0)
    src = build_model("tiny", num_labels=2, num_channels=3).eval()
    src.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pretrained="):
        build_model("pretrained", num_labels=3)
    dst = build_model("pretrained", pretrained=str(tmp_path), num_labels=3, num_channels=1).eval()
    assert dst.class_predictor.out_features == 4 and dst.config.num_labels == 3
    assert dst.config.backbone_config.num_channels == 1
    # weights outside the classifier come from the checkpoint
    assert torch.equal(dst.model.transformer_module.queries_features.weight,
                       src.model.transformer_module.queries_features.weight)
    # a grey image through the folded model == the same image repeated to RGB through the original
    g = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        a = src.model.pixel_level_module(g.repeat(1, 3, 1, 1))
        b = dst.model.pixel_level_module(g)
    assert torch.allclose(a.decoder_last_hidden_state, b.decoder_last_hidden_state, atol=1e-4)
    assert predict_semantic(dst, g).shape == (2, 64, 64)


def test_adapt_input_channels_other_counts():
    torch.manual_seed(0)
    m = build_model("tiny", num_channels=3)
    w = m.model.pixel_level_module.encoder.embedder.embedder.convolution.weight.detach().clone()
    adapt_input_channels(m, 2)
    w2 = m.model.pixel_level_module.encoder.embedder.embedder.convolution.weight
    assert w2.shape[1] == 2 and torch.allclose(w2, w[:, :2] * 1.5)
    assert m(pixel_values=torch.randn(1, 2, 64, 64)).masks_queries_logits.shape[-2:] == (16, 16)
    with pytest.raises(ValueError):
        adapt_input_channels(m, 0)


@pytest.mark.parametrize("size", [(1, 1), (20, 45), (33, 31), (64, 70)])
def test_images_smaller_than_a_stride_or_not_a_multiple_of_32_are_padded(tiny, size):
    "By design inference pads any image bottom/right to a multiple of 32 (training crops must be multiples instead)."
    tiny.eval()
    x = torch.randn(2, 1, *size)
    pred = predict_semantic(tiny, x)
    assert pred.shape == (2, *size) and pred.dtype == torch.long
    xp, hw = pad_to_multiple(x, 32)
    assert hw == size and xp.shape[-2] % 32 == 0 and xp.shape[-1] % 32 == 0 and xp.shape[-2] >= 32
    assert torch.equal(predict_semantic(tiny, xp)[:, :size[0], :size[1]], pred), "not the padded image's prediction"
    with pytest.raises(ValueError, match=rf"images must be \[B, C, H, W\], got shape \(1, {size[0]}, {size[1]}\)"):
        predict_semantic(tiny, x[0])


# ---------------------------------------------------------------------------------------------
# the supervised loss of training: Mask2Former's criterion with an ignore region

from types import SimpleNamespace  # noqa: E402

from mars_nb import model as model_module  # noqa: E402
from mars_nb.model import mask2former_loss  # noqa: E402


@pytest.fixture(scope="module")
def loss_setup():
    "A random tiny model (3 classes, many points), its output on 2 images of 32x32 (mask logits 8x8: stride 4) with aux layers."
    torch.manual_seed(0)
    cfg = preset_config("tiny", num_labels=3, train_num_points=4096)
    m = build_model("tiny", num_labels=3, train_num_points=4096).eval()
    with torch.no_grad():
        out = m(pixel_values=torch.randn(3, 1, 32, 32), output_auxiliary_logits=True)
    assert out.masks_queries_logits.shape[-2:] == (8, 8) and len(out.auxiliary_logits) >= 2
    return cfg, out


def _leaf_outputs(out, idx=None, grad=True):
    "Detached leaf copies of every layer's (class, mask) logits (images `idx`), as a criterion input; and the leaves."
    pick = (lambda t: t[idx]) if idx is not None else (lambda t: t)
    leaf = lambda t: pick(t).detach().clone().requires_grad_(grad)
    aux = [{"class_queries_logits": leaf(a["class_queries_logits"]), "masks_queries_logits": leaf(a["masks_queries_logits"])}
           for a in out.auxiliary_logits]
    ns = SimpleNamespace(class_queries_logits=leaf(out.class_queries_logits), masks_queries_logits=leaf(out.masks_queries_logits),
                         auxiliary_logits=aux)
    masks = [a["masks_queries_logits"] for a in aux] + [ns.masks_queries_logits]
    classes = [a["class_queries_logits"] for a in aux] + [ns.class_queries_logits]
    return ns, masks, classes


def _half_ignored(n=2, seed=1):
    "Labels [n, 32, 32] with all three classes on the left half and the right half (columns 16..31) ignored."
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, 3, (n, 32, 32), generator=g)
    lab[..., 16:] = IGNORE
    return lab


def _supported(valid: torch.Tensor, stride: int = 4, cells: int = 8) -> torch.Tensor:
    """[cells, cells] bool: does the bilinear support of stride-`stride` cell (i, j) (align_corners=False: centred at
    stride*j + stride/2, reaching one cell each way) overlap a valid pixel (r, c) (the square [r, r+1) x [c, c+1))?"""
    rows, cols = valid.any(1), valid.any(0)                    # the valid region here is a product of rows and columns

    def hit(keep):
        pix = torch.arange(len(keep))
        lo = stride * torch.arange(cells) - stride / 2         # support of cell j: the open interval (lo, lo + 2*stride)
        return torch.tensor([bool(keep[(pix + 1 > l) & (pix < l + 2 * stride)].any()) for l in lo.tolist()])
    return hit(rows)[:, None] & hit(cols)[None, :]


def test_mask2former_loss_gives_no_gradient_where_only_ignored_pixels_are(loss_setup):
    cfg, out = loss_setup
    lab = _half_ignored()
    ns, masks, _ = _leaf_outputs(out, [0, 1])
    loss = mask2former_loss(ns, lab, cfg, generator=torch.Generator().manual_seed(0))
    assert set(loss) == {"loss", "loss_ce", "loss_mask", "loss_dice"} and torch.isfinite(loss["loss"])
    loss["loss"].backward()
    sup = _supported(lab[0] != IGNORE)
    assert sup[:, :5].all() and not sup[:, 5:].any()          # cells 5..7 (support from pixel 18 on): ignored only
    for layer, m in enumerate(masks):
        g = m.grad.abs().sum(1)                                  # [B, 8, 8], over queries (only matched ones get any)
        assert (g[:, ~sup] == 0).all(), f"layer {layer}: gradient on cells that see only ignored pixels"
        assert (g[:, sup] > 0).all(), f"layer {layer}: a cell over valid pixels got no gradient"


def test_mask2former_loss_does_not_see_logits_over_ignored_pixels(loss_setup):
    cfg, out = loss_setup
    lab = _half_ignored()
    run = lambda ns: mask2former_loss(ns, lab, cfg, generator=torch.Generator().manual_seed(7))
    ref = run(_leaf_outputs(out, [0, 1], grad=False)[0])
    g = torch.Generator().manual_seed(3)
    for scale in (100.0, -1e4, float("nan")):
        ns, masks, _ = _leaf_outputs(out, [0, 1], grad=False)
        for m in masks:                                          # anything at all where only ignored pixels are
            m[..., 5:] = scale * torch.randn(m[..., 5:].shape, generator=g) if scale == scale else scale
        got = run(ns)
        for k in ref:
            assert torch.equal(got[k], ref[k]), (scale, k)
    # the same change on cells over valid pixels changes the loss: the comparison can fail
    ns, masks, _ = _leaf_outputs(out, [0, 1], grad=False)
    masks[-1][..., 4] = 100.0
    assert not torch.equal(run(ns)["loss"], ref["loss"])


def test_an_image_that_is_entirely_ignored_contributes_nothing(loss_setup):
    cfg, out = loss_setup
    lab = torch.cat([_half_ignored(1, seed=2), torch.full((1, 32, 32), IGNORE), _half_ignored(1, seed=4)])
    with_it, masks, classes = _leaf_outputs(out)                 # images 0, 1 (all ignored), 2
    without, _, _ = _leaf_outputs(out, [0, 2])
    a = mask2former_loss(with_it, lab, cfg, generator=torch.Generator().manual_seed(5))
    b = mask2former_loss(without, lab[[0, 2]], cfg, generator=torch.Generator().manual_seed(5))
    for k in a:                                                  # the same points drawn: the same numbers, bit for bit
        assert torch.equal(a[k], b[k]), k
    a["loss"].backward()
    for m, c in zip(masks, classes):
        assert (m.grad[1] == 0).all() and (c.grad[1] == 0).all()
        assert m.grad[[0, 2]].abs().sum() > 0 and c.grad[[0, 2]].abs().sum() > 0
    # a batch with nothing valid at all: a zero that still backpropagates (to zero gradients)
    nothing, masks, _ = _leaf_outputs(out, [1])
    z = mask2former_loss(nothing, lab[[1]], cfg)
    assert all(float(v.detach()) == 0.0 for v in z.values())
    z["loss"].backward()
    assert (masks[-1].grad == 0).all()


def test_mask2former_loss_equals_the_hugging_face_criterion_without_ignored_pixels(monkeypatch):
    """Both criteria evaluated at every cell centre once (HF: `torch.rand` patched; ours: `valid_points` patched),
    labels on the 8x8 grid of the mask logits, no importance sampling: the same number to 1e-5."""
    torch.manual_seed(0)
    cfg = preset_config("tiny", num_labels=3, train_num_points=64, oversample_ratio=1.0, importance_sample_ratio=0.0)
    m = build_model("tiny", num_labels=3, train_num_points=64, oversample_ratio=1.0, importance_sample_ratio=0.0).eval()
    x, y = torch.randn(3, 1, 32, 32), torch.randint(0, 3, (3, 8, 8), generator=torch.Generator().manual_seed(0))
    y[2] = torch.where(y[2] == 1, 0, y[2])                        # an image without class 1
    with torch.no_grad():
        out = m(pixel_values=x, output_auxiliary_logits=True)
    centres = torch.stack(torch.meshgrid(torch.arange(8) + 0.5, torch.arange(8) + 0.5, indexing="xy"), -1).reshape(1, 64, 2) / 8
    mask_labels, class_labels = semantic_targets(y, 3)
    real_rand, calls = torch.rand, []

    def every_centre(*shape, **kw):                              # the HF sampler: (boxes, points, 2) -> each centre once
        if len(shape) == 3 and tuple(shape[1:]) == (64, 2):
            calls.append(shape)
            return centres.expand(shape[0], -1, -1).clone()
        return real_rand(*shape, **kw)

    monkeypatch.setattr(torch, "rand", every_centre)
    ref = m.get_loss(m.get_loss_dict(out.masks_queries_logits, out.class_queries_logits, mask_labels, class_labels,
                                     out.auxiliary_logits))
    monkeypatch.setattr(torch, "rand", real_rand)
    assert calls, "the HF criterion drew no points through torch.rand: the patch did not take"
    ours_calls = []

    def centre_points(pools, counts, which, n, hw, generator=None):
        ours_calls.append((n, hw))
        return centres[0].expand(len(which), n, 2), torch.arange(64).expand(len(which), n)

    monkeypatch.setattr(model_module, "valid_points", centre_points)
    ours = mask2former_loss(out, y, cfg)
    assert ours_calls and all(c == (64, (8, 8)) for c in ours_calls)
    assert torch.isclose(ours["loss"], ref, rtol=1e-5, atol=1e-5), (ours["loss"].item(), ref.item())


@pytest.mark.parametrize("bad", [3, 7, -1, 254])
def test_mask2former_loss_refuses_labels_outside_the_classes(loss_setup, bad):
    cfg, out = loss_setup
    lab = _half_ignored(3)
    lab[1, 4, 4] = bad
    with pytest.raises(ValueError, match=rf"outside 0\.\.2 and ignore_index=255: \[{bad}\]"):
        mask2former_loss(_leaf_outputs(out)[0], lab, cfg)
    lab[1, 4, 4] = IGNORE
    mask2former_loss(_leaf_outputs(out)[0], lab, cfg)          # 255 is fine

"""MARS losses: distances against hand-computed / scipy references, the equivariance check on toy
networks, gradient flow, the pooled paper term, configuration and validation."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy
from torch import nn

from mars_nb.losses import (
    DEFAULT_STAGES, PRESET_NAMES, MarsLoss, MarsPooled, attention_distance, block_rows, feature_distance,
    infonce_distance, mars_preset, resolve_config, tap_channels,
)
from mars_nb.views import align_attention, rotate, warp_back


def pix(vectors):
    "A [1, C, 1, n] feature map from n channel vectors."
    return torch.tensor(vectors, dtype=torch.float64).T.reshape(1, len(vectors[0]), 1, len(vectors))


# ---------------------------------------------------------------------------------------------
# feature distances, hand-computed


def test_cosine_hand_computed():
    f1 = pix([[3.0, 4.0], [1.0, 0.0], [1.0, 2.0]])
    f2 = pix([[4.0, 3.0], [0.0, 5.0], [-1.0, -2.0]])
    d = [1 - 24 / 25, 1.0, 2.0]  # cos = 24/25, 0, -1
    assert feature_distance(f1, f2).item() == pytest.approx(np.mean(d))
    assert feature_distance(f1, f2, torch.tensor([[True, False, True]])).item() == pytest.approx((d[0] + d[2]) / 2)
    # a [B, h, w] mask: one mask per sample
    g1, g2 = torch.cat([f1, f1]), torch.cat([f2, f2])
    m = torch.tensor([[[True, False, False]], [[False, True, True]]])
    assert feature_distance(g1, g2, m).item() == pytest.approx(np.mean([d[0], d[1], d[2]]))
    # scale-blind
    assert feature_distance(f1, 7 * f1).item() == pytest.approx(0.0, abs=1e-12)


def test_mse_and_smooth_l1_hand_computed():
    f1 = pix([[0.0, 0.0], [1.0, -1.0]])
    f2 = pix([[0.5, 3.0], [1.0, 1.0]])
    diffs = np.array([[0.5, 3.0], [0.0, 2.0]])
    assert feature_distance(f1, f2, kind="mse").item() == pytest.approx((diffs ** 2).mean())
    huber = np.where(diffs < 1.0, 0.5 * diffs ** 2, diffs - 0.5)  # beta = 1
    assert feature_distance(f1, f2, kind="smooth_l1").item() == pytest.approx(huber.mean())
    huber2 = np.where(diffs < 2.0, 0.5 * diffs ** 2 / 2.0, diffs - 1.0)  # beta = 2
    assert feature_distance(f1, f2, kind="smooth_l1", beta=2.0).item() == pytest.approx(huber2.mean())
    # masked-out pixels do not count whatever they hold
    m = torch.tensor([[True, False]])
    assert feature_distance(f1, f2, m, kind="mse").item() == pytest.approx((diffs[0] ** 2).mean())


def test_empty_mask_gives_zero_with_graph():
    f1 = torch.randn(2, 3, 4, 4, requires_grad=True)
    d = feature_distance(f1, torch.randn(2, 3, 4, 4), torch.zeros(4, 4, dtype=torch.bool))
    assert d.item() == 0.0
    d.backward()
    assert torch.isfinite(f1.grad).all()


def test_infonce_two_pixels_matches_plain_formula():
    torch.manual_seed(1)
    f1, f2 = torch.randn(1, 5, 1, 2, dtype=torch.float64), torch.randn(1, 5, 1, 2, dtype=torch.float64)
    z1 = F.normalize(f1[0, :, 0].T, dim=1).numpy()
    z2 = F.normalize(f2[0, :, 0].T, dim=1).numpy()
    tau, K = 0.2, 4
    ref = []
    for q, k in ((z1, z2), (z2, z1)):
        for p in range(2):  # the only other location is 1 - p, drawn K times
            logits = np.array([q[p] @ k[p]] + [q[p] @ k[1 - p]] * K) / tau
            ref.append(np.log(np.exp(logits).sum()) - logits[0])
    assert infonce_distance(f1, f2, tau=tau, num_negatives=K).item() == pytest.approx(np.mean(ref))
    one_way = infonce_distance(f1, f2, tau=tau, num_negatives=K, symmetric=False).item()
    assert one_way == pytest.approx(np.mean(ref[:2]))


def test_infonce_never_samples_the_anchor_as_negative():
    # one-hot features: every negative has similarity 0, the positive 1 -> a closed form, if and only if
    # the anchor itself is never drawn as a negative
    n, K, tau = 9, 16, 0.5
    f = torch.eye(n, dtype=torch.float64).reshape(1, n, 3, 3)
    expected = math.log(1 + K * math.exp(-1 / tau))
    assert feature_distance(f, f, kind="infonce", tau=tau, num_negatives=K).item() == pytest.approx(expected)


def test_infonce_reproducible_and_discriminative():
    torch.manual_seed(0)
    f = torch.randn(2, 6, 8, 8)
    a = feature_distance(f, f, kind="infonce", seed=5)
    assert a == feature_distance(f, f, kind="infonce", seed=5)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert infonce_distance(f, f, generator=g1) == infonce_distance(f, f, generator=g2)
    assert infonce_distance(f, f, generator=g1) == infonce_distance(f, f, generator=g2)  # both advanced alike
    # anchors subsampled: still finite and the right order of magnitude
    assert infonce_distance(f, f, max_anchors=10).item() < infonce_distance(f, f.roll(3, -1), max_anchors=10).item()
    assert a < feature_distance(f, torch.randn_like(f), kind="infonce", seed=5)


# ---------------------------------------------------------------------------------------------
# attention distances


def dist(*rows):
    return torch.tensor(np.array(rows), dtype=torch.float64).reshape(1, len(rows), 1, len(rows[0]))


def test_js_kl_mse_against_scipy():
    p, q = np.array([0.2, 0.5, 0.3]), np.array([0.6, 0.1, 0.3])
    r, s = np.array([1.0, 0.0, 0.0]), np.array([0.25, 0.25, 0.5])
    P, Q = dist(p, r), dist(q, s)
    js = np.mean([jensenshannon(p, q) ** 2, jensenshannon(r, s) ** 2])
    assert attention_distance(P, Q).item() == pytest.approx(js, abs=1e-7)
    assert attention_distance(P, Q, kind="kl").item() == pytest.approx(np.mean([entropy(p, q), entropy(r, s)]), abs=1e-6)
    assert attention_distance(P, Q, kind="mse").item() == pytest.approx(3 * np.mean([((p - q) ** 2).sum(), ((r - s) ** 2).sum()]))
    assert attention_distance(P, P).item() == 0.0
    assert attention_distance(P, Q).item() == pytest.approx(attention_distance(Q, P).item())  # JS is symmetric
    assert attention_distance(P, Q).item() <= math.log(2)


def test_attention_distance_respects_valid_and_heads():
    p, q = np.array([0.5, 0.5, 0.0]), np.array([0.1, 0.9, 0.0])
    P, Q = dist(p), dist(q)
    P[..., 2], Q[..., 2] = 0.7, 0.1  # garbage outside the valid region
    valid = torch.tensor([[True, True, False]])
    assert attention_distance(P, Q, valid).item() == pytest.approx(jensenshannon(p[:2], q[:2]) ** 2, abs=1e-7)
    assert attention_distance(P, Q, valid, kind="mse").item() == pytest.approx(2 * ((p - q) ** 2).sum())
    # per-head [B, heads, Q, h, w]: the mean over heads and queries
    A = torch.softmax(torch.randn(2, 3, 4, 5, 6), dim=-1)
    A = A / A.sum((-2, -1), keepdim=True)
    B = torch.softmax(torch.randn(2, 3, 4, 5, 6), dim=-1)
    B = B / B.sum((-2, -1), keepdim=True)
    per_row = [attention_distance(A[:, h], B[:, h]) for h in range(3)]
    assert attention_distance(A, B).item() == pytest.approx(torch.stack(per_row).mean().item(), rel=1e-5)


def test_attention_distances_eps_safe():
    P = dist([1.0, 0.0, 0.0]).float().requires_grad_()
    Q = dist([0.0, 0.0, 1.0]).float().requires_grad_()
    for kind in ("js", "kl", "mse"):
        d = attention_distance(P, Q, kind=kind)
        assert torch.isfinite(d)
        gp, gq = torch.autograd.grad(d, (P, Q))
        assert torch.isfinite(gp).all() and torch.isfinite(gq).all()
    assert attention_distance(P, Q).item() == pytest.approx(math.log(2), rel=1e-5)  # disjoint supports


def test_aligned_attention_rows_sum_to_one_and_identical_rows_score_zero():
    torch.manual_seed(0)
    a = torch.softmax(torch.randn(2, 5, 8 * 8), dim=-1)
    a2 = torch.softmax(torch.randn(2, 5, 8 * 8), dim=-1)
    p1, p2, valid = align_attention(a, a2, (8, 8), 30, (64, 64), 8, margin=1)
    sums = (p1 * valid).sum((-2, -1)), (p2 * valid).sum((-2, -1))
    assert torch.allclose(sums[0], torch.ones(2, 5), atol=1e-5) and torch.allclose(sums[1], torch.ones(2, 5), atol=1e-5)
    assert attention_distance(p1, p1, valid).item() == 0.0
    assert attention_distance(p1, p2, valid).item() > 0.0


# ---------------------------------------------------------------------------------------------
# rotation-equivariant vs non-equivariant toy networks


def smooth_images(B=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    out = torch.zeros(B, 1, size, size)
    for b in range(B):
        for _ in range(5):
            cy, cx = (torch.rand(2, generator=g) * size).tolist()
            amp = torch.randn(1, generator=g).item()
            out[b, 0] += amp * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 8) ** 2))
    return out


class Pointwise(nn.Module):
    "1x1 convs + ReLU, then 2x2 average pooling: commutes with rotations."
    def __init__(self, ramp=False):
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b = nn.Conv2d(1, 8, 1), nn.Conv2d(8, 8, 1)
        self.ramp = ramp

    def forward(self, x):
        f = self.b(torch.relu(self.a(x)))
        if self.ramp:  # a fixed positional signal that does not rotate with the content
            f = f + torch.linspace(-2, 2, f.shape[-1])[None, None, None, :]
        return F.avg_pool2d(f, 2)


class Asymmetric(Pointwise):
    "A 3x3 first convolution with a Sobel-x part: not rotation equivariant."
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        sob = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(8, 1, 1, 1) * sob)


def aligned_pair(net, x, angle, margin=1):
    with torch.no_grad():
        f1, f2 = net(x), net(rotate(x, angle))
    f2w, valid = warp_back(f2, angle, tuple(x.shape[-2:]), 2, margin)
    return f1, f2w, valid


@pytest.mark.parametrize("angle", [90, 30])
@pytest.mark.parametrize("kind", ["cosine", "mse", "smooth_l1", "infonce", "mars_pooled"])
def test_equivariant_net_scores_near_zero(kind, angle):
    x = smooth_images()
    torch.manual_seed(0)
    pooled = MarsPooled(8)

    def d(f1, f2, valid):
        with torch.no_grad():
            if kind == "mars_pooled":
                return pooled(f1, f2, valid).item()
            if kind == "infonce":  # InfoNCE's floor is the loss of identical views (same sampling)
                return (feature_distance(f1, f2, valid, kind, seed=1) - feature_distance(f1, f1, valid, kind, seed=1)).item()
            return feature_distance(f1, f2, valid, kind).item()

    eq = d(*aligned_pair(Pointwise(), x, angle))
    tol = 1e-5 if angle == 90 else 2e-3
    assert abs(eq) < tol, (kind, angle, eq)
    for bad in (Asymmetric(), Pointwise(ramp=True)):
        ne = d(*aligned_pair(bad, x, angle))
        assert ne > 20 * abs(eq) + 1e-5, (kind, angle, type(bad).__name__, eq, ne)


def test_equivariant_net_through_marsloss():
    x = smooth_images()
    meta = {"strides": {"backbone.res4": 2}}
    loss = MarsLoss({"backbone": {"weight": 1.0, "taps": ["res4"]}}, margin=1)
    for angle in (90, 30):
        res = {}
        for name, net in (("eq", Pointwise()), ("ne", Asymmetric())):
            with torch.no_grad():
                out = net(torch.cat([x, rotate(x, angle)]))
            res[name] = loss({"backbone.res4": out}, angle=angle, image_size=(64, 64), meta=meta)["mars/backbone"].item()
        assert res["eq"] < 2e-3 and res["ne"] > 20 * res["eq"]


# ---------------------------------------------------------------------------------------------
# gradient flow


@pytest.mark.parametrize("stage", ["backbone", "attention"])
def test_gradient_modes(stage):
    def run(mode):
        torch.manual_seed(0)
        if stage == "backbone":
            t1, t2 = torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 4, 8, 8, requires_grad=True)
            name, meta = "backbone.res4", {}
        else:
            t1 = torch.softmax(torch.randn(2, 3, 16), -1).requires_grad_()
            t2 = torch.softmax(torch.randn(2, 3, 16), -1).requires_grad_()
            name, meta = "attention.layer0", {"hw": {"attention.layer0": (4, 4)}}
        loss = MarsLoss({stage: {"taps": "all"}}, gradient=mode)
        out = loss({name: t1}, {name: t2}, angle=30, image_size=(128, 128), meta=meta)
        out["mars/total"].backward()
        nz = lambda t: t.grad is not None and t.grad.abs().sum().item() > 0
        return nz(t1), nz(t2)

    assert run("symmetric") == (True, True)
    assert run("stop_grad") == (False, True)


def test_stop_grad_same_value_as_symmetric():
    torch.manual_seed(0)
    v1, v2 = {"backbone.res5": torch.randn(2, 4, 4, 4)}, {"backbone.res5": torch.randn(2, 4, 4, 4)}
    a = MarsLoss({"backbone": {"taps": "all"}})(v1, v2, angle=90, image_size=(128, 128))["mars/total"]
    b = MarsLoss({"backbone": {"taps": "all"}}, gradient="stop_grad")(v1, v2, angle=90, image_size=(128, 128))["mars/total"]
    assert a.item() == pytest.approx(b.item())


# ---------------------------------------------------------------------------------------------
# the paper's pooled term


def test_mars_pooled_pairs_sample_b_with_sample_b():
    torch.manual_seed(0)
    m = MarsPooled(16)
    f = torch.rand(4, 16, 6, 6) + torch.arange(4.0)[:, None, None, None] * torch.rand(1, 16, 6, 6)
    assert m(f, f).item() == pytest.approx(0.0, abs=1e-6)
    assert m(f, f[[1, 0, 3, 2]]).item() > 1e-3  # shuffling one view's samples breaks the pairs
    valid = torch.ones(6, 6, dtype=torch.bool)
    valid[:, 4:] = False
    g = f.clone()
    g[..., 4:] = 5.0  # differences only outside the valid region do not count
    assert m(f, g, valid).item() == pytest.approx(0.0, abs=1e-6)
    assert m(f, g).item() > 1e-3


def test_mars_pooled_reference_and_gradients():
    torch.manual_seed(0)
    m = MarsPooled(8, reduction=2, learn_p=False)
    f1, f2 = torch.rand(2, 8, 5, 4), torch.rand(2, 8, 5, 4)
    # a second implementation with plain loops
    def pooled(f):
        x = m.reduce(f).clamp_min(1e-6) ** 3
        return x.mean((2, 3)) ** (1 / 3), (x.mean(3) ** (1 / 3)).flatten(1), (x.mean(2) ** (1 / 3)).flatten(1)
    ref = sum((1 - F.cosine_similarity(u, v, dim=1)).mean() for u, v in zip(pooled(f1), pooled(f2))) / 3
    out = m(f1, f2)
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)
    out.backward()
    assert m.reduce.weight.grad.abs().sum() > 0


def test_block_rows():
    rows = block_rows(4, 3)
    assert rows[2, 1].item() == 2 * 3 + 1 and rows.flatten().tolist() == list(range(12))


def test_marsloss_creates_pooled_parameters_at_construction():
    loss = MarsLoss.from_config("paper", channels={f"backbone.res{i}": 8 * i for i in range(2, 6)})
    names = [n for n, _ in loss.named_parameters()]
    assert len(names) == 4 * 3 and all(n.startswith("pooled.") for n in names)
    with pytest.raises(ValueError, match="channel"):
        MarsLoss.from_config("paper")


# ---------------------------------------------------------------------------------------------
# matching


def test_hungarian_matching_recovers_shuffled_queries():
    torch.manual_seed(0)
    a = torch.softmax(3 * torch.randn(2, 6, 16), -1)
    perm = torch.tensor([3, 1, 5, 0, 2, 4])
    v1, v2 = {"attention.layer0": a}, {"attention.layer0": a[:, perm]}
    meta = {"hw": {"attention.layer0": (4, 4)}}
    kw = dict(angle=0, image_size=(128, 128), meta=meta)
    assert MarsLoss({"attention": {}})(v1, v2, **kw)["mars/attention"].item() > 0.05
    assert MarsLoss({"attention": {}}, matching="hungarian")(v1, v2, **kw)["mars/attention"].item() < 1e-6
    masks = torch.randn(2, 6, 32, 32)
    kw["meta"] = {**meta, "mask_logits": torch.cat([masks, masks[:, perm]])}  # the two-view batch's logits
    assert MarsLoss({"attention": {}}, matching="hungarian")(v1, v2, **kw)["mars/attention"].item() < 1e-6
    # per-head maps are reordered along their query axis
    ah = torch.softmax(3 * torch.randn(2, 2, 6, 16), -1)
    out = MarsLoss({"attention": {}}, matching="hungarian", per_head=True)(
        {"attention.layer0": ah}, {"attention.layer0": ah[:, :, perm]}, angle=0, image_size=(128, 128), meta=meta)
    assert out["mars/attention"].item() < 1e-6


# ---------------------------------------------------------------------------------------------
# MarsLoss: totals, configs, presets


def test_total_is_weighted_sum_of_stage_means():
    torch.manual_seed(0)
    v1 = {"backbone.res4": torch.randn(2, 4, 8, 8), "backbone.res5": torch.randn(2, 4, 4, 4),
          "attention.layer0": torch.softmax(torch.randn(2, 3, 16), -1),
          "attention.layer1": torch.softmax(torch.randn(2, 3, 64), -1)}
    v2 = {k: v + 0.1 * torch.randn_like(v) if k.startswith("backbone") else torch.softmax(torch.randn_like(v), -1)
          for k, v in v1.items()}
    meta = {"hw": {"attention.layer0": (4, 4), "attention.layer1": (8, 8)}}
    loss = MarsLoss({"backbone": {"weight": 0.3, "taps": "all"}, "attention": {"weight": 0.7}})
    out = loss(v1, v2, angle=90, image_size=(128, 128), meta=meta, per_tap=True)
    # 90 degrees on a square image: aligning view 2 is an exact quarter turn back
    bb = np.mean([feature_distance(v1[k], torch.rot90(v2[k], -1, (-2, -1))).item() for k in ("backbone.res4", "backbone.res5")])
    at = []
    for k, hw in meta["hw"].items():
        p1, p2, valid = align_attention(v1[k], v2[k], hw, 90, (128, 128), 32 if k.endswith("0") else 16)
        at.append(attention_distance(p1, p2, valid).item())
    assert out["mars/backbone"].item() == pytest.approx(bb, rel=1e-5)
    assert out["mars/attention"].item() == pytest.approx(np.mean(at), rel=1e-5)
    assert out["mars/total"].item() == pytest.approx(0.3 * bb + 0.7 * np.mean(at), rel=1e-5)
    assert set(out) == {"mars/backbone", "mars/attention", "mars/total", "mars/backbone.res4", "mars/backbone.res5",
                        "mars/attention.layer0", "mars/attention.layer1"}


def test_zero_weight_stage_is_logged_without_gradient():
    f1 = torch.randn(1, 4, 4, 4, requires_grad=True)
    out = MarsLoss({"backbone": {"weight": 0.0, "taps": ["res5"]}})(
        {"backbone.res5": f1}, {"backbone.res5": torch.randn(1, 4, 4, 4)}, angle=90, image_size=(128, 128))
    assert out["mars/backbone"].item() > 0 and not out["mars/backbone"].requires_grad
    assert out["mars/total"].item() == 0.0


def test_presets():
    assert set(PRESET_NAMES) == {"backbone", "pixel", "attention", "hybrid", "paper"}
    h = mars_preset("hybrid")["stages"]
    assert {s: v["weight"] for s, v in h.items()} == {"backbone": 0.05, "pixel_decoder": 0.10, "attention": 0.15}
    assert h["backbone"]["taps"] == ["res4", "res5"] and h["attention"]["taps"] == "all"
    assert h["pixel_decoder"]["taps"] == ["mask_features", "ms0", "ms1", "ms2"]
    assert {s: v["distance"] for s, v in h.items()} == {"backbone": "cosine", "pixel_decoder": "cosine", "attention": "js"}
    assert list(mars_preset("backbone")["stages"]) == ["backbone"]
    assert list(mars_preset("pixel")["stages"]) == ["pixel_decoder"]
    assert list(mars_preset("attention")["stages"]) == ["attention"]
    p = mars_preset("paper")["stages"]
    assert p == {"backbone": {"weight": 0.15, "distance": "mars_pooled", "taps": ["res2", "res3", "res4", "res5"]}}
    assert MarsLoss().config() == resolve_config("hybrid") == resolve_config({}) == resolve_config(None)


def test_config_round_trip_and_overrides():
    cfg = {"preset": "hybrid", "gradient": "stop_grad", "margin": 2,
           "stages": {"backbone": None, "attention": {"distance": "kl", "taps": [0, "layer2"]},
                      "pixel_decoder": {"distance": "infonce", "options": {"tau": 0.2}}}}
    loss = MarsLoss.from_config(cfg)
    c = loss.config()
    assert list(c["stages"]) == ["pixel_decoder", "attention"] and c["gradient"] == "stop_grad" and c["margin"] == 2
    assert c["stages"]["attention"] == {"weight": 0.15, "distance": "kl", "taps": ["layer0", "layer2"]}
    assert c["stages"]["pixel_decoder"]["options"] == {"tau": 0.2}
    assert MarsLoss.from_config(c).config() == c
    import yaml
    assert MarsLoss.from_config(yaml.safe_load(yaml.safe_dump(c))).config() == c
    # a bare stage mapping works as well
    assert MarsLoss({"attention": {"weight": 0.5}}).config()["stages"] == {"attention": {"weight": 0.5, "distance": "js", "taps": "all"}}
    assert DEFAULT_STAGES["backbone"]["weight"] == 0.05  # presets did not mutate the defaults


# ---------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("cfg, words", [
    ({"stages": {"decoder": {}}}, ["decoder", "backbone, pixel_decoder, attention"]),
    ({"stages": {"backbone": {"taps": ["res9"]}}}, ["res9", "res2, res3, res4, res5"]),
    ({"stages": {"pixel_decoder": {"taps": ["layer1"]}}}, ["layer1", "mask_features"]),
    ({"stages": {"attention": {"taps": ["res4"]}}}, ["res4", "layer0"]),
    ({"stages": {"backbone": {"weight": -1}}}, ["-1", ">= 0"]),
    ({"stages": {"backbone": {"weight": "0.1"}}}, ["'0.1'", "number"]),
    ({"stages": {"backbone": {"weight": float("nan")}}}, ["nan"]),
    ({"stages": {"backbone": {"distance": "js"}}}, ["'js'", "backbone", "cosine, mse, smooth_l1, infonce, mars_pooled"]),
    ({"stages": {"attention": {"distance": "cosine"}}}, ["'cosine'", "attention", "js, kl, mse"]),
    ({"stages": {"attention": {"distance": "mars_pooled"}}}, ["mars_pooled", "js, kl, mse"]),
    ({"stages": {"backbone": {"options": {"tau": 1}}}}, ["tau", "cosine"]),
    ({"stages": {"backbone": {"wieght": 1}}}, ["wieght", "weight, distance, taps, options"]),
    ({"preset": "hybrid", "gradient": "detach"}, ["detach", "symmetric, stop_grad"]),
    ({"preset": "hybrid", "matching": "greedy"}, ["greedy", "index, hungarian"]),
    ({"preset": "hybrid", "margin": -1}, ["margin"]),
    ({"preset": "hybrid", "lambda": 1}, ["lambda"]),
    ("mixed", ["mixed", "backbone, pixel, attention, hybrid, paper"]),
])
def test_bad_configs_are_clear_errors(cfg, words):
    with pytest.raises(ValueError) as e:
        MarsLoss.from_config(cfg)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="symmetric, stop_grad"):
        MarsLoss(gradient="both")
    with pytest.raises(ValueError, match="index, hungarian"):
        MarsLoss(matching="soft")
    with pytest.raises(ValueError, match="cosine, mse, smooth_l1, infonce"):
        feature_distance(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), kind="l1")
    with pytest.raises(ValueError, match="js, kl, mse"):
        attention_distance(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), kind="cosine")
    with pytest.raises(ValueError, match="different shapes"):
        feature_distance(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="valid mask"):
        feature_distance(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), torch.ones(4, 4, dtype=torch.bool))
    loss = MarsLoss({"backbone": {"taps": ["res4", "res5"]}})
    f = {"backbone.res4": torch.zeros(1, 2, 8, 8)}
    with pytest.raises(ValueError, match="res5"):  # a selected tap that was not captured
        loss(f, f, angle=0, image_size=(128, 128))
    with pytest.raises(ValueError, match="odd batch"):
        loss({"backbone.res4": torch.zeros(3, 2, 8, 8)}, angle=0, image_size=(128, 128))


def test_tap_channels():
    cap = {"backbone.res4": torch.zeros(2, 7, 4, 4), "attention.layer0": torch.zeros(2, 3, 16)}
    assert tap_channels(cap) == {"backbone.res4": 7}


# ---------------------------------------------------------------------------------------------
# on the tiny Hugging Face Mask2Former


@pytest.fixture(scope="module")
def tiny():
    from mars_nb.model import build_model
    torch.manual_seed(0)
    return build_model("tiny")


def test_unknown_layer_for_the_model(tiny):
    with pytest.raises(ValueError, match="layer7"):
        MarsLoss.from_config({"stages": {"attention": {"taps": [7]}}}, model=tiny)
    paper = MarsLoss.from_config("paper", model=tiny)  # channel counts read from the model
    assert {k: m.channels for k, m in paper.pooled.items()} == {
        f"backbone__res{i + 2}": c for i, c in enumerate(tiny.config.backbone_config.hidden_sizes)}


@pytest.mark.parametrize("stage, reached, untouched", [
    ("backbone", ["model.pixel_level_module.encoder"], ["model.pixel_level_module.decoder", "model.transformer_module"]),
    ("pixel_decoder", ["model.pixel_level_module.encoder", "model.pixel_level_module.decoder"], ["model.transformer_module"]),
    ("attention", ["model.pixel_level_module.encoder", "model.pixel_level_module.decoder", "model.transformer_module"], []),
])
def test_each_stage_trains_the_part_it_taps(tiny, stage, reached, untouched):
    tiny.zero_grad(set_to_none=True)
    loss = MarsLoss.from_config({"stages": {stage: {"weight": 1.0, "taps": "all"}}}, model=tiny)
    x = smooth_images(B=1, size=128)  # stride 32 gives a 4x4 grid: part of it stays valid at 30 degrees
    with loss.taps(tiny) as taps:
        tiny(pixel_values=torch.cat([x, rotate(x, 30)]))
    out = loss(taps, angle=30, image_size=(128, 128))
    assert out[f"mars/{stage}"].item() > 0
    # the tapped tensors themselves receive gradient
    names = list(taps.captured)
    grads = torch.autograd.grad(out["mars/total"], [taps.captured[n] for n in names], retain_graph=True)
    for n, g in zip(names, grads):
        assert g.abs().sum() > 0, n
    out["mars/total"].backward()
    gnorm = lambda part: sum(p.grad.abs().sum().item() for n, p in tiny.named_parameters()
                             if n.startswith(part) and p.grad is not None)
    for part in reached:
        assert gnorm(part) > 0, part
    for part in untouched:
        assert gnorm(part) == 0, part


def test_taps_without_valid_pixels_are_left_out_of_the_stage_mean():
    torch.manual_seed(0)
    v1 = {"backbone.res4": torch.randn(1, 4, 4, 4), "backbone.res5": torch.randn(1, 4, 2, 2)}
    v2 = {k: torch.randn_like(v) for k, v in v1.items()}
    loss = MarsLoss({"backbone": {"taps": "all"}}, margin=1)
    out = loss(v1, v2, angle=30, image_size=(64, 64), per_tap=True)  # res5: 2x2 grid, eroded to nothing
    assert out["mars/backbone.res5"].item() == 0.0 and out["mars/backbone.res4"].item() > 0
    assert out["mars/backbone"].item() == pytest.approx(out["mars/backbone.res4"].item())


def test_half_precision_inputs_and_autocast():
    torch.manual_seed(0)
    v1 = {"backbone.res5": torch.randn(2, 4, 4, 4), "attention.layer0": torch.softmax(torch.randn(2, 3, 16), -1)}
    v2 = {k: v.flip(-1) for k, v in v1.items()}
    loss = MarsLoss({"backbone": {"taps": "all"}, "attention": {}})
    ref = loss(v1, v2, angle=30, image_size=(128, 128))
    half = loss({k: v.bfloat16() for k, v in v1.items()}, {k: v.bfloat16() for k, v in v2.items()},
                angle=30, image_size=(128, 128))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = loss(v1, v2, angle=30, image_size=(128, 128))
    for k in ref:
        assert half[k].dtype == torch.float32 and auto[k].dtype == torch.float32
        assert auto[k].item() == pytest.approx(ref[k].item(), rel=1e-6)
        assert half[k].item() == pytest.approx(ref[k].item(), rel=5e-2, abs=1e-3)

"""MARS losses: distances against hand-computed / scipy references, the equivariance check on toy
networks, gradient flow, the pooled paper term, configuration and validation."""
import copy
import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy
from torch import nn

from mars_nb.losses import (
    DEFAULT_STAGES, DISTANCES, PRESET_NAMES, STAGE_KINDS, TOP_DEFAULTS, Distance, MarsLoss, MarsPooled, StageSpec,
    attention_distance, block_rows, distance, feature_distance, get_distance, gradient_shares, infonce_distance,
    mars_preset, output_js, output_kl, resolve_config, stage_distances,
)
from mars_nb.taps import STAGES, TapMeta
from mars_nb.views import Lattice, align_attention, rotate, warp_back


def geo(stride, hw=None):
    "The TapMeta of a synthetic map: cells centred in their stride x stride blocks (pooling, or made by hand)."
    return TapMeta(Lattice.centred(stride), hw=hw)


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
# the distance registry


def test_registry_contents_and_stage_kinds():
    assert STAGE_KINDS == {"backbone": "feature", "pixel_decoder": "feature", "attention": "attention", "output": "output"}
    assert set(STAGE_KINDS) == set(STAGES)
    assert {s: stage_distances(s) for s in STAGES} == {
        "backbone": ("cosine", "mse", "smooth_l1", "cosine_centred", "infonce", "mars_pooled"),
        "pixel_decoder": ("cosine", "mse", "smooth_l1", "cosine_centred", "infonce", "mars_pooled"),
        "attention": ("js", "kl", "mse"), "output": ("js", "kl", "pseudo_label")}
    for kind, table in DISTANCES.items():
        for name, d in table.items():
            assert isinstance(d, Distance) and d.name == name and d.kind == kind
            assert (d.fn is None) != (d.module is None), name  # a function or a learned module, not both
            assert get_distance(name, kind) is d
    assert get_distance("js", "output").fn is output_js and get_distance("kl", "output").fn is output_kl
    assert get_distance("mars_pooled", "feature").module is MarsPooled
    # the thin dispatchers go through the registry
    f1, f2 = torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2)
    assert feature_distance(f1, f2, kind="mse") == get_distance("mse", "feature").fn(f1, f2)


def test_every_distance_options_are_its_keyword_parameters():
    for kind, table in DISTANCES.items():
        for name, d in table.items():
            sig = inspect.signature(d.module if d.module is not None else d.fn)
            kw = [p.name for p in sig.parameters.values()
                  if p.default is not inspect.Parameter.empty and p.name not in ("valid", "generator")]
            assert list(d.options) == kw, (kind, name, d.options, kw)
            assert "generator" not in d.options
    assert get_distance("infonce", "feature").options == ("tau", "num_negatives", "max_anchors", "symmetric", "seed")
    assert get_distance("cosine", "feature").options == ("eps",)
    assert get_distance("mse", "feature").options == ()


@pytest.mark.parametrize("stage, name, other", [
    ("backbone", "js", "attention and output"),
    ("pixel_decoder", "kl", "attention and output"),
    ("attention", "cosine", "feature"),
    ("output", "mse", "feature and attention"),
    ("attention", "mars_pooled", "feature"),
    ("output", "l2", None),
])
def test_unknown_distance_for_a_stage(stage, name, other):
    with pytest.raises(ValueError) as e:
        StageSpec.make(stage, {"distance": name})
    msg = str(e.value)
    assert repr(stage) in msg and repr(name) in msg
    assert f"unknown {STAGE_KINDS[stage]} distance" in msg
    assert msg.split("valid: ")[1].split(", ") == list(stage_distances(stage))  # this stage's kind, no other
    if other is None:
        assert " is a " not in msg
    else:
        assert f"({name!r} is a {other} distance)" in msg
    with pytest.raises(ValueError, match="unknown kind"):
        get_distance("js", "pixels")


def test_registering_twice_asserts(monkeypatch):
    monkeypatch.setitem(DISTANCES, "feature", dict(DISTANCES["feature"]))  # undone after the test

    with pytest.raises(AssertionError, match="twice"):
        @distance("feature")
        def cosine_distance(f1, f2, valid=None):
            return f1.sum() * 0

    @distance("feature")
    def l1_distance(f1, f2, valid=None, scale: float = 1.0, generator=None):
        return scale * (f1 - f2).abs().mean()

    d = DISTANCES["feature"]["l1"]
    assert d.options == ("scale",) and d.fn is l1_distance  # 'generator' is supplied at run time, not an option
    with pytest.raises(AssertionError, match="twice"):
        distance("feature", "l1")(l1_distance)
    assert DISTANCES["feature"]["l1"] is d
    # a newly registered distance is a valid choice for every feature stage, options checked against it
    loss = MarsLoss({"backbone": {"distance": "l1", "taps": ["res5"], "options": {"scale": 2.0}}}, margin=0)
    f1, f2 = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    out = loss({"backbone.res5": f1}, {"backbone.res5": f2}, angle=90, image_size=(128, 128), meta={"backbone.res5": geo(32)})
    assert out["mars/backbone"].item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="scale"):
        StageSpec.make("backbone", {"distance": "l1", "options": {"beta": 1.0}})


@pytest.mark.parametrize("kind, name, stage", [("feature", "mse", "pixel_decoder"), ("feature", "cosine", "backbone"),
                                               ("attention", "js", "attention"), ("output", "kl", "output")])
def test_no_catch_all_distance(monkeypatch, kind, name, stage):
    "A name that leaves the registry is an error everywhere, not silently some other distance."
    spec = StageSpec.make(stage, {"distance": name, "taps": "all"})
    loss = MarsLoss({stage: {"distance": name, "taps": "all"}})
    # a copy without it (restored afterwards as it was, order included: error messages list the names in order)
    monkeypatch.setitem(DISTANCES, kind, {n: d for n, d in DISTANCES[kind].items() if n != name})
    with pytest.raises(ValueError, match=f"unknown {kind} distance {name!r}"):
        StageSpec.make(stage, {"distance": name})
    with pytest.raises(ValueError, match=repr(name)):
        MarsLoss({stage: {"distance": name}})
    with pytest.raises(ValueError, match=repr(name)):
        resolve_config({"stages": {stage: spec.to_dict(stage)}})
    # a loss built before: its next forward fails too
    x = torch.softmax(torch.randn(2, 3, 4, 4), 1)
    tap = {"backbone": "backbone.res5", "pixel_decoder": "pixel_decoder.ms0", "attention": "attention.layer0",
           "output": "output.classes"}[stage]
    v = {tap: x.flatten(2) if stage == "attention" else x}
    with pytest.raises(ValueError, match=repr(name)):
        loss(v, v, angle=0, image_size=(128, 128), meta={tap: geo(32, (4, 4) if stage == "attention" else None)})


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
    p1, p2, valid = align_attention(a, a2, (8, 8), 30, (64, 64), Lattice.centred(8), margin=1)
    sums = (p1 * valid).sum((-2, -1)), (p2 * valid).sum((-2, -1))
    assert torch.allclose(sums[0], torch.ones(2, 5), atol=1e-5) and torch.allclose(sums[1], torch.ones(2, 5), atol=1e-5)
    assert attention_distance(p1, p1, valid).item() == 0.0
    assert attention_distance(p1, p2, valid).item() > 0.0


# ---------------------------------------------------------------------------------------------
# output distances: per-pixel class distributions [B, K, h, w]


def test_output_js_kl_against_scipy():
    g = np.random.default_rng(0)
    P = g.dirichlet(np.ones(4), size=(2, 3, 5))  # [B, h, w, K]
    Q = g.dirichlet(np.ones(4), size=(2, 3, 5))
    P[0, 1, 2] = [1.0, 0.0, 0.0, 0.0]  # a one-hot pixel (0 log 0 = 0)
    valid = g.random((2, 3, 5)) > 0.4
    valid[1, 0, 0] = True
    t = lambda a: torch.tensor(a, dtype=torch.float64).permute(0, 3, 1, 2)  # [B, K, h, w]
    p1, p2 = t(P), t(Q)
    js = np.array([[[jensenshannon(P[b, i, j], Q[b, i, j]) ** 2 for j in range(5)] for i in range(3)] for b in range(2)])
    kl = np.array([[[entropy(P[b, i, j], Q[b, i, j]) for j in range(5)] for i in range(3)] for b in range(2)])
    assert output_js(p1, p2).item() == pytest.approx(js.mean(), rel=1e-6)
    assert output_kl(p1, p2).item() == pytest.approx(kl.mean(), rel=1e-6)
    # masked pixels do not count, whatever non-negative values they hold (here not even distributions)
    m = torch.tensor(valid)
    g1, g2 = p1.clone(), p2.clone()
    g1[~m.unsqueeze(1).expand_as(g1)] = 3.0
    g2[~m.unsqueeze(1).expand_as(g2)] = 0.0  # (warp_back leaves zeros outside the valid region)
    assert output_js(g1, g2, m).item() == pytest.approx(js[valid].mean(), rel=1e-6)
    assert output_kl(g1, g2, m).item() == pytest.approx(kl[valid].mean(), rel=1e-6)
    # one [h, w] mask for every sample
    assert output_js(p1, p2, m[0]).item() == pytest.approx(js[:, valid[0]].mean(), rel=1e-6)
    assert output_js(p1, p1).item() == 0.0 and output_kl(p1, p1).item() == pytest.approx(0.0, abs=1e-12)
    assert output_js(p1, p2).item() == pytest.approx(output_js(p2, p1).item())
    assert output_kl(p1, p2).item() != pytest.approx(output_kl(p2, p1).item())  # KL is not symmetric
    with pytest.raises(ValueError, match="different shapes"):
        output_js(p1, p2[..., :4])


def test_output_distances_eps_safe():
    p = torch.zeros(1, 3, 1, 2, dtype=torch.float32)
    q = torch.zeros(1, 3, 1, 2, dtype=torch.float32)
    p[0, 0], q[0, 2] = 1.0, 1.0  # disjoint one-hot pixels
    p.requires_grad_(), q.requires_grad_()
    for fn in (output_js, output_kl):
        d = fn(p, q)
        gp, gq = torch.autograd.grad(d, (p, q))
        assert torch.isfinite(d) and torch.isfinite(gp).all() and torch.isfinite(gq).all()
    assert output_js(p, q).item() == pytest.approx(math.log(2), rel=1e-5)


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
    f2w, valid = warp_back(f2, angle, tuple(x.shape[-2:]), Lattice.centred(2), margin)  # 2x2 average pooling
    return f1, f2w, valid


@pytest.mark.parametrize("angle", [90, 30])
@pytest.mark.parametrize("kind", ["cosine", "mse", "smooth_l1", "cosine_centred", "infonce", "mars_pooled"])
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
    meta = {"backbone.res4": geo(2)}  # 2x2 average pooling: centred cells
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
            name, meta = "backbone.res4", {"backbone.res4": geo(16)}
        else:
            t1 = torch.softmax(torch.randn(2, 3, 16), -1).requires_grad_()
            t2 = torch.softmax(torch.randn(2, 3, 16), -1).requires_grad_()
            name, meta = "attention.layer0", {"attention.layer0": geo(32, (4, 4))}
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
    kw = dict(angle=90, image_size=(128, 128), meta={"backbone.res5": geo(32)})
    a = MarsLoss({"backbone": {"taps": "all"}})(v1, v2, **kw)["mars/total"]
    b = MarsLoss({"backbone": {"taps": "all"}}, gradient="stop_grad")(v1, v2, **kw)["mars/total"]
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
    m = MarsPooled(8, reduction=2, learn_p=False).double()
    assert m.reduce.bias is None  # a bias would let a shrinking reduction make every view look alike
    f1, f2 = torch.rand(3, 8, 5, 4, dtype=torch.float64), torch.rand(3, 8, 5, 4, dtype=torch.float64)
    # a second implementation: GeM (p = 3) channel / height / width vectors, each component standardized over
    # the 6 samples of both views (and the vector's spatial axis), a component that does not vary (a reduced
    # channel clamped to eps everywhere) set to 0, PReLU (slope 0.25 at init), 1 - cosine
    def pooled(f):
        x = m.reduce(f).clamp_min(1e-6) ** 3
        return x.mean((2, 3)) ** (1 / 3), x.mean(3) ** (1 / 3), x.mean(2) ** (1 / 3)
    ref = 0.0
    for u, v in zip(pooled(f1), pooled(f2)):
        both = torch.cat([u, v]).detach().numpy()
        axes = (0,) if both.ndim == 2 else (0, 2)
        sd = both.std(axes, keepdims=True)
        live = sd ** 2 > 1e-6 * (both ** 2).mean()
        z = np.where(live, (both - both.mean(axes, keepdims=True)) / np.where(live, sd, 1.0), 0.0)
        z = np.where(z > 0, z, 0.25 * z).reshape(len(z), -1)
        a, b = z[:3], z[3:]
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        ref += (1 - cos).mean() / 3
    out = m(f1, f2)
    assert out.item() == pytest.approx(ref, rel=1e-6)
    out.backward()
    assert m.reduce.weight.grad.abs().sum() > 0
    assert all(a.weight.grad is not None and a.weight.grad.abs() > 0 for a in m.act.values())


def test_mars_pooled_weights():
    torch.manual_seed(0)
    f1, f2 = torch.rand(4, 8, 5, 5), torch.rand(4, 8, 5, 5)
    d = {}
    for cw, sw in ((1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (2.0, 1.0)):
        torch.manual_seed(1)  # the same reduction for every weighting
        d[cw, sw] = MarsPooled(8, channel_weight=cw, spatial_weight=sw)(f1, f2).item()
    c, hw = d[1.0, 0.0], d[0.0, 1.0]  # channel term; mean of the height and width terms
    assert d[1.0, 1.0] == pytest.approx((c + 2 * hw) / 3, rel=1e-5)
    assert d[2.0, 1.0] == pytest.approx((2 * c + 2 * hw) / 4, rel=1e-5)
    with pytest.raises(ValueError, match="not both 0"):
        MarsPooled(8, channel_weight=0.0, spatial_weight=0.0)


# ---- it cannot cheat: scaling the reduction's weights down does not reduce the loss


def _scaled(m: MarsPooled, weight: torch.Tensor) -> MarsPooled:
    m = copy.deepcopy(m)
    with torch.no_grad():
        m.reduce.weight.copy_(weight)
    return m


def _maps(kind: str, seed: int = 0, noise: float = 0.5):
    "Two views of random maps [4, 16, 6, 6]: signed, or non-negative like a ResNet's post-ReLU features."
    g = torch.Generator().manual_seed(seed)
    f1 = torch.randn(4, 16, 6, 6, generator=g, dtype=torch.float64)
    f2 = f1 + noise * torch.randn(f1.shape, generator=g, dtype=torch.float64)
    return (f1, f2) if kind == "signed" else (f1.relu(), f2.relu())


@pytest.mark.parametrize("kind", ["signed", "non_negative"])
@pytest.mark.parametrize("eps", [1e-6, 1e-12])   # 1e-6: MarsPooled's default GeM clamp
def test_mars_pooled_is_blind_to_the_scale_of_its_reduction(kind, eps):
    torch.manual_seed(0)
    m = MarsPooled(16, eps=eps).double()  # float64: what is left is the loss, not rounding
    f1, f2 = _maps(kind)
    base = m(f1, f2).item()
    assert base > 1e-2  # far from the floor: there is something to cheat on
    diffs = {s: _scaled(m, s * m.reduce.weight)(f1, f2).item() - base for s in (1e-3, 1e-2, 0.1, 0.5, 2.0, 10.0)}
    bad = {s: f"{d:+.2e}" for s, d in diffs.items() if abs(d) > 1e-5}
    assert not bad, f"loss {base:.6f} changes when the reduction is scaled (scale: change): {bad}"


def test_mars_pooled_shrinking_the_reduction_never_lowers_the_loss():
    "The issue itself, on positive maps (post-ReLU-like, uniform) over a few seeds: no shrink factor is a shortcut."
    found = {}
    for seed in range(6):
        torch.manual_seed(seed)
        m = MarsPooled(16)
        f1 = torch.rand(4, 16, 6, 6)
        f2 = f1 + 0.1 * torch.randn_like(f1)
        base = m(f1, f2).item()
        for s in (1e-3, 1e-2, 0.1, 0.5):
            d = _scaled(m, s * m.reduce.weight)(f1, f2).item() - base
            if d < -1e-5:
                found[seed, s] = f"{base:.4f} -> {base + d:.4f}"
    assert not found, f"shrinking the reduction lowers the loss (seed, scale): {found}"


def test_mars_pooled_degenerate_reductions_score_one():
    torch.manual_seed(0)
    m = MarsPooled(16)
    f1 = torch.rand(4, 16, 6, 6) + 0.1  # positive inputs
    f2 = f1 + 0.05 * torch.rand_like(f1)
    zero = _scaled(m, torch.zeros_like(m.reduce.weight))
    assert zero(f1, f2).item() == 1.0
    assert zero(f1, f1).item() == 1.0  # even for identical views: no information, no reward
    negative = _scaled(m, -m.reduce.weight.abs())  # every reduced value < 0: GeM clamps them all to eps
    assert (negative.reduce(f1) < 0).all()
    assert negative(f1, f2).item() == 1.0
    assert m(f1, f2).item() < 1.0  # a real reduction does better than 1


@pytest.mark.parametrize("kind", ["signed", "non_negative"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mars_pooled_weight_decay_alone_cannot_lower_the_loss(kind, seed):
    torch.manual_seed(seed)
    m = MarsPooled(16)
    f1, f2 = (f.float() for f in _maps(kind, seed, noise=0.1))  # identical views up to noise
    before = m(f1, f2).item()
    w0 = m.reduce.weight.detach().norm().item()
    opt = torch.optim.AdamW([m.reduce.weight], lr=0.1, weight_decay=1.0)  # the reduction alone
    for _ in range(50):  # decay-only steps: the reduction shrinks by (1 - 0.1)^50 ~ 5e-3
        opt.zero_grad()
        m.reduce.weight.grad = torch.zeros_like(m.reduce.weight)
        opt.step()
    assert m.reduce.weight.detach().norm().item() < 0.01 * w0
    after = m(f1, f2).item()
    assert after >= before - 1e-4, (before, after)


def test_mars_pooled_needs_two_samples_per_view():
    m = MarsPooled(8)
    with pytest.raises(ValueError, match="at least 2 samples"):
        m(torch.rand(1, 8, 4, 4), torch.rand(1, 8, 4, 4))
    assert torch.isfinite(m(torch.rand(2, 8, 4, 4), torch.rand(2, 8, 4, 4)))


def test_block_rows():
    rows = block_rows(4, 3)
    assert rows[2, 1].item() == 2 * 3 + 1 and rows.flatten().tolist() == list(range(12))


def test_marsloss_creates_learned_parameters_at_construction():
    loss = MarsLoss.from_config("paper", channels={f"backbone.res{i}": 8 * i for i in range(2, 6)})
    names = [n for n, _ in loss.named_parameters()]
    # per tap: the reduction (no bias), the GeM power and one PReLU slope per pooled vector
    assert len(names) == 4 * 5 and all(n.startswith("learned.") for n in names)
    assert {k: m.channels for k, m in loss.learned.items()} == {f"backbone__res{i}": 8 * i for i in range(2, 6)}
    assert not hasattr(loss, "pooled")
    with pytest.raises(ValueError, match="channel"):
        MarsLoss.from_config("paper")


def test_learned_modules_for_all_taps_of_a_stage_come_from_channels():
    channels = {"backbone.res4": 8, "pixel_decoder.ms0": 16, "pixel_decoder.ms1": 12}
    loss = MarsLoss({"pixel_decoder": {"distance": "mars_pooled", "taps": "all", "options": {"reduction": 2}}},
                    channels=channels)
    assert {k: m.channels for k, m in loss.learned.items()} == {"pixel_decoder__ms0": 16, "pixel_decoder__ms1": 12}
    assert loss.learned["pixel_decoder__ms0"].reduce.out_channels == 8  # the options reach the module
    torch.manual_seed(0)
    v1 = {"pixel_decoder.ms0": torch.rand(2, 16, 4, 4), "pixel_decoder.ms1": torch.rand(2, 12, 8, 8)}
    v2 = {k: v + 0.1 * torch.rand_like(v) for k, v in v1.items()}
    out = loss(v1, v2, angle=90, image_size=(128, 128), meta={"pixel_decoder.ms0": geo(32), "pixel_decoder.ms1": geo(16)})
    assert 0 < out["mars/pixel_decoder"].item() < 1
    out["mars/total"].backward()
    assert all(m.reduce.weight.grad.abs().sum() > 0 for m in loss.learned.values())


# ---------------------------------------------------------------------------------------------
# matching


def test_hungarian_matching_recovers_shuffled_queries():
    torch.manual_seed(0)
    a = torch.softmax(3 * torch.randn(2, 6, 16), -1)
    perm = torch.tensor([3, 1, 5, 0, 2, 4])
    v1, v2 = {"attention.layer0": a}, {"attention.layer0": a[:, perm]}
    meta = {"attention.layer0": geo(32, (4, 4))}
    kw = dict(angle=0, image_size=(128, 128), meta=meta)
    assert MarsLoss({"attention": {}})(v1, v2, **kw)["mars/attention"].item() > 0.05
    assert MarsLoss({"attention": {}}, matching="hungarian")(v1, v2, **kw)["mars/attention"].item() < 1e-6
    masks = torch.randn(2, 6, 32, 32)
    kw["meta"] = {**meta, "mask_logits": torch.cat([masks, masks[:, perm]])}  # the two-view batch's logits
    with pytest.raises(ValueError, match="mask_lattice"):  # mask logits without their lattice
        MarsLoss({"attention": {}}, matching="hungarian")(v1, v2, **kw)
    kw["meta"]["mask_lattice"] = Lattice.centred(4)  # 32x32 logits of a 128x128 image
    assert MarsLoss({"attention": {}}, matching="hungarian")(v1, v2, **kw)["mars/attention"].item() < 1e-6
    # matched from the logits alone: the attention rows' own matching is not what recovered the order
    kw["meta"]["mask_logits"] = torch.cat([masks, masks])
    assert MarsLoss({"attention": {}}, matching="hungarian")(v1, v2, **kw)["mars/attention"].item() > 0.05
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
    hw = {"attention.layer0": (4, 4), "attention.layer1": (8, 8)}
    meta = {"backbone.res4": geo(16), "backbone.res5": geo(32),
            "attention.layer0": geo(32, (4, 4)), "attention.layer1": geo(16, (8, 8))}
    # margin 0: at 90 degrees every cell stays valid and the reference below is a plain quarter turn
    loss = MarsLoss({"backbone": {"weight": 0.3, "taps": "all"}, "attention": {"weight": 0.7}}, margin=0)
    out = loss(v1, v2, angle=90, image_size=(128, 128), meta=meta, per_tap=True)
    # 90 degrees on a square image: aligning view 2 is an exact quarter turn back
    bb = np.mean([feature_distance(v1[k], torch.rot90(v2[k], -1, (-2, -1))).item() for k in ("backbone.res4", "backbone.res5")])
    at = []
    for k, grid in hw.items():
        p1, p2, valid = align_attention(v1[k], v2[k], grid, 90, (128, 128), meta[k].lattice)
        at.append(attention_distance(p1, p2, valid).item())
    assert out["mars/backbone"].item() == pytest.approx(bb, rel=1e-5)
    assert out["mars/attention"].item() == pytest.approx(np.mean(at), rel=1e-5)
    assert out["mars/total"].item() == pytest.approx(0.3 * bb + 0.7 * np.mean(at), rel=1e-5)
    assert set(out) == {"mars/backbone", "mars/attention", "mars/total", "mars/backbone.res4", "mars/backbone.res5",
                        "mars/attention.layer0", "mars/attention.layer1"}


def test_zero_weight_stage_is_logged_without_gradient():
    f1 = torch.randn(1, 4, 4, 4, requires_grad=True)
    out = MarsLoss({"backbone": {"weight": 0.0, "taps": ["res5"]}})(
        {"backbone.res5": f1}, {"backbone.res5": torch.randn(1, 4, 4, 4)}, angle=90, image_size=(128, 128),
        meta={"backbone.res5": geo(32)})
    assert out["mars/backbone"].item() > 0 and not out["mars/backbone"].requires_grad
    assert out["mars/total"].item() == 0.0


def test_presets():
    assert set(PRESET_NAMES) == {"backbone", "pixel", "attention", "hybrid", "paper", "output", "pseudo"}
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
    assert mars_preset("output")["stages"] == {"output": {"weight": 0.10, "distance": "js", "taps": "all"}}
    assert mars_preset("pseudo")["stages"] == {"output": {"weight": 1.0, "distance": "pseudo_label", "taps": "all"}}
    assert MarsLoss().config() == resolve_config("hybrid") == resolve_config({}) == resolve_config(None)
    # one cell of margin by default, in every preset and in a bare stage mapping
    assert TOP_DEFAULTS["margin"] == 1.0 and MarsLoss().margin == 1.0
    assert all(mars_preset(n)["margin"] == 1.0 for n in PRESET_NAMES)
    assert MarsLoss({"backbone": {}}).margin == 1.0 and MarsLoss({"backbone": {}}, margin=0).margin == 0.0


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
    ({"stages": {"decoder": {}}}, ["decoder", "backbone, pixel_decoder, attention, output"]),
    ({"stages": {"backbone": {"taps": ["res9"]}}}, ["res9", "res2, res3, res4, res5"]),
    ({"stages": {"pixel_decoder": {"taps": ["layer1"]}}}, ["layer1", "mask_features"]),
    ({"stages": {"attention": {"taps": ["res4"]}}}, ["res4", "layer0"]),
    ({"stages": {"backbone": {"weight": -1}}}, ["-1", ">= 0"]),
    ({"stages": {"backbone": {"weight": "0.1"}}}, ["'0.1'", "number"]),
    ({"stages": {"backbone": {"weight": float("nan")}}}, ["nan"]),
    ({"stages": {"backbone": {"distance": "js"}}}, ["'js'", "backbone", "cosine, mse, smooth_l1, cosine_centred, infonce, mars_pooled"]),
    ({"stages": {"attention": {"distance": "cosine"}}}, ["'cosine'", "attention", "js, kl, mse"]),
    ({"stages": {"attention": {"distance": "mars_pooled"}}}, ["mars_pooled", "js, kl, mse"]),
    ({"stages": {"output": {"distance": "mse"}}}, ["'mse'", "output", "valid: js, kl"]),
    ({"stages": {"output": {"taps": ["logits"]}}}, ["logits", "classes"]),
    ({"stages": {"backbone": {"options": {"tau": 1}}}}, ["tau", "cosine"]),
    ({"stages": {"backbone": {"wieght": 1}}}, ["wieght", "weight, distance, taps, options"]),
    ({"preset": "hybrid", "gradient": "detach"}, ["detach", "symmetric, stop_grad"]),
    ({"preset": "hybrid", "matching": "greedy"}, ["greedy", "index, hungarian"]),
    ({"preset": "hybrid", "margin": -1}, ["margin"]),
    ({"preset": "hybrid", "lambda": 1}, ["lambda"]),
    ("mixed", ["mixed", "backbone, pixel, attention, hybrid, paper, output"]),
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
    with pytest.raises(ValueError, match="cosine, mse, smooth_l1, cosine_centred, infonce"):
        feature_distance(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), kind="l1")
    with pytest.raises(ValueError, match="js, kl, mse"):
        attention_distance(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), kind="cosine")
    with pytest.raises(ValueError, match="different shapes"):
        feature_distance(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="valid mask"):
        feature_distance(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), torch.ones(4, 4, dtype=torch.bool))
    loss = MarsLoss({"backbone": {"taps": ["res4", "res5"]}})
    f = {"backbone.res4": torch.zeros(1, 2, 8, 8)}
    meta = {"backbone.res4": geo(16), "backbone.res5": geo(32)}
    with pytest.raises(ValueError, match="res5"):  # a selected tap that was not captured
        loss(f, f, angle=0, image_size=(128, 128), meta=meta)
    with pytest.raises(ValueError, match="odd batch"):
        loss({"backbone.res4": torch.zeros(3, 2, 8, 8)}, angle=0, image_size=(128, 128), meta=meta)


@pytest.mark.parametrize("meta", [None, {}, {"backbone.res5": geo(32)}, {"strides": {"backbone.res4": 16}},
                                  {"backbone.res4": {"stride": 16}}, {"backbone.res4": Lattice.centred(16)}])
def test_plain_dicts_need_a_tapmeta_for_every_tap(meta):
    "No default strides any more: without a TapMeta (lattice) for a tap, plain dict inputs are an error."
    loss = MarsLoss({"backbone": {"taps": ["res4"]}})
    f = {"backbone.res4": torch.randn(1, 2, 8, 8)}
    with pytest.raises(ValueError, match="TapMeta") as e:
        loss(f, f, angle=30, image_size=(128, 128), meta=meta)
    assert "backbone.res4" in str(e.value)
    assert loss(f, f, angle=30, image_size=(128, 128), meta={"backbone.res4": geo(16)})["mars/total"].item() >= 0


def test_the_lattice_decides_the_alignment():
    "A corner lattice turns about another centre than a centred one: at 90 degrees only the centred one is exact."
    torch.manual_seed(0)
    f = torch.randn(2, 4, 8, 8)
    v1, v2 = {"backbone.res4": f}, {"backbone.res4": torch.rot90(f, 1, (-2, -1))}  # the map turned with its image
    loss = MarsLoss({"backbone": {"taps": ["res4"]}})
    kw = dict(angle=90, image_size=(128, 128))
    assert loss(v1, v2, **kw, meta={"backbone.res4": geo(16)})["mars/backbone"].item() == pytest.approx(0.0, abs=1e-6)
    corner = TapMeta(Lattice.corner(16))
    assert loss(v1, v2, **kw, meta={"backbone.res4": corner})["mars/backbone"].item() > 0.1


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
    assert {k: m.channels for k, m in paper.learned.items()} == {
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


def test_output_preset_on_the_tiny_model(tiny):
    loss = MarsLoss.from_config("output", model=tiny)
    assert list(loss.stages) == ["output"] and loss.stages["output"].distance == "js"
    x = smooth_images(B=1, size=128)
    with loss.taps(tiny) as taps:
        tiny(pixel_values=torch.cat([x, rotate(x, 30)]))
    assert list(taps.captured) == ["output.classes"]
    p = taps.captured["output.classes"]
    assert p.shape[:2] == (2, tiny.config.num_labels) and torch.allclose(p.sum(1), torch.ones(()), atol=1e-5)
    out = loss(taps, angle=30, image_size=(128, 128))
    term = out["mars/output"]
    assert torch.isfinite(term) and term.item() > 0
    assert out["mars/total"].item() == pytest.approx(0.10 * term.item())
    params = [q for q in tiny.model.transformer_module.parameters() if q.requires_grad]
    grads = torch.autograd.grad(out["mars/total"], params, allow_unused=True)
    assert sum(g.abs().sum().item() for g in grads if g is not None) > 0
    # through the view-2 map, not only view 1's: the tap itself gets gradient on both halves
    (gp,) = torch.autograd.grad(loss(taps, angle=30, image_size=(128, 128))["mars/total"], [p])
    assert gp[0].abs().sum() > 0 and gp[1].abs().sum() > 0


def _hybrid_terms(tiny, losses):
    "One forward of the tiny model tapped for the hybrid stages; each loss's output and a supervised stand-in."
    x = smooth_images(B=1, size=128)
    with losses[0].taps(tiny) as taps:
        out = tiny(pixel_values=torch.cat([x, rotate(x, 30)]))
    supervised = out.masks_queries_logits.pow(2).mean() + out.class_queries_logits.pow(2).mean()
    return [loss(taps, angle=30, image_size=(128, 128)) for loss in losses], supervised


def test_gradient_shares_on_the_tiny_model(tiny):
    hybrid = MarsLoss.from_config("hybrid", model=tiny)
    louder = MarsLoss.from_config({"preset": "hybrid", "stages": {"backbone": {"weight": 0.5}}}, model=tiny)  # x10
    silent = MarsLoss.from_config({"preset": "hybrid", "stages": {"pixel_decoder": {"weight": 0.0}}}, model=tiny)
    assert louder.stages["backbone"].weight == pytest.approx(10 * hybrid.stages["backbone"].weight)
    (h, lo, si), supervised = _hybrid_terms(tiny, [hybrid, louder, silent])
    weighted = lambda loss, out: {s: spec.weight * out[f"mars/{s}"] for s, spec in loss.stages.items() if spec.weight > 0}

    shares = gradient_shares(tiny, weighted(hybrid, h), supervised)
    assert set(shares) == {"backbone", "pixel_decoder", "attention"}
    for s, v in shares.items():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad, s
        assert torch.isfinite(v) and v.item() > 0, s
    # linear in the stage's weight: x10 weight, x10 share; the other stages unchanged
    loud = gradient_shares(tiny, weighted(louder, lo), supervised)
    assert loud["backbone"].item() == pytest.approx(10 * shares["backbone"].item(), rel=1e-4)
    for s in ("pixel_decoder", "attention"):
        assert loud[s].item() == pytest.approx(shares[s].item(), rel=1e-4)
    # a weight-0 stage is logged without a graph and not asked for
    assert not si["mars/pixel_decoder"].requires_grad
    quiet = gradient_shares(tiny, weighted(silent, si), supervised)
    assert set(quiet) == {"backbone", "attention"}
    assert quiet["attention"].item() == pytest.approx(shares["attention"].item(), rel=1e-4)
    # the graph is kept: the training step still backpropagates afterwards
    tiny.zero_grad(set_to_none=True)
    (supervised + h["mars/total"]).backward()
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in tiny.model.pixel_level_module.encoder.parameters())
    tiny.zero_grad(set_to_none=True)


def test_taps_without_valid_pixels_are_left_out_of_the_stage_mean():
    torch.manual_seed(0)
    v1 = {"backbone.res4": torch.randn(1, 4, 4, 4), "backbone.res5": torch.randn(1, 4, 2, 2)}
    v2 = {k: torch.randn_like(v) for k, v in v1.items()}
    loss = MarsLoss({"backbone": {"taps": "all"}}, margin=1)
    meta = {"backbone.res4": geo(16), "backbone.res5": geo(32)}
    out = loss(v1, v2, angle=30, image_size=(64, 64), meta=meta, per_tap=True)  # res5: 2x2 grid, eroded to nothing
    assert out["mars/backbone.res5"].item() == 0.0 and out["mars/backbone.res4"].item() > 0
    assert out["mars/backbone"].item() == pytest.approx(out["mars/backbone.res4"].item())


def test_half_precision_inputs_and_autocast():
    torch.manual_seed(0)
    v1 = {"backbone.res5": torch.randn(2, 4, 4, 4), "attention.layer0": torch.softmax(torch.randn(2, 3, 16), -1)}
    v2 = {k: v.flip(-1) for k, v in v1.items()}
    loss = MarsLoss({"backbone": {"taps": "all"}, "attention": {}})
    kw = dict(angle=30, image_size=(128, 128), meta={"backbone.res5": geo(32), "attention.layer0": geo(32, (4, 4))})
    ref = loss(v1, v2, **kw)
    half = loss({k: v.bfloat16() for k, v in v1.items()}, {k: v.bfloat16() for k, v in v2.items()}, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = loss(v1, v2, **kw)
    for k in ref:
        assert half[k].dtype == torch.float32 and auto[k].dtype == torch.float32
        assert auto[k].item() == pytest.approx(ref[k].item(), rel=1e-6)
        assert half[k].item() == pytest.approx(ref[k].item(), rel=5e-2, abs=1e-3)


def test_pseudo_labels_against_a_loop():
    "FixMatch-style pseudo-labels: per pixel, by hand; confident pixels only; divided by every valid pixel."
    import math
    from mars_nb.losses import output_pseudo_label
    g = torch.Generator().manual_seed(0)
    p1 = torch.softmax(3 * torch.randn(2, 3, 5, 6, generator=g), 1)
    p2 = torch.softmax(torch.randn(2, 3, 5, 6, generator=g), 1).requires_grad_()
    valid = torch.rand(2, 5, 6, generator=g) > 0.3
    total, n = 0.0, 0
    for b in range(2):
        for i in range(5):
            for j in range(6):
                if not valid[b, i, j]: continue
                n += 1
                k = int(p1[b, :, i, j].argmax())
                if p1[b, k, i, j] >= 0.9: total += -math.log(float(p2[b, k, i, j]) + 1e-8)
    got = output_pseudo_label(p1, p2, valid, threshold=0.9)
    assert 0 < total and abs(float(got) - total / n) < 1e-5
    got.backward()
    assert (p2.grad[~valid[:, None].expand_as(p2)] == 0).all()
    p1g = p1.clone().requires_grad_()
    assert not output_pseudo_label(p1g, p2.detach(), valid).requires_grad, "no gradient into the upright view"


def test_a_component_that_does_not_vary_gets_a_zero_gradient_not_nan():
    """`_standardize` zeroes a component whose variance is negligible; its gradient must be 0 too. A variance in
    [1e-30, 2e-26] made the old clamp-then-rsqrt overflow in the backward pass (inf times where's 0 is NaN): a GeM
    vector sitting at its floor in every sample did this and killed a default-grid run of mars-paper at step 42."""
    from mars_nb.losses import _standardize
    g = torch.Generator().manual_seed(0)
    v1, v2 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    v1[:, 0], v2[:, 0] = 1e-12, 1e-12
    v1[0, 0] = 1e-12 + 1e-13                     # variance ~1e-27: below the live threshold, inside the overflow window
    v1.requires_grad_(), v2.requires_grad_()
    z1, z2 = _standardize(v1, v2)
    assert (z1[:, 0] == 0).all() and (z2[:, 0] == 0).all()
    both = torch.cat([v1, v2]).detach()
    assert torch.allclose(torch.cat([z1, z2])[:, 1:], (both[:, 1:] - both[:, 1:].mean(0)) / both[:, 1:].std(0, unbiased=False))
    ((z1 * torch.arange(3.0)).sum() + (z2 ** 2).sum()).backward()
    assert torch.isfinite(v1.grad).all() and torch.isfinite(v2.grad).all()
    assert (v1.grad[:, 0] == 0).all() and v1.grad[:, 1:].abs().sum() > 0

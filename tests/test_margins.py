"""Margin layers and pooling vs naive per-sample references (values and gradients)."""

import math

import pytest
import torch
import torch.nn.functional as F

from metric.modeling.layers.margins import ArcFace, CircleClassifier, CosFace, LinearClassifier
from metric.modeling.layers.pooling import AvgPool, GeM, MaxPool


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def naive_logits(kind, x, w, labels, s, m, easy=False):
    """Row-by-row reference straight from the papers' formulas, using autograd-able scalars."""
    rows = []
    for i in range(x.shape[0]):
        row = []
        for j in range(w.shape[0]):
            if kind == "linear":
                row.append((x[i] * w[j]).sum())
                continue
            c = F.cosine_similarity(x[i : i + 1], w[j : j + 1])[0]
            target = labels is not None and j == int(labels[i])
            if kind == "cosface":
                row.append(s * (c - m) if target else s * c)
            elif kind == "arcface":
                if not target:
                    row.append(s * c)
                    continue
                theta = torch.acos(c.clamp(-1 + 1e-7, 1 - 1e-7))
                if easy:
                    row.append(s * torch.cos(theta + m) if c > 0 else s * c)
                elif theta + m <= math.pi:
                    row.append(s * torch.cos(theta + m))
                else:
                    row.append(s * (c - math.sin(math.pi - m) * m))
            elif kind == "circle":
                if target:
                    ap = max(0.0, 1 + m - float(c.detach()))
                    row.append(s * ap * (c - (1 - m)))
                else:
                    an = max(0.0, float(c.detach()) + m)
                    row.append(s * an * (c - m))
        rows.append(torch.stack(row))
    return torch.stack(rows)


LAYERS = {"linear": LinearClassifier, "cosface": CosFace, "arcface": ArcFace, "circle": CircleClassifier}


@pytest.mark.parametrize("kind, easy", [(k, False) for k in sorted(LAYERS)] + [("arcface", True)])
def test_margin_layer_matches_naive(kind, easy):
    torch.manual_seed(0)
    n, d, c, s, m = 6, 5, 4, 16.0, 0.4
    layer = LAYERS[kind](d, c, scale=s, margin=m, easy_margin=easy).double()
    with torch.no_grad():
        layer.weight.normal_()
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    # include an all-same-label batch row and a sample nearly opposite its class centre
    labels = torch.tensor([0, 1, 2, 3, 0, 0])
    with torch.no_grad():
        x[5] = -layer.weight[0] * 3  # theta + m > pi for arcface
    ours = layer(x, labels)
    w = layer.weight.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    ref = naive_logits(kind, x2, w, labels, s, m, easy)
    assert torch.allclose(ours, ref, atol=1e-6), (ours - ref).abs().max()
    F.cross_entropy(ours, labels).backward()
    F.cross_entropy(ref, labels).backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)
    assert torch.allclose(layer.weight.grad, w.grad, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_margin_layer_without_labels_has_no_margin(kind):
    torch.manual_seed(1)
    layer = LAYERS[kind](8, 5, scale=10.0, margin=0.3)
    x = torch.randn(3, 8)
    out = layer(x)
    if kind == "linear":
        assert torch.allclose(out, x @ layer.weight.t())
    else:
        assert torch.allclose(out, 10.0 * F.normalize(x) @ F.normalize(layer.weight).t(), atol=1e-6)


def test_margin_lowers_target_logit():
    torch.manual_seed(2)
    for cls in (CosFace, ArcFace, CircleClassifier):
        layer = cls(8, 5, scale=10.0, margin=0.3)
        x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
        with_margin, plain = layer(x, y), layer(x)
        tgt = F.one_hot(y, 5).bool()
        assert (with_margin[tgt] < plain[tgt]).all(), cls.__name__


def test_gem_matches_naive_and_limits():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 4, 5) + 0.1
    gem = GeM(p=3.0)
    ref = torch.stack([torch.stack([(x[n, c] ** 3).mean() ** (1 / 3) for c in range(3)]) for n in range(2)])
    assert torch.allclose(gem(x), ref, atol=1e-6)
    assert torch.allclose(GeM(p=1.0)(x), AvgPool()(x), atol=1e-6)
    assert torch.allclose(GeM(p=60.0)(x), MaxPool()(x), rtol=0.05)
    gem(x).sum().backward()
    assert gem.p.grad is not None and torch.isfinite(gem.p.grad).all()
    fixed = GeM(p=3.0, learn_p=False)
    assert not fixed.p.requires_grad
    assert list(fixed.state_dict()) == ["p"]


def test_curricularface_matches_naive_and_updates_t():
    from metric.modeling.layers.margins import CurricularFace

    torch.manual_seed(3)
    n, d, c, s, m = 5, 6, 4, 20.0, 0.3
    layer = CurricularFace(d, c, scale=s, margin=m).double().train()
    layer.t.fill_(0.2)
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 3, 2])
    out = layer(x, labels)
    cos = F.normalize(x.detach()) @ F.normalize(layer.weight.detach()).t()
    t_new = 0.99 * 0.2 + 0.01 * float(cos[torch.arange(n), labels].mean())
    assert float(layer.t) == pytest.approx(t_new)
    for i in range(n):
        ct = float(cos[i, labels[i]])
        theta = math.acos(ct)
        tm = math.cos(theta + m) if theta + m <= math.pi else ct - math.sin(math.pi - m) * m
        for j in range(c):
            cj = float(cos[i, j])
            if j == labels[i]:
                want = tm
            elif cj > math.cos(theta + m):
                want = cj * (t_new + cj)
            else:
                want = cj
            assert float(out[i, j].detach()) == pytest.approx(s * want, abs=1e-9)
    F.cross_entropy(out, labels).backward()
    assert torch.isfinite(x.grad).all()
    layer.eval()
    t_before = float(layer.t)
    layer(x, labels)
    assert float(layer.t) == t_before  # t moves only in training


# --- sub-center ArcFace, AdaCos, per-class margins, margin schedule ------------------------


def _naive_arc(c, m, easy=False):
    theta = torch.acos(c.clamp(-1 + 1e-7, 1 - 1e-7))
    if easy:
        return torch.cos(theta + m) if c > 0 else c
    return torch.cos(theta + m) if theta + m <= math.pi else c - math.sin(math.pi - m) * m


def test_subcenter_arcface_matches_naive():
    from metric.modeling.layers.margins import SubCenterArcFace

    torch.manual_seed(4)
    n, d, c, k, s, m = 5, 6, 3, 2, 16.0, 0.4
    layer = SubCenterArcFace(d, c, scale=s, margin=m, subcenters=k).double()
    assert layer.weight.shape == (c * k, d)
    with torch.no_grad():
        layer.weight.normal_()
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 0])
    w = layer.weight.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    rows = []
    for i in range(n):
        row = []
        for j in range(c):
            best = torch.stack(
                [F.cosine_similarity(x2[i : i + 1], w[j * k + q : j * k + q + 1])[0] for q in range(k)]
            ).max()
            row.append(s * (_naive_arc(best, m) if j == int(labels[i]) else best))
        rows.append(torch.stack(row))
    ref = torch.stack(rows)
    ours = layer(x, labels)
    assert torch.allclose(ours, ref, atol=1e-6)
    F.cross_entropy(ours, labels).backward()
    F.cross_entropy(ref, labels).backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6) and torch.allclose(layer.weight.grad, w.grad, atol=1e-6)
    # one sub-center is plain ArcFace
    one = SubCenterArcFace(d, c, scale=s, margin=m, subcenters=1).double()
    plain = ArcFace(d, c, scale=s, margin=m).double()
    plain.load_state_dict(one.state_dict())
    assert torch.allclose(one(x, labels), plain(x, labels))


@pytest.mark.parametrize("adaptive", [True, False])
def test_adacos_matches_naive(adaptive):
    import statistics

    from metric.modeling.layers.adacos import AdaCos

    torch.manual_seed(5)
    n, d, c = 6, 5, 7
    layer = AdaCos(d, c, adaptive=adaptive).double().train()
    s0 = math.sqrt(2) * math.log(c - 1)
    assert float(layer.scale) == pytest.approx(s0)
    with torch.no_grad():
        layer.weight.normal_()
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 2, 6, 6])
    with torch.no_grad():
        cos = [[float(F.cosine_similarity(x[i : i + 1], layer.weight[j : j + 1])) for j in range(c)] for i in range(n)]
    if adaptive:
        b_avg = sum(sum(math.exp(s0 * cos[i][j]) for j in range(c) if j != labels[i]) for i in range(n)) / n
        theta_med = statistics.median_low([math.acos(cos[i][labels[i]]) for i in range(n)])
        s = math.log(b_avg) / math.cos(min(math.pi / 4, theta_med))
    else:
        s = s0
    out = layer(x, labels)
    assert float(layer.scale) == pytest.approx(s)
    x2 = x.detach().clone().requires_grad_(True)
    w = layer.weight.detach().clone().requires_grad_(True)
    ref = s * torch.stack(
        [torch.stack([F.cosine_similarity(x2[i : i + 1], w[j : j + 1])[0] for j in range(c)]) for i in range(n)]
    )
    assert torch.allclose(out, ref, atol=1e-9)
    F.cross_entropy(out, labels).backward()
    F.cross_entropy(ref, labels).backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-9) and torch.allclose(layer.weight.grad, w.grad, atol=1e-9)
    layer.eval()
    layer(x, labels)
    assert float(layer.scale) == pytest.approx(s)  # no update in evaluation mode
    assert list(layer.state_dict()) == ["weight", "scale"]


def test_dynamic_margins_follow_the_formula():
    from metric.modeling.layers.margin_policy import dynamic_margins

    counts = [1, 4, 16, 100, 0]
    a, b, lam = 0.45, 0.05, 0.25
    raw = dynamic_margins(counts, a, b, lam, normalize=False)
    for c, n in enumerate(counts[:4]):
        assert float(raw[c]) == pytest.approx(a * n**-lam + b, rel=1e-6)
    x = [n**-lam for n in counts[:4]]
    norm = dynamic_margins(counts, a, b, lam, normalize=True)
    for c in range(4):
        assert float(norm[c]) == pytest.approx(a * (x[c] - min(x)) / (max(x) - min(x)) + b, rel=1e-6)
    assert float(norm[0]) == pytest.approx(a + b) and float(norm[3]) == pytest.approx(b)  # rarest, most frequent
    assert float(norm[4]) == pytest.approx(float(norm[0]))  # absent class: the rarest present class's margin
    assert torch.allclose(dynamic_margins([5, 5, 5], a, b, lam), torch.full((3,), b))


@pytest.mark.parametrize("kind", ["cosface", "arcface", "subcenter_arcface", "curricularface"])
def test_per_class_margin_is_margin_of_the_label(kind):
    """With per-class margins every sample's logits equal those of a layer whose scalar margin is
    the margin of that sample's label."""
    from metric.modeling.registry import MARGIN_LAYERS

    torch.manual_seed(6)
    cls = MARGIN_LAYERS.get(kind)
    layer = cls(6, 4, scale=10.0, margin=0.3).double().train()
    margins = torch.tensor([0.1, 0.25, 0.4, 0.55])
    layer.set_class_margins(margins)
    assert "class_margin" not in layer.state_dict()
    x = torch.randn(5, 6, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 3])
    out = layer(x, labels)
    for i in range(5):
        ref = cls(6, 4, scale=10.0, margin=float(margins[labels[i]])).double().train()
        ref.load_state_dict(layer.state_dict())
        if kind == "curricularface":
            ref.eval().t.copy_(layer.t)  # the running t after this batch, as the batch used it
        assert torch.allclose(out[i], ref(x[i : i + 1], labels[i : i + 1])[0], atol=1e-6), i
    # the schedule scales per-class margins with the scalar margin
    layer.set_margin(0.6)
    assert torch.allclose(layer.class_margin, margins * 2)
    assert layer.margin == pytest.approx(0.6)


def test_set_margin_changes_the_scalar_margin():
    torch.manual_seed(7)
    x, y = torch.randn(3, 8), torch.tensor([0, 1, 2])
    layer, ref = CosFace(8, 3, margin=0.1), CosFace(8, 3, margin=0.3)
    ref.load_state_dict(layer.state_dict())
    layer.set_margin(0.3)
    assert torch.allclose(layer(x, y), ref(x, y))
    arc, arc_ref = ArcFace(8, 3, margin=0.1), ArcFace(8, 3, margin=0.5)
    arc_ref.load_state_dict(arc.state_dict())
    arc.set_margin(0.5)
    assert torch.allclose(arc(x, y), arc_ref(x, y))


def test_scheduled_margin_step_and_linear():
    from metric.modeling.layers.margin_policy import scheduled_margin

    sched = [[0, 0.1], [4, 0.3], [6, 0.4]]
    assert [scheduled_margin(sched, e) for e in range(8)] == [0.1] * 4 + [0.3] * 2 + [0.4] * 2
    lin = [scheduled_margin(sched, e, "linear") for e in range(8)]
    assert lin == pytest.approx([0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.4])


def test_avgmaxpool_and_identity_pooling():
    from metric.modeling.layers.pooling import AvgMaxPool, IdentityPool
    from metric.utils.errors import ConfigError

    x = torch.rand(2, 3, 4, 5)
    assert torch.allclose(AvgMaxPool()(x), x.mean(dim=(2, 3)) + x.amax(dim=(2, 3)))
    v = torch.rand(2, 3)
    assert torch.equal(IdentityPool()(v), v) and torch.equal(IdentityPool()(v[:, :, None, None]), v)
    with pytest.raises(ConfigError, match="identity"):
        IdentityPool()(x)

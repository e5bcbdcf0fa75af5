"""Margin layers and pooling vs naive per-sample references (values and gradients)."""

import math

import pytest
import torch
import torch.nn.functional as F

from metric.modeling.layers.margins import ArcFace, CircleClassifier, CosFace, LinearClassifier
from metric.modeling.layers.pooling import GeM, AvgPool, MaxPool


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

"""Losses vs naive per-anchor references (values and gradients), edge cases, combined losses,
their config keys, and a training run with the pk sampler, two losses and a margin schedule."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from metric.config import load_cfg
from metric.modeling import build_loss
from metric.modeling.losses.circle import CircleLoss
from metric.modeling.losses.triplet import TripletLoss
from metric.utils.errors import ConfigError
from tests.helpers import tiny_opts, tool_in_process


def naive_triplet(x, labels, margin, soft, hard, normalize=True):
    """Loop over anchors; distances as norms of differences."""
    n = x.shape[0]
    if normalize:
        x = torch.stack([x[i] / x[i].norm() for i in range(n)])
    losses = []
    for i in range(n):
        pos = [(x[i] - x[j]).norm() for j in range(n) if j != i and labels[j] == labels[i]]
        neg = [(x[i] - x[j]).norm() for j in range(n) if labels[j] != labels[i]]
        if not pos or not neg:
            continue
        pos, neg = torch.stack(pos), torch.stack(neg)
        if hard:
            d_p, d_n = pos.max(), neg.min()
        else:
            wp = torch.exp(pos.detach()) / torch.exp(pos.detach()).sum()
            wn = torch.exp(-neg.detach()) / torch.exp(-neg.detach()).sum()
            d_p, d_n = (wp * pos).sum(), (wn * neg).sum()
        losses.append(torch.log1p(torch.exp(d_p - d_n)) if soft else torch.clamp(d_p - d_n + margin, min=0))
    return torch.stack(losses).mean() if losses else x.sum() * 0


def naive_circle(x, labels, m, gamma):
    n = x.shape[0]
    losses = []
    for i in range(n):
        sp = [F.cosine_similarity(x[i : i + 1], x[j : j + 1])[0] for j in range(n) if j != i and labels[j] == labels[i]]
        sn = [F.cosine_similarity(x[i : i + 1], x[j : j + 1])[0] for j in range(n) if labels[j] != labels[i]]
        if not sp or not sn:
            continue
        neg_sum = sum(torch.exp(gamma * max(0.0, float(s.detach()) + m) * (s - m)) for s in sn)
        pos_sum = sum(torch.exp(-gamma * max(0.0, 1 + m - float(s.detach())) * (s - (1 - m))) for s in sp)
        losses.append(torch.log(1 + neg_sum * pos_sum))
    return torch.stack(losses).mean() if losses else x.sum() * 0


# labels with: a class of one image (anchor 5 has no positive), classes of two and three
LABELS = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])


def _compare(loss_fn, ref_fn, labels, seed=0, atol=1e-9):
    torch.manual_seed(seed)
    x = torch.randn(len(labels), 6, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    ours, ref = loss_fn(None, x, labels), ref_fn(x2, labels)
    assert torch.isfinite(ours)
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), abs=atol)
    ours.backward()
    ref.backward()
    assert torch.isfinite(x.grad).all()
    assert torch.allclose(x.grad, x2.grad, atol=atol)
    return float(ours.detach())


@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_triplet_matches_naive(hard, soft, normalize):
    loss = TripletLoss(margin=0.5, soft_margin=soft, hard_mining=hard, normalize=normalize)
    value = _compare(loss, lambda x, y: naive_triplet(x, y, 0.5, soft, hard, normalize), LABELS)
    assert value > 0


@pytest.mark.parametrize("gamma", [4.0, 32.0])
def test_circle_matches_naive(gamma):
    loss = CircleLoss(margin=0.25, gamma=gamma)
    assert _compare(loss, lambda x, y: naive_circle(x, y, 0.25, gamma), LABELS) > 0


@pytest.mark.parametrize("labels", [torch.zeros(6, dtype=torch.long), torch.arange(6)], ids=["same", "distinct"])
@pytest.mark.parametrize(
    "loss",
    [TripletLoss(), TripletLoss(hard_mining=False, soft_margin=True), CircleLoss(gamma=256.0)],
    ids=["triplet_hard", "triplet_weighted_soft", "circle"],
)
def test_pairwise_losses_without_pairs_are_zero_not_nan(loss, labels):
    """All-same-label batch (no negatives) and all-distinct batch (no positives)."""
    x = torch.randn(6, 4, requires_grad=True)
    value = loss(None, x, labels)
    assert float(value.detach()) == 0.0
    value.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_pairwise_losses_stay_finite_with_duplicates_and_large_gamma():
    """A P x K batch repeats the images of small classes: identical embeddings are distance 0."""
    torch.manual_seed(1)
    base = torch.randn(4, 8)
    x = torch.cat([base, base]).requires_grad_(True)  # every sample has an exact duplicate
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    for loss in (TripletLoss(), TripletLoss(hard_mining=False), CircleLoss(gamma=256.0)):
        x.grad = None
        value = loss(None, x, labels)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(x.grad).all(), type(loss).__name__


def _cfg(*opts):
    return load_cfg(None, ["MODEL.HEADS.NUM_CLASSES", "4", *map(str, opts)])


def test_combined_loss_is_the_scaled_sum():
    cfg = _cfg(
        "MODEL.LOSSES.NAME",
        "[cross_entropy, triplet, circle]",
        "MODEL.LOSSES.CE.SCALE",
        0.5,
        "MODEL.LOSSES.TRIPLET.SCALE",
        2.0,
        "MODEL.LOSSES.CIRCLE.SCALE",
        0.1,
        "MODEL.LOSSES.LABEL_SMOOTHING",
        0.1,
        "MODEL.LOSSES.TRIPLET.MARGIN",
        0.4,
        "MODEL.LOSSES.CIRCLE.GAMMA",
        16,
        "MODEL.LOSSES.CIRCLE.MARGIN",
        0.3,
    )
    combined = build_loss(cfg)
    torch.manual_seed(2)
    logits, emb = torch.randn(8, 4), torch.randn(8, 6)
    total, values = combined(logits, emb, LABELS % 4)
    ce = F.cross_entropy(logits, LABELS % 4, label_smoothing=0.1)
    tri = TripletLoss(margin=0.4)(logits, emb, LABELS % 4)
    cir = CircleLoss(margin=0.3, gamma=16.0)(logits, emb, LABELS % 4)
    assert list(values) == ["cross_entropy", "triplet", "circle"]
    for got, want in zip(values.values(), (ce, tri, cir)):
        assert float(got) == pytest.approx(float(want), rel=1e-6)
    assert float(total) == pytest.approx(0.5 * float(ce) + 2.0 * float(tri) + 0.1 * float(cir), rel=1e-6)


def test_pairwise_only_keeps_logits_in_the_graph():
    combined = build_loss(_cfg("MODEL.LOSSES.NAME", "triplet"))
    logits, emb = torch.randn(8, 4, requires_grad=True), torch.randn(8, 6, requires_grad=True)
    total, values = combined(logits, emb, LABELS % 4)
    assert float(total.detach()) == pytest.approx(float(values["triplet"].detach()))
    total.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))  # used (for DDP), with a zero gradient


def test_loss_name_accepts_a_string_and_a_list(tmp_path):
    assert _cfg("MODEL.LOSSES.NAME", "triplet").MODEL.LOSSES.NAME == ["triplet"]
    assert _cfg("MODEL.LOSSES.NAME", "['circle', 'cross_entropy']").MODEL.LOSSES.NAME == ["circle", "cross_entropy"]
    original = tmp_path / "orig.yaml"  # the original project's files say NAME as a string
    original.write_text("MODEL:\n  LOSSES:\n    NAME: cross_entropy\n")
    assert load_cfg(str(original)).MODEL.LOSSES.NAME == ["cross_entropy"]
    listed = tmp_path / "list.yaml"
    listed.write_text("VERSION: 2\nMODEL:\n  LOSSES:\n    NAME: [cross_entropy, triplet]\n")
    assert load_cfg(str(listed)).MODEL.LOSSES.NAME == ["cross_entropy", "triplet"]


@pytest.mark.parametrize(
    "opts, words",
    [
        (
            ["MODEL.LOSSES.NAME", "[cross_entropy, tripplet]"],
            ["MODEL.LOSSES.NAME='tripplet'", "did you mean 'triplet'"],
        ),
        (["MODEL.LOSSES.NAME", "[]"], ["MODEL.LOSSES.NAME", "non-empty"]),
        (["MODEL.LOSSES.NAME", "[triplet, triplet]"], ["MODEL.LOSSES.NAME", "different"]),
        (["MODEL.LOSSES.CIRCLE.GAMMA", "0"], ["MODEL.LOSSES.CIRCLE.GAMMA", "> 0"]),
        (["MODEL.LOSSES.TRIPLET.SCALE", "-1"], ["MODEL.LOSSES.TRIPLET.SCALE", ">= 0"]),
        (
            ["MODEL.HEADS.CLS_LAYER", "linear", "MODEL.HEADS.DYNAMIC_MARGIN", "True"],
            ["MODEL.HEADS.DYNAMIC_MARGIN", "linear"],
        ),
        (
            ["MODEL.HEADS.CLS_LAYER", "arcface", "MODEL.HEADS.MARGIN_SCHEDULE", "[[1, 0.1]]"],
            ["MODEL.HEADS.MARGIN_SCHEDULE", "from 0"],
        ),
        (
            ["MODEL.HEADS.CLS_LAYER", "arcface", "MODEL.HEADS.MARGIN_SCHEDULE", "[[0, 0.1], [0, 0.2]]"],
            ["MODEL.HEADS.MARGIN_SCHEDULE", "strictly ascending"],
        ),
        (
            ["MODEL.HEADS.CLS_LAYER", "arcface", "MODEL.HEADS.MARGIN_SCHEDULE", "[[0, 0.1, 3]]"],
            ["MODEL.HEADS.MARGIN_SCHEDULE", "pair"],
        ),
        (
            ["MODEL.HEADS.CLS_LAYER", "adacos", "MODEL.HEADS.MARGIN_SCHEDULE", "[[0, 0.1]]"],
            ["MODEL.HEADS.MARGIN_SCHEDULE", "adacos"],
        ),
        (["MODEL.HEADS.MARGIN_SCHEDULE_MODE", "cosine"], ["MODEL.HEADS.MARGIN_SCHEDULE_MODE", "step | linear"]),
        (
            ["TRAIN.SAMPLER", "pk", "TRAIN.BATCH_SIZE", "10", "TRAIN.NUM_INSTANCES", "4"],
            ["TRAIN.BATCH_SIZE=10", "TRAIN.NUM_INSTANCES=4"],
        ),
        (["TRAIN.SAMPLER", "balanced"], ["TRAIN.SAMPLER", "random | pk"]),
    ],
)
def test_bad_loss_and_margin_keys_name_the_key(opts, words):
    with pytest.raises(ConfigError) as err:
        _cfg(*opts)
    for w in words:
        assert w in str(err.value)


@pytest.mark.slow
def test_training_with_pk_sampler_two_losses_and_margin_schedule(tiny_data, tmp_path):
    from metric.utils.logger import read_stats

    out = str(tmp_path / "run")
    opts = tiny_opts(
        tiny_data,
        out,
        **{
            "TEST.DATASET": "",
            "OPTIM.MAX_EPOCH": 3,
            "TRAIN.SAMPLER": "pk",
            "TRAIN.NUM_INSTANCES": 2,
            "MODEL.LOSSES.NAME": "[cross_entropy,triplet]",
            "MODEL.LOSSES.TRIPLET.SCALE": 0.5,
            "MODEL.HEADS.DYNAMIC_MARGIN": True,
            "MODEL.HEADS.MARGIN_SCHEDULE": "[[0,0.1],[1,0.2],[2,0.3]]",
        },
    )
    proc = tool_in_process("train_metric", opts)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dynamic margins from the class counts" in proc.stdout
    epochs = read_stats(os.path.join(out, "stats.jsonl"), "train_epoch")
    assert [e["margin"] for e in epochs] == pytest.approx([0.1, 0.2, 0.3])
    for e in epochs:
        assert math.isfinite(e["loss_triplet"]) and math.isfinite(e["loss_cross_entropy"])
        assert e["loss"] == pytest.approx(e["loss_cross_entropy"] + 0.5 * e["loss_triplet"], rel=1e-5)
    iters = read_stats(os.path.join(out, "stats.jsonl"), "train_iter")
    assert {"loss_cross_entropy", "loss_triplet", "margin"} <= set(iters[0])

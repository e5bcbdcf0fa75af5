"""Margin layers: embedding [N, D] (+ labels) -> training logits [N, C].

Every layer holds a class-weight matrix ``weight`` [C, D] (state-dict key
``weight``, as in the original project; [C * K, D] for K sub-centers). Without
labels each returns the plain (scaled) similarities, so it can be called at
evaluation time too; with labels the margin is applied to the target class only.

Layers with a margin share :class:`_Margin`: ``set_margin(m)`` changes it (the
margin schedule), ``set_class_margins(m_c)`` gives every class its own margin
(dynamic margins; a sample then gets ``m_c[label]``). Per-class margins live in
a non-persistent buffer, so state-dict keys do not change.

The margin of every layer is :meth:`margin_logits` on a block of cosines: ``forward`` calls it
on all classes, the model-parallel classifier (:mod:`metric.modeling.layers.partial_fc`) on the
columns of one process's classes. A layer built with ``shard=(start, stop)`` holds only the rows
of classes ``start .. stop - 1`` of its ``num_classes`` (``weight`` [(stop - start) * K, D]).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from metric.modeling.registry import MARGIN_LAYERS

# Rows of the class-weight matrix drawn per generator when a sharded layer is initialized
# (``init_seed``): row r's initial value depends on the seed and r only, not on the shards.
INIT_BLOCK_ROWS = 4096


def _seeded_rows(rows, cols, seed, std, dtype=torch.float32):
    """Rows ``rows.start .. rows.stop - 1`` of a [*, cols] matrix of N(0, std^2) values whose block b
    of :data:`INIT_BLOCK_ROWS` rows is drawn from a generator seeded with ``(seed, b)``."""
    out = torch.empty(rows.stop - rows.start, cols, dtype=dtype)
    first, last = rows.start // INIT_BLOCK_ROWS, (rows.stop - 1) // INIT_BLOCK_ROWS
    for b in range(first, last + 1) if rows.stop > rows.start else ():
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + b)
        block = torch.empty(INIT_BLOCK_ROWS, cols, dtype=dtype).normal_(0.0, std, generator=g)
        lo, hi = max(rows.start, b * INIT_BLOCK_ROWS), min(rows.stop, (b + 1) * INIT_BLOCK_ROWS)
        out[lo - rows.start : hi - rows.start] = block[lo - b * INIT_BLOCK_ROWS : hi - b * INIT_BLOCK_ROWS]
    return out


class ClassWeights(nn.Module):
    """The class-weight matrix every classifier layer here builds on (the margin layers, AdaCos,
    the plain linear classifier): ``weight`` [num_classes * centers, D]; rows ``c * centers ... c * centers +
    centers - 1``
    belong to class ``c``. With ``shard=(start, stop)`` only classes ``start .. stop - 1`` are
    held (row ``(c - start) * centers + k`` is centre k of class c). ``init_seed``: draw the rows
    from per-block generators (:func:`_seeded_rows`), so a shard gets the same rows whatever the
    number of shards; None draws them from the global RNG."""

    def __init__(self, in_features, num_classes, centers=1, shard=None, init_seed=None):
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes
        self.centers = centers
        start, stop = shard if shard is not None else (0, num_classes)
        if not 0 <= start <= stop <= num_classes:
            raise ValueError(f"shard ({start}, {stop}) is not a range of classes in [0, {num_classes}]")
        self.shard = (int(start), int(stop))
        rows = (stop - start) * centers
        if init_seed is None:
            self.weight = nn.Parameter(torch.empty(rows, in_features))
            nn.init.normal_(self.weight, std=0.01)
        else:
            rows = range(start * centers, stop * centers)
            self.weight = nn.Parameter(_seeded_rows(rows, in_features, init_seed, 0.01))

    @property
    def sharded(self):
        return self.shard != (0, self.num_classes)

    def cosine(self, x, weight=None):
        """Cosines [N, classes] of ``x`` with the class centres (``weight`` rows, default all)."""
        w = self.weight if weight is None else weight
        return F.linear(F.normalize(x, dim=1), F.normalize(w, dim=1))

    def class_scores(self, x, weight=None):
        """The block :meth:`margin_logits` works on: cosines (raw products for ``linear``)."""
        return self.cosine(x, weight)

    def margin_logits(self, cos, labels, cols, target=None, all_sum=None):
        """Logits from the block ``cos`` [N, c] of :meth:`class_scores`. ``labels`` [N]: the samples'
        classes; ``cols`` [N]: the column of each sample's class in ``cos``, -1 where it is not in
        the block; ``target`` [N, 1]: the target cosines when they are not all in the block (the
        model-parallel classifier); ``all_sum``: sums a tensor over the blocks (all processes)."""
        raise NotImplementedError

    def forward(self, x, labels=None):
        if self.sharded:
            raise RuntimeError("a sharded margin layer is called through metric.modeling.layers.partial_fc")
        cos = self.class_scores(x)
        if labels is None:
            return self.margin_logits(cos, None, None)
        return self.margin_logits(cos, labels, labels)

    def extra_repr(self):
        extra = f", centers={self.centers}" if self.centers > 1 else ""
        shard = f", shard={self.shard}" if self.sharded else ""
        return f"in_features={self.in_features}, num_classes={self.num_classes}{extra}{shard}"


class _Margin(ClassWeights):
    """A scalar margin that can be rescheduled, optionally replaced by per-class margins.

    ``set_class_margins(m_c)`` stores ``m_c`` as the per-class margins *at the layer's
    current margin* ``m0``; a later ``set_margin(m)`` scales them by ``m / m0``, so the
    schedule raises every class's margin in proportion. A sharded layer keeps the margins of
    all ``num_classes`` (the targets of a batch may lie in any shard)."""

    def __init__(self, in_features, num_classes, margin, centers=1, shard=None, init_seed=None):
        super().__init__(in_features, num_classes, centers, shard, init_seed)
        self.margin = float(margin)
        self.register_buffer("class_margin", None, persistent=False)
        self._class_margin_ref = None  # (margins as given, the scalar margin they belong to)

    def set_class_margins(self, margins):
        margins = torch.as_tensor(margins, dtype=torch.float32, device=self.weight.device).flatten()
        if margins.numel() != self.num_classes:
            raise ValueError(f"got {margins.numel()} class margins for {self.num_classes} classes")
        self._class_margin_ref = (margins.clone(), self.margin)
        self.class_margin = margins.clone()

    def set_margin(self, margin):
        margin = float(margin)
        if self._class_margin_ref is not None:
            base, ref = self._class_margin_ref
            if ref == 0:
                raise ValueError("cannot rescale per-class margins set at margin 0; set them at a margin > 0")
            with torch.no_grad():  # in place: DistributedDataParallel keeps references to buffers
                self.class_margin.copy_(base * (margin / ref))
        self.margin = margin

    def margin_for(self, labels, dtype):
        """The margin of each sample: a float, or a [N, 1] tensor with ``class_margin[label]``."""
        if self.class_margin is None:
            return self.margin
        return self.class_margin[labels].to(dtype)[:, None]

    def extra_repr(self):
        per_class = ", per-class margins" if self.class_margin is not None else ""
        return f"{super().extra_repr()}, margin={self.margin:g}{per_class}"


def _angular(m):
    """cos m, sin m, cos(pi - m) and sin(pi - m) * m for a float or a tensor margin."""
    if isinstance(m, torch.Tensor):
        return torch.cos(m), torch.sin(m), torch.cos(math.pi - m), torch.sin(math.pi - m) * m
    return math.cos(m), math.sin(m), math.cos(math.pi - m), math.sin(math.pi - m) * m


def additive_angular(cos, m, easy_margin=False):
    """``cos(theta + m)`` for cosines ``cos``; where ``theta + m`` would pass pi, ``cos - m sin m``
    (keeps it monotonic) or, with ``easy_margin``, no margin where ``cos <= 0``."""
    cos_m, sin_m, threshold, fallback = _angular(m)
    sin = torch.sqrt((1.0 - cos * cos).clamp(min=0.0))
    phi = cos * cos_m - sin * sin_m
    if easy_margin:
        return torch.where(cos > 0, phi, cos)
    return torch.where(cos > threshold, phi, cos - fallback)


def replace_targets(cos, cols, fn):
    """``cos`` with the entry of row i in column ``cols[i]`` replaced by ``fn(entries)`` ([N, 1]);
    rows with ``cols[i] < 0`` (their class is in another block) are left unchanged."""
    owned = (cols >= 0)[:, None]
    idx = cols.clamp(min=0)[:, None]
    if cos.shape[1] == 0:
        return cos
    old = cos.gather(1, idx)
    new = torch.where(owned, fn(old), old)
    return cos.scatter(1, idx, new.to(cos.dtype))


@MARGIN_LAYERS.register("linear")
class LinearClassifier(ClassWeights):
    """Plain softmax classifier without bias: ``x @ W^T``."""

    def __init__(self, in_features, num_classes, shard=None, init_seed=None, **unused):
        super().__init__(in_features, num_classes, shard=shard, init_seed=init_seed)

    def class_scores(self, x, weight=None):
        return F.linear(x, self.weight if weight is None else weight)

    def margin_logits(self, cos, labels, cols, target=None, all_sum=None):
        return cos


@MARGIN_LAYERS.register("cosface")
class CosFace(_Margin):
    """Large-margin cosine loss (Wang et al. 2018): ``s * (cos - m)`` on the target class."""

    def __init__(self, in_features, num_classes, scale=30.0, margin=0.35, shard=None, init_seed=None, **unused):
        super().__init__(in_features, num_classes, margin, shard=shard, init_seed=init_seed)
        self.scale = scale

    def margin_logits(self, cos, labels, cols, target=None, all_sum=None):
        if labels is not None:
            m = self.margin_for(labels, cos.dtype)
            cos = replace_targets(cos, cols, lambda c: c - m)
        return cos * self.scale


@MARGIN_LAYERS.register("arcface")
class ArcFace(_Margin):
    """Additive angular margin (Deng et al. 2019): ``s * cos(theta + m)`` on the target class.

    Where ``theta + m`` would exceed pi the target logit becomes ``cos - m * sin(m)``
    (keeps it monotonic), unless ``easy_margin`` is set, in which case the margin is
    applied only where ``cos > 0``.
    """

    def __init__(
        self,
        in_features,
        num_classes,
        scale=30.0,
        margin=0.5,
        easy_margin=False,
        centers=1,
        shard=None,
        init_seed=None,
        **unused,
    ):
        super().__init__(in_features, num_classes, margin, centers, shard=shard, init_seed=init_seed)
        self.scale, self.easy_margin = scale, easy_margin

    def margin_logits(self, cos, labels, cols, target=None, all_sum=None):
        if labels is None:
            return cos * self.scale
        m = self.margin_for(labels, cos.dtype)
        return replace_targets(cos, cols, lambda c: additive_angular(c, m, self.easy_margin)) * self.scale


@MARGIN_LAYERS.register("subcenter_arcface")
class SubCenterArcFace(ArcFace):
    """Sub-center ArcFace (Deng et al. 2020): K centers per class, the class cosine is the
    largest of its K center cosines, then ArcFace's margin. ``weight`` is [C * K, D], rows
    ``c * K ... c * K + K - 1`` belonging to class ``c``."""

    def __init__(
        self,
        in_features,
        num_classes,
        scale=30.0,
        margin=0.5,
        easy_margin=False,
        subcenters=3,
        shard=None,
        init_seed=None,
        **unused,
    ):
        if subcenters < 1:
            raise ValueError(f"subcenters must be >= 1, got {subcenters}")
        super().__init__(
            in_features, num_classes, scale, margin, easy_margin, centers=subcenters, shard=shard, init_seed=init_seed
        )

    def cosine(self, x, weight=None):
        cos = super().cosine(x, weight)
        return cos.view(cos.shape[0], -1, self.centers).amax(dim=2)


@MARGIN_LAYERS.register("circle")
class CircleClassifier(_Margin):
    """Classification form of Circle loss (Sun et al. 2020).

    Target logit ``s * a_p * (cos - d_p)``, other logits ``s * a_n * (cos - d_n)`` with
    ``a_p = relu(1 + m - cos)``, ``a_n = relu(cos + m)`` (weights not back-propagated),
    ``d_p = 1 - m``, ``d_n = m``.
    """

    def __init__(self, in_features, num_classes, scale=64.0, margin=0.25, shard=None, init_seed=None, **unused):
        super().__init__(in_features, num_classes, margin, shard=shard, init_seed=init_seed)
        self.scale = scale

    def margin_logits(self, cos, labels, cols, target=None, all_sum=None):
        if labels is None:
            return cos * self.scale
        m = self.margin
        alpha_n = (cos + m).clamp(min=0.0).detach()
        neg = alpha_n * (cos - m)

        def positive(c):
            return (1.0 + m - c).clamp(min=0.0).detach() * (c - (1.0 - m))

        # the target entries of ``neg`` are replaced by the positive formula on the cosine
        out = replace_targets(neg, cols, lambda _: positive(cos.gather(1, cols.clamp(min=0)[:, None])))
        return out * self.scale


@MARGIN_LAYERS.register("curricularface")
class CurricularFace(_Margin):
    """CurricularFace (Huang et al. 2020); the original pymetric project called this ``arcface``.

    The target logit is ArcFace's ``cos(theta + m)`` (with the same fallback past pi - m). A
    non-target logit ``c`` harder than the target's margin-adjusted logit is re-weighted to
    ``c * (t + c)``, where ``t`` is a running mean (momentum 0.01) of the target cosines kept in
    the buffer ``t`` (state-dict key ``t``, as in the original checkpoints) and updated in
    training mode only. The re-weighting factor is not back-propagated through ``t``.
    """

    def __init__(
        self, in_features, num_classes, scale=30.0, margin=0.5, t_momentum=0.01, shard=None, init_seed=None, **unused
    ):
        super().__init__(in_features, num_classes, margin, shard=shard, init_seed=init_seed)
        self.scale, self.t_momentum = scale, t_momentum
        self.register_buffer("t", torch.zeros(1))

    def cosine(self, x, weight=None):
        return super().cosine(x, weight).clamp(-1.0, 1.0)

    def margin_logits(self, cos, labels, cols, target=None, all_sum=None):
        if labels is None:
            return cos * self.scale
        if target is None:
            target = cos.gather(1, cols[:, None])
        cos_m, sin_m, threshold, fallback = _angular(self.margin_for(labels, cos.dtype))
        sin = torch.sqrt((1.0 - target * target).clamp(min=0.0))
        target_m = target * cos_m - sin * sin_m
        final_target = torch.where(target > threshold, target_m, target - fallback)
        if self.training:
            with torch.no_grad():
                self.t.mul_(1.0 - self.t_momentum).add_(self.t_momentum * target.mean())
        hard = cos > target_m
        out = torch.where(hard, cos * (self.t + cos), cos)
        # t is float32 under autocast
        out = replace_targets(out, cols, lambda old: final_target.to(old.dtype))
        return out * self.scale

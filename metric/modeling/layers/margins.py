"""Margin layers: embedding [N, D] (+ labels) -> training logits [N, C].

Every layer holds a class-weight matrix ``weight`` [C, D] (state-dict key
``weight``, as in the original project; [C * K, D] for K sub-centers). Without
labels each returns the plain (scaled) similarities, so it can be called at
evaluation time too; with labels the margin is applied to the target class only.

Layers with a margin share :class:`_Margin`: ``set_margin(m)`` changes it (the
margin schedule), ``set_class_margins(m_c)`` gives every class its own margin
(dynamic margins; a sample then gets ``m_c[label]``). Per-class margins live in
a non-persistent buffer, so state-dict keys do not change.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from metric.modeling.registries import MARGIN_LAYERS


class _ClassWeights(nn.Module):
    """``weight`` [num_classes * centers, D]; rows ``c * centers ... c * centers + centers - 1``
    belong to class ``c``."""

    def __init__(self, in_features, num_classes, centers=1):
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes
        self.centers = centers
        self.weight = nn.Parameter(torch.empty(num_classes * centers, in_features))
        nn.init.normal_(self.weight, std=0.01)

    def cosine(self, x):
        return F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))

    def extra_repr(self):
        extra = f", centers={self.centers}" if self.centers > 1 else ""
        return f"in_features={self.in_features}, num_classes={self.num_classes}{extra}"


class _Margin(_ClassWeights):
    """A scalar margin that can be rescheduled, optionally replaced by per-class margins.

    ``set_class_margins(m_c)`` stores ``m_c`` as the per-class margins *at the layer's
    current margin* ``m0``; a later ``set_margin(m)`` scales them by ``m / m0``, so the
    schedule raises every class's margin in proportion."""

    def __init__(self, in_features, num_classes, margin, centers=1):
        super().__init__(in_features, num_classes, centers)
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


@MARGIN_LAYERS.register("linear")
class LinearClassifier(_ClassWeights):
    """Plain softmax classifier without bias: ``x @ W^T``."""

    def __init__(self, in_features, num_classes, **unused):
        super().__init__(in_features, num_classes)

    def forward(self, x, labels=None):
        return F.linear(x, self.weight)


def _target_mask(logits, labels):
    return F.one_hot(labels, logits.shape[1]).to(torch.bool)


@MARGIN_LAYERS.register("cosface")
class CosFace(_Margin):
    """Large-margin cosine loss (Wang et al. 2018): ``s * (cos - m)`` on the target class."""

    def __init__(self, in_features, num_classes, scale=30.0, margin=0.35, **unused):
        super().__init__(in_features, num_classes, margin)
        self.scale = scale

    def forward(self, x, labels=None):
        cos = self.cosine(x)
        if labels is not None:
            cos = torch.where(_target_mask(cos, labels), cos - self.margin_for(labels, cos.dtype), cos)
        return cos * self.scale


@MARGIN_LAYERS.register("arcface")
class ArcFace(_Margin):
    """Additive angular margin (Deng et al. 2019): ``s * cos(theta + m)`` on the target class.

    Where ``theta + m`` would exceed pi the target logit becomes ``cos - m * sin(m)``
    (keeps it monotonic), unless ``easy_margin`` is set, in which case the margin is
    applied only where ``cos > 0``.
    """

    def __init__(self, in_features, num_classes, scale=30.0, margin=0.5, easy_margin=False, centers=1, **unused):
        super().__init__(in_features, num_classes, margin, centers)
        self.scale, self.easy_margin = scale, easy_margin

    def forward(self, x, labels=None):
        cos = self.cosine(x)
        if labels is None:
            return cos * self.scale
        phi = additive_angular(cos, self.margin_for(labels, cos.dtype), self.easy_margin)
        return torch.where(_target_mask(cos, labels), phi, cos) * self.scale


@MARGIN_LAYERS.register("subcenter_arcface")
class SubCenterArcFace(ArcFace):
    """Sub-center ArcFace (Deng et al. 2020): K centers per class, the class cosine is the
    largest of its K center cosines, then ArcFace's margin. ``weight`` is [C * K, D], rows
    ``c * K ... c * K + K - 1`` belonging to class ``c``."""

    def __init__(self, in_features, num_classes, scale=30.0, margin=0.5, easy_margin=False, subcenters=3,
                 **unused):
        if subcenters < 1:
            raise ValueError(f"subcenters must be >= 1, got {subcenters}")
        super().__init__(in_features, num_classes, scale, margin, easy_margin, centers=subcenters)

    def cosine(self, x):
        cos = super().cosine(x)
        return cos.view(cos.shape[0], self.num_classes, self.centers).amax(dim=2)


@MARGIN_LAYERS.register("circle")
class CircleClassifier(_Margin):
    """Classification form of Circle loss (Sun et al. 2020).

    Target logit ``s * a_p * (cos - d_p)``, other logits ``s * a_n * (cos - d_n)`` with
    ``a_p = relu(1 + m - cos)``, ``a_n = relu(cos + m)`` (weights not back-propagated),
    ``d_p = 1 - m``, ``d_n = m``.
    """

    def __init__(self, in_features, num_classes, scale=64.0, margin=0.25, **unused):
        super().__init__(in_features, num_classes, margin)
        self.scale = scale

    def forward(self, x, labels=None):
        cos = self.cosine(x)
        if labels is None:
            return cos * self.scale
        m = self.margin
        alpha_p = (1.0 + m - cos).clamp(min=0.0).detach()
        alpha_n = (cos + m).clamp(min=0.0).detach()
        pos = alpha_p * (cos - (1.0 - m))
        neg = alpha_n * (cos - m)
        return torch.where(_target_mask(cos, labels), pos, neg) * self.scale


@MARGIN_LAYERS.register("curricularface")
class CurricularFace(_Margin):
    """CurricularFace (Huang et al. 2020); the original pymetric project called this ``arcface``.

    The target logit is ArcFace's ``cos(theta + m)`` (with the same fallback past pi - m). A
    non-target logit ``c`` harder than the target's margin-adjusted logit is re-weighted to
    ``c * (t + c)``, where ``t`` is a running mean (momentum 0.01) of the target cosines kept in
    the buffer ``t`` (state-dict key ``t``, as in the original checkpoints) and updated in
    training mode only. The re-weighting factor is not back-propagated through ``t``.
    """

    def __init__(self, in_features, num_classes, scale=30.0, margin=0.5, t_momentum=0.01, **unused):
        super().__init__(in_features, num_classes, margin)
        self.scale, self.t_momentum = scale, t_momentum
        self.register_buffer("t", torch.zeros(1))

    def forward(self, x, labels=None):
        cos = self.cosine(x).clamp(-1.0, 1.0)
        if labels is None:
            return cos * self.scale
        target = cos.gather(1, labels[:, None])
        cos_m, sin_m, threshold, fallback = _angular(self.margin_for(labels, cos.dtype))
        sin = torch.sqrt((1.0 - target * target).clamp(min=0.0))
        target_m = target * cos_m - sin * sin_m
        final_target = torch.where(target > threshold, target_m, target - fallback)
        if self.training:
            with torch.no_grad():
                self.t.mul_(1.0 - self.t_momentum).add_(self.t_momentum * target.mean())
        hard = cos > target_m
        out = torch.where(hard, cos * (self.t + cos), cos)
        out = out.scatter(1, labels[:, None], final_target.to(out.dtype))  # t is float32 under autocast
        return out * self.scale

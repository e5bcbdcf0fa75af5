"""Margin layers: embedding [N, D] (+ labels) -> training logits [N, C].

Every layer holds a class-weight matrix ``weight`` [C, D] (state-dict key
``weight``, as in the original project). Without labels each returns the plain
(scaled) similarities, so it can be called at evaluation time too; with labels
the margin is applied to the target class only.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from metric.modeling.registries import MARGIN_LAYERS


class _ClassWeights(nn.Module):
    def __init__(self, in_features, num_classes):
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.normal_(self.weight, std=0.01)

    def cosine(self, x):
        return F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))

    def extra_repr(self):
        return f"in_features={self.in_features}, num_classes={self.num_classes}"


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
class CosFace(_ClassWeights):
    """Large-margin cosine loss (Wang et al. 2018): ``s * (cos - m)`` on the target class."""

    def __init__(self, in_features, num_classes, scale=30.0, margin=0.35, **unused):
        super().__init__(in_features, num_classes)
        self.scale, self.margin = scale, margin

    def forward(self, x, labels=None):
        cos = self.cosine(x)
        if labels is not None:
            cos = torch.where(_target_mask(cos, labels), cos - self.margin, cos)
        return cos * self.scale


@MARGIN_LAYERS.register("arcface")
class ArcFace(_ClassWeights):
    """Additive angular margin (Deng et al. 2019): ``s * cos(theta + m)`` on the target class.

    Where ``theta + m`` would exceed pi the target logit becomes ``cos - m * sin(m)``
    (keeps it monotonic), unless ``easy_margin`` is set, in which case the margin is
    applied only where ``cos > 0``.
    """

    def __init__(self, in_features, num_classes, scale=30.0, margin=0.5, easy_margin=False, **unused):
        super().__init__(in_features, num_classes)
        self.scale, self.margin, self.easy_margin = scale, margin, easy_margin
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.threshold = math.cos(math.pi - margin)
        self.fallback = math.sin(math.pi - margin) * margin

    def forward(self, x, labels=None):
        cos = self.cosine(x)
        if labels is None:
            return cos * self.scale
        sin = torch.sqrt((1.0 - cos * cos).clamp(min=0.0))
        phi = cos * self.cos_m - sin * self.sin_m
        if self.easy_margin:
            phi = torch.where(cos > 0, phi, cos)
        else:
            phi = torch.where(cos > self.threshold, phi, cos - self.fallback)
        return torch.where(_target_mask(cos, labels), phi, cos) * self.scale


@MARGIN_LAYERS.register("circle")
class CircleClassifier(_ClassWeights):
    """Classification form of Circle loss (Sun et al. 2020).

    Target logit ``s * a_p * (cos - d_p)``, other logits ``s * a_n * (cos - d_n)`` with
    ``a_p = relu(1 + m - cos)``, ``a_n = relu(cos + m)`` (weights not back-propagated),
    ``d_p = 1 - m``, ``d_n = m``.
    """

    def __init__(self, in_features, num_classes, scale=64.0, margin=0.25, **unused):
        super().__init__(in_features, num_classes)
        self.scale, self.margin = scale, margin

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
class CurricularFace(_ClassWeights):
    """CurricularFace (Huang et al. 2020); the original pymetric project called this ``arcface``.

    The target logit is ArcFace's ``cos(theta + m)`` (with the same fallback past pi - m). A
    non-target logit ``c`` harder than the target's margin-adjusted logit is re-weighted to
    ``c * (t + c)``, where ``t`` is a running mean (momentum 0.01) of the target cosines kept in
    the buffer ``t`` (state-dict key ``t``, as in the original checkpoints) and updated in
    training mode only. The re-weighting factor is not back-propagated through ``t``.
    """

    def __init__(self, in_features, num_classes, scale=30.0, margin=0.5, t_momentum=0.01, **unused):
        super().__init__(in_features, num_classes)
        self.scale, self.margin, self.t_momentum = scale, margin, t_momentum
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.threshold = math.cos(math.pi - margin)
        self.fallback = math.sin(math.pi - margin) * margin
        self.register_buffer("t", torch.zeros(1))

    def forward(self, x, labels=None):
        cos = self.cosine(x).clamp(-1.0, 1.0)
        if labels is None:
            return cos * self.scale
        target = cos.gather(1, labels[:, None])
        sin = torch.sqrt((1.0 - target * target).clamp(min=0.0))
        target_m = target * self.cos_m - sin * self.sin_m
        final_target = torch.where(target > self.threshold, target_m, target - self.fallback)
        if self.training:
            with torch.no_grad():
                self.t.mul_(1.0 - self.t_momentum).add_(self.t_momentum * target.mean())
        hard = cos > target_m
        out = torch.where(hard, cos * (self.t + cos), cos)
        out = out.scatter(1, labels[:, None], final_target)
        return out * self.scale

"""DOLGHead: DOLG (Yang et al., ICCV 2021) on the backbone's stage-3 and stage-4 maps.

    f4 -> GeM -> global_fc (S4 -> S3, bias)                          = fg
    f3 -> local_branch ([multi-atrous ->] conv, BN, attention-weighted) = fl
    fo = mean over positions of (fl - (fl . fg) / |fg|^2 fg)
    [fg, fo] -> [dropout ->] embedding_layer (2 S3 -> D, bias) [-> BN]  = embedding
    embedding -> margin layer (training logits)

The head is called with the pair ``(f3, f4)`` (``uses_stages``; :class:`MetricModel` gets them
from ``backbone.forward_stages``). State-dict keys, and the authors' names they are loaded from
(:mod:`metric.checkpoint.convert`): ``pool_layer.p`` (``pool_g.p``), ``global_fc.*``
(``fc_t.*``), ``local_branch.*`` (``localmodel.*``), ``embedding_layer.*`` (``fc.*``),
``classifier.*`` (``desc_cls.*``).
"""

import torch
import torch.nn as nn

from metric.modeling.heads.linear_head import MarginHead, margin_layer_from_config
from metric.modeling.layers.dolg import LocalBranch, orthogonal_fusion
from metric.modeling.layers.pooling import GeM
from metric.modeling.registry import HEADS
from metric.utils.errors import ConfigError


@HEADS.register("DOLGHead")
class DOLGHead(MarginHead):
    uses_stages = True  # called with (stage-3 map, stage-4 map)

    def __init__(
        self,
        s3_dim,
        s4_dim,
        embedding_dim,
        num_classes,
        classifier,
        multi_atrous=False,
        gem_p=3.0,
        learn_p=True,
        bn_neck=False,
        dropout=0.0,
        bn_eps=1e-5,
        bn_mom=0.1,
    ):
        """``classifier`` is a built margin layer (see :meth:`from_config`)."""
        super().__init__()
        self.pool_layer = GeM(p=gem_p, learn_p=learn_p)
        self.global_fc = nn.Linear(s4_dim, s3_dim)
        self.local_branch = LocalBranch(s3_dim, multi_atrous, bn_eps, bn_mom)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.embedding_layer = nn.Linear(2 * s3_dim, embedding_dim)
        self.bn_neck = nn.BatchNorm1d(embedding_dim) if bn_neck else None
        self.classifier = classifier
        self.stage_channels = (s3_dim, s4_dim)
        self.in_feat, self.embedding_dim, self.num_classes = s4_dim, embedding_dim, num_classes

    def embed(self, stages):
        """``(f3 [N, S3, h3, w3], f4 [N, S4, h4, w4])`` -> embedding [N, D] (not L2-normalized)."""
        f3, f4 = stages
        fg = self.global_fc(self.pool_layer(f4))
        fo = orthogonal_fusion(self.local_branch(f3), fg)
        x = self.embedding_layer(self.dropout(torch.cat([fg, fo], dim=1)))
        return self.bn_neck(x) if self.bn_neck is not None else x

    @classmethod
    def from_config(cls, cfg, in_feat):
        """``in_feat``: the backbone's ``(stage-3, stage-4)`` channels; ``MODEL.DOLG.S3_DIM`` /
        ``S4_DIM`` must agree with them (or be 0)."""
        s3, s4 = in_feat
        for key, stage, want in (("S3_DIM", 3, s3), ("S4_DIM", 4, s4)):
            got = cfg.MODEL.DOLG[key]
            if got and got != want:
                raise ConfigError(
                    f"MODEL.DOLG.{key}={got} but the {_backbone_name(cfg)} backbone's stage-{stage} map has "
                    f"{want} channels; set MODEL.DOLG.{key} {want} (or 0 to take it from the backbone)"
                )
        h = cfg.MODEL.HEADS
        return cls(
            s3,
            s4,
            h.REDUCTION_DIM,
            h.NUM_CLASSES,
            margin_layer_from_config(cfg),
            multi_atrous=cfg.MODEL.DOLG.MULTI_ATROUS,
            gem_p=h.GEM_P,
            learn_p=h.GEM_LEARN_P,
            bn_neck=h.BN_NECK,
            dropout=h.DROPOUT,
            bn_eps=cfg.BN.EPS,
            bn_mom=cfg.BN.MOM,
        )


def _backbone_name(cfg):
    t = cfg.MODEL.TYPE
    return (
        f"timm {cfg.MODEL.TIMM.NAME}" if t == "timm" else f"{t}-{cfg.MODEL.DEPTH}" if t in ("resnet", "resnest") else t
    )

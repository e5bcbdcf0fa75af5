"""LinearHead: pooling -> embedding (Linear, optional BN neck) -> margin layer.

State-dict keys follow the original project: ``pool_layer.p`` (GeM),
``embedding_layer.weight``, ``classifier.weight`` (+ ``classifier.t`` for
CurricularFace, ``classifier.scale`` for AdaCos).
"""

import torch.nn as nn

from metric.modeling.registries import HEADS, MARGIN_LAYERS, POOL_LAYERS


@HEADS.register("LinearHead")
class LinearHead(nn.Module):
    def __init__(
        self,
        in_feat,
        embedding_dim,
        num_classes,
        pool_layer,
        classifier,
        bn_neck=False,
        dropout=0.0,
    ):
        """``pool_layer`` and ``classifier`` are built modules (see :func:`build_head`)."""
        super().__init__()
        self.pool_layer = pool_layer
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.embedding_layer = nn.Linear(in_feat, embedding_dim, bias=False)
        self.bn_neck = nn.BatchNorm1d(embedding_dim) if bn_neck else None
        self.classifier = classifier
        self.in_feat, self.embedding_dim, self.num_classes = in_feat, embedding_dim, num_classes

    def embed(self, feature_map):
        """Feature map [N, C, H, W] (or a vector [N, C] with ``identity`` pooling) -> embedding
        [N, D] (not L2-normalized)."""
        x = self.dropout(self.pool_layer(feature_map).flatten(1))
        x = self.embedding_layer(x)
        return self.bn_neck(x) if self.bn_neck is not None else x

    def forward(self, feature_map, labels=None):
        """Eval: the embedding. Train: ``(logits, embedding)``; margin layers need ``labels``."""
        emb = self.embed(feature_map)
        if not self.training:
            return emb
        return self.classifier(emb, labels), emb

    @classmethod
    def from_config(cls, cfg, in_feat):
        h = cfg.MODEL.HEADS
        pool = POOL_LAYERS.get(h.POOL_LAYER)
        pool_layer = pool(p=h.GEM_P, learn_p=h.GEM_LEARN_P) if h.POOL_LAYER == "gempool" else pool()
        classifier = MARGIN_LAYERS.get(h.CLS_LAYER)(
            h.REDUCTION_DIM, h.NUM_CLASSES, scale=h.SCALE, margin=h.MARGIN, easy_margin=h.EASY_MARGIN,
            subcenters=h.SUBCENTERS, adaptive=h.ADACOS_MODE == "adaptive",
        )
        return cls(in_feat, h.REDUCTION_DIM, h.NUM_CLASSES, pool_layer, classifier, h.BN_NECK, h.DROPOUT)

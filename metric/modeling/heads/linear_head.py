"""LinearHead: [attention ->] pooling -> embedding (Linear, optional BN neck) -> margin layer.

State-dict keys follow the original project: ``pool_layer.p`` (GeM),
``embedding_layer.weight``, ``classifier.weight`` (+ ``classifier.t`` for
CurricularFace, ``classifier.scale`` for AdaCos); an attention block
(``MODEL.HEADS.ATTENTION``, :mod:`metric.modeling.layers.attention`) sits under ``attention.*``.
"""

import torch.nn as nn

from metric.modeling.layers.partial_fc import shard_of
from metric.modeling.registry import ATTENTIONS, HEADS, MARGIN_LAYERS, POOL_LAYERS
from metric.utils import distributed as du


class MarginHead(nn.Module):
    """What every head shares: ``embed(features)`` (defined by the head) -> embedding; in eval
    mode ``forward`` returns it, in train mode ``(logits, embedding)`` from ``self.classifier``
    (margin layers need ``labels``). With ``self.partial_fc`` (a
    :class:`~metric.modeling.layers.partial_fc.PartialFC`, set by the builder) the classifier is a
    shard of the classes and train mode returns ``(cross-entropy of the global batch, embedding)``."""

    def forward(self, features, labels=None):
        emb = self.embed(features)
        if not self.training:
            return emb
        partial_fc = getattr(self, "partial_fc", None)
        if partial_fc is not None:  # model parallel: the "logits" are the cross-entropy of the global batch
            return partial_fc(self.classifier, emb, labels), emb
        return self.classifier(emb, labels), emb


@HEADS.register("LinearHead")
class LinearHead(MarginHead):
    def __init__(
        self,
        in_feat,
        embedding_dim,
        num_classes,
        pool_layer,
        classifier,
        bn_neck=False,
        dropout=0.0,
        attention=None,
    ):
        """``pool_layer``, ``classifier`` and ``attention`` (or None) are built modules (see
        :func:`build_head`); ``in_feat`` is the width after the attention block."""
        super().__init__()
        self.attention = attention  # first: the state dict follows the data flow
        self.pool_layer = pool_layer
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.embedding_layer = nn.Linear(in_feat, embedding_dim, bias=False)
        self.bn_neck = nn.BatchNorm1d(embedding_dim) if bn_neck else None
        self.classifier = classifier
        self.in_feat, self.embedding_dim, self.num_classes = in_feat, embedding_dim, num_classes

    def embed(self, feature_map):
        """Feature map [N, C, H, W] (or a vector [N, C] with ``identity`` pooling) -> embedding
        [N, D] (not L2-normalized)."""
        if self.attention is not None:
            feature_map = self.attention(feature_map)
        x = self.dropout(self.pool_layer(feature_map).flatten(1))
        x = self.embedding_layer(x)
        return self.bn_neck(x) if self.bn_neck is not None else x

    supports_attention = True  # takes MODEL.HEADS.ATTENTION

    @classmethod
    def from_config(cls, cfg, in_feat):
        """``in_feat``: the channels of the backbone's map (the attention block's input)."""
        h = cfg.MODEL.HEADS
        pool = POOL_LAYERS.get(h.POOL_LAYER)
        pool_layer = pool(p=h.GEM_P, learn_p=h.GEM_LEARN_P) if h.POOL_LAYER == "gempool" else pool()
        classifier = margin_layer_from_config(cfg)
        attention = ATTENTIONS.get(h.ATTENTION)(in_feat, bn_eps=cfg.BN.EPS, bn_mom=cfg.BN.MOM)
        width = in_feat if attention is None else attention.out_channels
        return cls(width, h.REDUCTION_DIM, h.NUM_CLASSES, pool_layer, classifier, h.BN_NECK, h.DROPOUT, attention)


def margin_layer_from_config(cfg):
    """The margin layer of ``MODEL.HEADS`` (``CLS_LAYER`` and its options), shared by the heads.
    With ``MODEL.HEADS.PARTIAL_FC.ENABLED`` it holds only this process's shard of the classes
    (:func:`~metric.modeling.layers.partial_fc.shard_of`), drawn from ``RNG_SEED`` by class."""
    h = cfg.MODEL.HEADS
    shard, init_seed = None, None
    if h.PARTIAL_FC.ENABLED:
        shard, init_seed = shard_of(h.NUM_CLASSES, du.world_size(), du.rank()), cfg.RNG_SEED
    return MARGIN_LAYERS.get(h.CLS_LAYER)(
        h.REDUCTION_DIM,
        h.NUM_CLASSES,
        scale=h.SCALE,
        margin=h.MARGIN,
        easy_margin=h.EASY_MARGIN,
        subcenters=h.SUBCENTERS,
        adaptive=h.ADACOS_MODE == "adaptive",
        shard=shard,
        init_seed=init_seed,
    )

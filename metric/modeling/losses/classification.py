"""Classification losses on margin-layer logits."""

import torch.nn as nn
import torch.nn.functional as F

from metric.modeling.registry import LOSSES


@LOSSES.register("cross_entropy")
class CrossEntropy(nn.Module):
    """Softmax cross entropy with optional label smoothing; ``forward(logits, embeddings, labels)``."""

    uses_logits = True
    cfg_key = "CE"  # its options and SCALE live under MODEL.LOSSES.CE

    def __init__(self, label_smoothing=0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits, embeddings, labels):
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    @classmethod
    def from_config(cls, cfg):
        return cls(label_smoothing=cfg.MODEL.LOSSES.LABEL_SMOOTHING)

"""MetricModel = backbone + head."""

import torch.nn as nn


class MetricModel(nn.Module):
    """``model(x)`` in eval mode returns the embedding (before L2 normalization) and needs
    no labels; ``model(x, labels)`` in train mode returns ``(logits, embedding)``.
    ``model.backbone(x)`` returns the last feature map. A head with ``uses_stages`` (DOLG) is
    given the backbone's stage-3 and stage-4 maps (``backbone.forward_stages(x)``) instead."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x, labels=None):
        if getattr(self.head, "uses_stages", False):
            return self.head(self.backbone.forward_stages(x), labels)
        return self.head(self.backbone(x), labels)

    @property
    def embedding_dim(self):
        return self.head.embedding_dim

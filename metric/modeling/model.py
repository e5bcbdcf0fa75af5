"""MetricModel = backbone + head."""

import torch.nn as nn


class MetricModel(nn.Module):
    """``model(x)`` in eval mode returns the embedding (before L2 normalization) and needs
    no labels; ``model(x, labels)`` in train mode returns ``(logits, embedding)``.
    ``model.backbone(x)`` returns the last feature map."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x, labels=None):
        return self.head(self.backbone(x), labels)

    @property
    def embedding_dim(self):
        return self.head.embedding_dim

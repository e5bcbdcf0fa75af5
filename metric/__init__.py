"""pymetric: config-driven metric learning and image retrieval in PyTorch.

The notebook API::

    import metric
    cfg = metric.load_cfg("configs/metric/demo_cpu.yaml", opts=["MODEL.HEADS.REDUCTION_DIM", 256])
    model = metric.build_model(cfg)
    metric.load_weights(model, "output/demo/checkpoints/model_epoch_0008.pyth")
    model.eval()
    emb = model(images)            # [N, D], before L2 normalization
    fmap = model.backbone(images)  # last feature map
"""

from metric.core.checkpoint import load_weights
from metric.core.config import get_cfg, load_cfg
from metric.modeling import build_model

__version__ = "0.1.0"
__all__ = ["get_cfg", "load_cfg", "build_model", "load_weights", "__version__"]

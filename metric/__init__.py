"""pymetric: config-driven metric learning and image retrieval in PyTorch.

The notebook API (details in docs/MODEL_ZOO.md, "Python API")::

    import metric
    cfg = metric.load_cfg("configs/metric/demo_cpu.yaml", opts=["MODEL.HEADS.REDUCTION_DIM", 256])
    model = metric.build_model(cfg)
    metric.load_weights(model, "output/demo/checkpoints/model_epoch_0030.pyth")
    model.eval()
    emb = model(images)            # [N, D], before L2 normalization
    fmap = model.backbone(images)  # last feature map [N, C, H/32, W/32]

``get_cfg()``
    A fresh, unfrozen copy of the defaults (every key is documented in docs/CONFIG.md).
``load_cfg(path=None, opts=None)``
    Defaults <- yaml file <- ``[KEY, VALUE, ...]`` overrides, validated and frozen. A yaml file
    without ``VERSION`` is read as an original pymetric file (its ``CLS_LAYER arcface`` is
    CurricularFace and becomes ``curricularface``). Mistakes raise ``ConfigError``.
``build_model(cfg)``
    A ``MetricModel`` (``.backbone``, ``.head``) with random weights, on the CPU, in train mode.
    In eval mode ``model(x)`` returns the embedding before L2 normalization (for a model of the
    original project exactly the output of its ``head.embedding_layer``); in train mode
    ``model(x, labels)`` returns ``(logits, embedding)``. ``model.backbone(x)`` returns the
    last feature map.
``load_weights(model, path)``
    Loads a checkpoint of ours or of the original project, a torchvision ResNet, a released
    ResNeSt, a pycls ImageNet or (for ``MODEL.TYPE timm``) a timm state dict, recognised by
    content. A classifier trained on another number of classes is skipped (logged); any other
    shape mismatch raises ``CheckpointError`` naming the key. Returns ``(missing, unexpected)``.
"""

from metric.checkpoint import load_weights
from metric.config import get_cfg, load_cfg
from metric.modeling import build_model

__version__ = "0.1.0"
__all__ = ["get_cfg", "load_cfg", "build_model", "load_weights", "__version__"]

"""CLIP's vision transformer (``MODEL.TYPE vit``), the original project's ``vit``.

``MODEL.WIDTH``, ``MODEL.LAYERS``, ``MODEL.PATCH_SIZE``, ``MODEL.EMB_DIM`` (heads = WIDTH / 64)
at ``TRAIN.IM_SIZE``: patch convolution (no bias) -> class token + learned positional embedding
-> ``ln_pre`` -> ``LAYERS`` residual attention blocks (QuickGELU MLP) -> ``ln_post`` of the class
token -> ``@ proj`` (``[WIDTH, EMB_DIM]``). The output is a vector ``[N, EMB_DIM]``
(``out_channels``), which the head takes with ``POOL_LAYER identity``.

State-dict keys are CLIP's (``conv1.weight``, ``class_embedding``, ``positional_embedding``,
``ln_pre.*``, ``transformer.resblocks.{i}.*``, ``ln_post.*``, ``proj``), so the original project's
checkpoints and CLIP / OpenCLIP image-encoder weights load by name (``backbone.`` + key).

**Any input size.** The positional embedding is made for the grid of ``TRAIN.IM_SIZE``
(``image_size // patch_size`` squared, plus the class token). For another grid (multi-scale
extraction, non-square images) its patch part is resampled bicubically over the grid (PyTorch's
``bicubic``, ``align_corners=False``, no antialiasing: OpenCLIP's ``resize_pos_embed(...,
antialias=False)``), the class token's entry kept; :meth:`adapt_state_dict` does the same to weights made at
another size when they are loaded.
A side that is not a multiple of the patch size is resized (bilinear) up to the next multiple
before the patch convolution, so nothing of the image is cropped; the config requires
``TRAIN.IM_SIZE`` and ``TEST.IM_SIZE`` to be multiples, so this happens only to the shorter side
of images whose aspect ratio is kept and to views at ``INFER.SCALES`` other than 1.
"""

import logging
import math
import re

import torch
import torch.nn as nn

from metric.modeling.layers.resize import grid_resize_matrix, resize_2d
from metric.modeling.layers.transformer import LayerNorm, Transformer, exporting
from metric.modeling.registry import BACKBONES

logger = logging.getLogger(__name__)

HEAD_WIDTH = 64  # channels per attention head: heads = width / 64, as in CLIP


class VisionTransformer(nn.Module):
    def __init__(
        self, image_size=224, patch_size=32, width=768, layers=12, emb_dim=512, heads=None, grad_checkpointing=False
    ):
        super().__init__()
        # The config check (metric/config/check.py) reports these for MODEL.* / TRAIN.IM_SIZE first.
        if heads is None:
            if width % HEAD_WIDTH:
                raise ValueError(f"width {width} is not a multiple of {HEAD_WIDTH} (heads = width / {HEAD_WIDTH})")
            heads = width // HEAD_WIDTH
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
        self.patch_size, self.width, self.layers, self.heads = patch_size, width, layers, heads
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.out_channels = emb_dim
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid[0] * self.grid[1] + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, grad_checkpointing)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, emb_dim))

    # -- forward -------------------------------------------------------------------------------

    def _fit_patches(self, x):
        """Resize ``x`` up to sides that are multiples of the patch size (a no-op when they are;
        always in the graph while traced, so an exported model takes any size)."""
        p = self.patch_size
        h, w = x.shape[-2], x.shape[-1]
        if not exporting() and h % p == 0 and w % p == 0:
            return x
        return resize_2d(x, ((h + p - 1) // p * p, (w + p - 1) // p * p), "bilinear")

    def positional_embedding_for(self, grid_h, grid_w):
        """The positional embedding ``[1 + grid_h * grid_w, width]`` for a patch grid of that size."""
        pe = self.positional_embedding
        if not exporting() and (grid_h, grid_w) == self.grid:
            return pe
        return torch.cat([pe[:1], resample_grid(pe[1:], self.grid, (grid_h, grid_w))])

    def forward(self, x):
        x = self.conv1(self._fit_patches(x))  # [N, width, gh, gw]
        grid_h, grid_w = x.shape[-2], x.shape[-1]
        x = x.flatten(2).transpose(1, 2)  # [N, gh * gw, width], row-major over the grid
        cls = self.class_embedding.to(x.dtype).reshape(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding_for(grid_h, grid_w).to(x.dtype).unsqueeze(0)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj.to(x.dtype)

    # -- training helpers ----------------------------------------------------------------------

    @property
    def grad_checkpointing(self):
        return self.transformer.grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, enable):
        self.transformer.grad_checkpointing = bool(enable)

    @property
    def num_layer_ids(self):
        """Number of distinct :meth:`layer_id` values: the embedding, ``LAYERS`` blocks, the output."""
        return self.layers + 2

    def layer_id(self, name):
        """Depth of parameter ``name`` for layer-wise learning-rate decay: 0 for the embedding
        (``conv1``, ``class_embedding``, ``positional_embedding``, ``ln_pre``), ``i + 1`` for
        ``transformer.resblocks.{i}``, ``LAYERS + 1`` for ``ln_post`` and ``proj``. ``name`` is
        relative to the backbone; a ``backbone.`` or ``module.backbone.`` prefix is ignored."""
        name = re.sub(r"^(module\.)?backbone\.", "", name)
        m = re.match(r"transformer\.resblocks\.(\d+)\.", name)
        if m:
            return int(m.group(1)) + 1
        if name.split(".")[0] in ("conv1", "class_embedding", "positional_embedding", "ln_pre"):
            return 0
        if name.split(".")[0] in ("ln_post", "proj"):
            return self.layers + 1
        raise KeyError(f"{name} is not a parameter of the ViT backbone")

    @staticmethod
    def no_weight_decay():
        """Parameter names (relative to the backbone) that are not decayed, besides norms and biases."""
        return {"class_embedding", "positional_embedding"}

    # -- weights of another size ---------------------------------------------------------------

    def adapt_state_dict(self, state, prefix="backbone.", source="weights"):
        """``state`` with its positional embedding resampled to this model's grid when it was made
        for another one (same width, another image size or patch grid; logged). Anything else
        is left for the loader to report."""
        key = prefix + "positional_embedding"
        pe = state.get(key)
        own = self.positional_embedding
        if pe is None or pe.shape == own.shape or pe.dim() != 2 or pe.shape[1] != own.shape[1]:
            return state
        side = math.isqrt(pe.shape[0] - 1)
        if side * side != pe.shape[0] - 1:
            return state  # not a square grid plus a class token: reported as a shape mismatch
        resized = torch.cat([pe[:1], resample_grid(pe[1:].float(), (side, side), self.grid)]).to(pe.dtype)
        logger.info(
            "%s: positional embedding of a %dx%d patch grid resampled (bicubic) to this model's %dx%d",
            source,
            side,
            side,
            *self.grid,
        )
        return {**state, key: resized}


def resample_grid(tokens, grid_in, grid_out):
    """Tokens ``[gh * gw, C]`` laid out row-major on ``grid_in`` resampled bicubically to ``grid_out``
    (each channel as an image; :func:`~metric.modeling.layers.resize.grid_resize_matrix`)."""
    matrix = grid_resize_matrix(grid_in, grid_out, "bicubic", device=tokens.device)
    return (matrix @ tokens.float()).to(tokens.dtype)


def build_vit(cfg):
    """CLIP's ViT from ``MODEL.WIDTH``, ``LAYERS``, ``PATCH_SIZE``, ``EMB_DIM`` at ``TRAIN.IM_SIZE``."""
    m = cfg.MODEL
    if cfg.TRAIN.CHANNELS_LAST:
        logger.info(
            "TRAIN.CHANNELS_LAST has no effect on MODEL.TYPE vit (one patch convolution, then matrix products): ignored"
        )
    return VisionTransformer(
        cfg.TRAIN.IM_SIZE, m.PATCH_SIZE, m.WIDTH, m.LAYERS, m.EMB_DIM, grad_checkpointing=m.VIT.GRAD_CHECKPOINT
    )


BACKBONES.register("vit")(build_vit)

"""The transformer pieces of CLIP's image encoder, with CLIP's module and state-dict names.

``ResidualAttentionBlock``: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))`` with the MLP
``c_fc`` (``width -> 4 width``) -> QuickGELU -> ``c_proj``. Keys: ``ln_1.*``,
``attn.in_proj_weight``, ``attn.in_proj_bias``, ``attn.out_proj.{weight,bias}``, ``ln_2.*``,
``mlp.c_fc.*``, ``mlp.c_proj.*`` (those of ``nn.MultiheadAttention`` and of CLIP / OpenCLIP).

The attention is written out (one input projection, ``F.scaled_dot_product_attention``, output
projection) instead of calling ``nn.MultiheadAttention``, whose inference fast path is a fused
kernel that neither ``FlopCounterMode`` nor the ONNX exporter sees into. While a model is traced
for ONNX the attention is spelled as ``softmax(q k^T / sqrt(d)) v`` (any opset, any runtime).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def exporting():
    """True while the model is traced (``torch.jit.trace``, ``torch.onnx.export``)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input and weight dtypes (mixed precision, fp16
    weights), returned in the input's dtype (CLIP's ``LayerNorm``)."""

    def forward(self, x):
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            y = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return y.to(x.dtype)


class QuickGELU(nn.Module):
    """CLIP's GELU approximation ``x * sigmoid(1.702 x)``."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention on ``[N, L, width]`` with ``nn.MultiheadAttention``'s parameters
    and initialization (``in_proj_weight`` Xavier-uniform, biases zero)."""

    def __init__(self, width, heads):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, width // heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x):
        n, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.reshape(n, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if exporting():
            attn = torch.softmax((q * (1.0 / math.sqrt(self.head_dim))) @ k.transpose(-2, -1), dim=-1)
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads, mlp_ratio=4.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """``layers`` residual attention blocks (``resblocks.{i}``). With ``grad_checkpointing``, each
    block's activations are recomputed in the backward pass instead of stored (training only)."""

    def __init__(self, width, layers, heads, grad_checkpointing=False):
        super().__init__()
        self.width, self.layers = width, layers
        self.grad_checkpointing = grad_checkpointing
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x):
        checkpointed = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.resblocks:
            x = checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
        return x

"""Resizing as matrix products: PyTorch's ``F.interpolate`` (``bilinear`` / ``bicubic``,
``align_corners=False``, no antialiasing) written as ``R_h @ x @ R_w^T``.

Why not ``F.interpolate`` itself: the matrices are built from the sizes with elementwise ops
(``arange``, ``floor``, ``clamp``, comparisons), so a model traced for ONNX with dynamic height
and width keeps working at every size, and the exported graph holds only MatMul and elementwise
nodes, which leave no room for a runtime's own choice of cubic coefficient (-0.75 in PyTorch and
OpenCV, -0.5 in TensorFlow) or pixel-centre convention. The results equal ``F.interpolate`` up to
float rounding (checked by the tests).
"""

import torch

CUBIC_A = -0.75  # PyTorch's (and OpenCV's) bicubic coefficient


def _cubic_weights(t):
    """The four bicubic weights of source rows ``floor(s) - 1 .. floor(s) + 2`` at fraction ``t``."""
    a = CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=-1)


def resize_matrix(n_in, n_out, mode="bilinear", dtype=torch.float32, device=None):
    """``[n_out, n_in]`` matrix ``R`` with ``R @ v`` = ``F.interpolate`` of ``v`` (along one axis)
    from ``n_in`` to ``n_out`` samples (``mode``: ``bilinear`` or ``bicubic``). ``n_out`` may be
    a traced size. Source positions outside the input are clamped to its border, as PyTorch does."""
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"mode must be bilinear or bicubic, got {mode!r}")
    cubic = mode == "bicubic"
    # Sizes may be 0-dim tensors (traced for ONNX): only tensor arithmetic on them, no float().
    scale = n_in / n_out
    dst = torch.arange(n_out, device=device).to(torch.float32)
    src = (dst + 0.5) * scale - 0.5
    if not cubic:
        src = src.clamp(min=0.0)
    first = src.floor()
    t = src - first
    if cubic:
        weights, offsets = _cubic_weights(t), torch.arange(-1, 3, device=device)
    else:
        weights, offsets = torch.stack([1 - t, t], dim=-1), torch.arange(0, 2, device=device)
    index = (first.to(torch.int64)[:, None] + offsets[None, :]).clamp(min=0)  # [n_out, taps]
    last = n_in - 1  # a 0-dim tensor while traced
    index = torch.minimum(index, last) if torch.is_tensor(last) else index.clamp(max=last)
    onehot = (index[..., None] == torch.arange(n_in, device=device)[None, None, :]).to(torch.float32)
    return (weights[..., None] * onehot).sum(1).to(dtype)


def resize_2d(x, size, mode="bilinear"):
    """``x`` ``[..., H, W]`` resized to ``size = (h, w)`` with :func:`resize_matrix` on both axes
    (computed in float32, returned in ``x``'s dtype)."""
    h_in, w_in = x.shape[-2], x.shape[-1]
    rows = resize_matrix(h_in, size[0], mode, device=x.device)
    cols = resize_matrix(w_in, size[1], mode, device=x.device)
    return (rows @ x.float() @ cols.t()).to(x.dtype)


def grid_resize_matrix(grid_in, grid_out, mode="bicubic", device=None):
    """``[h1 * w1, h0 * w0]`` matrix that resizes values laid out row-major on the grid
    ``grid_in = (h0, w0)`` to ``grid_out = (h1, w1)``: the Kronecker product of the two axes'
    :func:`resize_matrix`, built with 2-d operations only (gathers and a product)."""
    (h0, w0), (h1, w1) = grid_in, grid_out
    rows = resize_matrix(h0, h1, mode, device=device)  # [h1, h0]
    cols = resize_matrix(w0, w1, mode, device=device)  # [w1, w0]
    dst = torch.arange(h1 * w1, device=device)
    src = torch.arange(h0 * w0, device=device)
    r = rows.index_select(0, dst // w1).index_select(1, src // w0)
    c = cols.index_select(0, dst % w1).index_select(1, src % w0)
    return r * c

"""FLOPs, parameters and activations of a model, measured by running it once.

FLOPs come from :class:`torch.utils.flop_counter.FlopCounterMode` (convolutions,
matrix products; 2 FLOPs per multiply-add, elementwise ops not counted), so no
layer needs a hand-written formula. ``macs`` (multiply-adds) is half of it: the
number that ResNet/pycls tables call "FLOPs" (ResNet-50: 4.1 G). Activations are
counted as pycls does: the output elements of every convolution and linear layer
(forward hooks). The forward is one image of ``im_size`` x ``im_size`` in eval mode
under ``no_grad`` on the model's device; the model's mode, its BN statistics and the
RNG state are left as they were.
"""

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

_ACT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _count_cpu_attention():
    """``FlopCounterMode`` counts the CUDA kernels of ``F.scaled_dot_product_attention`` but not
    the CPU one (torch 2.x): give it the same formula (the two matrix products of attention)."""
    from torch.utils import flop_counter

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


_count_cpu_attention()


def model_complexity(model, im_size):
    """``{"flops", "macs", "params", "backbone_params", "activations"}`` of ``model`` on one
    ``3 x im_size x im_size`` image (``params`` counts every parameter, the classifier too)."""
    model = getattr(model, "module", model)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    acts = [0]

    def count(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            acts[0] += output.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, _ACT_LAYERS)]
    was_training = model.training
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices), torch.no_grad():
            model.eval()
            counter = FlopCounterMode(display=False)
            with counter:
                model(torch.zeros(1, 3, im_size, im_size, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    flops = int(counter.get_total_flops())
    backbone = getattr(model, "backbone", None)
    return {
        "flops": flops,
        "macs": flops // 2,
        "params": sum(p.numel() for p in model.parameters()),
        "backbone_params": sum(p.numel() for p in backbone.parameters()) if backbone is not None else None,
        "activations": acts[0],
    }


def si_units(n):
    """``8.18 G``, ``25.56 M``, ``604.16 k``."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n}"


def format_complexity(c):
    """One line, e.g. ``FLOPs 8.18 G (4.09 G multiply-adds), params 25.56 M, activations 11.11 M``."""
    return (
        f"FLOPs {si_units(c['flops'])} ({si_units(c['macs'])} multiply-adds), params {si_units(c['params'])}, "
        f"activations {si_units(c['activations'])}"
    )

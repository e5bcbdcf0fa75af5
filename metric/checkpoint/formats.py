"""Weight files that are not ``torch.save`` pickles, recognised by their first bytes.

- **safetensors** (``.safetensors``, e.g. OpenCLIP's ``open_clip_model.safetensors``): read with
  the ``safetensors`` package (no code in the format); without the package, a one-line error
  saying to install it.
- **TorchScript archives** (OpenAI's released CLIP files, ``ViT-B-32.pt``): refused with a
  one-line error that says how to convert one to a state dict. Loading such an archive
  (``torch.jit.load``) runs the code it contains, and ``torch.load(weights_only=True)`` cannot
  read it.
"""

import struct
import zipfile

from metric.utils.errors import CheckpointError

_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024


def sniff(f):
    """``"safetensors"``, ``"torchscript"`` or None for the open binary file ``f`` (seekable; its
    position is put back to the start)."""
    if not getattr(f, "seekable", lambda: False)():
        return None
    head = f.read(9)
    f.seek(0)
    if len(head) == 9 and head[8:9] == b"{":
        (size,) = struct.unpack("<Q", head[:8])
        if 2 <= size <= _SAFETENSORS_MAX_HEADER:
            return "safetensors"
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(f) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            names = []
        f.seek(0)
        if any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in names):
            return "torchscript"
    return None


def torchscript_error(path):
    return CheckpointError(
        f"{path} is a TorchScript archive (as OpenAI's released CLIP .pt files are), not a state dict, and loading "
        'one runs the code inside it; convert it once where you trust the file: python -c "import torch; '
        f"torch.save(torch.jit.load('{path}', map_location='cpu').state_dict(), 'clip_state_dict.pth')\" and load "
        "clip_state_dict.pth (see docs/MODEL_ZOO.md, CLIP weights)"
    )


def read_safetensors(f, path):
    """The dict of tensors of a safetensors file (open binary file ``f``)."""
    try:
        from safetensors.torch import load
    except ImportError:
        raise CheckpointError(
            f"{path} is a safetensors file: reading it needs the package safetensors (pip install safetensors)"
        ) from None
    try:
        return load(f.read())
    except Exception as err:  # safetensors raises SafetensorError, ValueError, ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"cannot read safetensors file {path}: {first}") from None


def read_foreign(f, path):
    """The content of a non-pickle weight file, or None when ``f`` is a ``torch.save`` file."""
    kind = sniff(f)
    if kind == "torchscript":
        raise torchscript_error(path)
    if kind == "safetensors":
        return read_safetensors(f, path)
    return None

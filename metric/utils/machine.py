"""What this machine has: its memory (the cgroup limit where one is set), a GPU's memory and the
CPU cores this process may use; and bytes as text. The memory estimates of
:mod:`metric.engine.memory_estimates` are checked against these."""

import os

import torch


def format_bytes(n):
    """``205 GB``, ``25.3 GB``, ``410 MB`` (decimal units)."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v >= 100 else f"{v:.1f} {unit}"
    return f"{n / 1e6:.2f} MB"


# ---------------------------------------------------------------------------------- machine


def _cgroup_limit():
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path, encoding="ascii") as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None


def machine_memory():
    """Bytes of memory of this machine (or of its container), or None if unknown."""
    total = None
    try:
        import psutil

        total = int(psutil.virtual_memory().total)
    except ImportError:
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemTotal:"):
                        total = int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
        if total is None:
            try:
                total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            except (ValueError, OSError, AttributeError):
                total = None
    limit = _cgroup_limit()
    if limit is not None and (total is None or limit < total):
        total = limit
    return total


def gpu_memory(device):
    """Total bytes of memory of CUDA ``device``."""

    return int(torch.cuda.get_device_properties(device).total_memory)


def cpu_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1

"""Render docs/CONFIG.md from the comments in metric/config/defaults.py."""

import re

import metric.config.defaults as config_mod
from metric.config.merge import get_cfg

_HEADER = """# Config reference

Generated from the comments in `metric/config/defaults.py` by `python tools/gen_config_doc.py`;
do not edit by hand. Set keys in a yaml file (`--cfg FILE`, which may inherit from others
with `_BASE_: other.yaml`) or on the command line as `KEY VALUE` pairs after it. Unknown
keys, wrong types and values outside the allowed set stop the tool with a one-line error.
"""


def _sections():
    """[(section title, [(key, default, comment)])] in file order."""
    lines = open(config_mod.__file__, encoding="utf-8").read().splitlines()
    sections, current, block = [], None, []
    defaults = get_cfg()
    for i, line in enumerate(lines):
        if line.startswith("# The machinery, re-exported"):
            break
        if line.startswith("# ---"):
            block = []
            continue
        if line.startswith("# ") and i > 0 and lines[i - 1].startswith("# ---"):
            current = (line[2:].strip(), [])
            sections.append(current)
            block = []
            continue
        if line.startswith("#"):
            block.append(line.lstrip("#").strip())
            continue
        m = re.match(r"_C\.([A-Z0-9_.]+) = ", line)
        if m:
            key = m.group(1)
            node = defaults
            for part in key.split("."):
                node = node[part]
            if not isinstance(node, type(defaults)):
                sections[-1][1].append((key, node, " ".join(block)))
        if not line.strip() or m:
            block = []
    return sections


def render_config_doc():
    out = [_HEADER]
    for title, keys in _sections():
        if not keys:
            continue
        out.append(f"\n## {title}\n\n| key | default | meaning and allowed values |\n|---|---|---|")
        for key, default, comment in keys:
            shown = repr(default) if isinstance(default, str) else str(default)
            out.append(f"| `{key}` | `{shown}` | {comment.replace('|', chr(92) + '|')} |")
    return "\n".join(out) + "\n"

"""The global config: defaults (every key documented), merging, validation and the doc generator.

``metric.config`` is the one import point: :func:`get_cfg`, :func:`load_cfg`, :func:`dump_cfg`
and friends. The keys and their comments live in :mod:`metric.config.defaults`; loading and
merging in :mod:`metric.config.merge`; allowed values and cross-key rules in
:mod:`metric.config.check`; ``docs/CONFIG.md`` is rendered by :mod:`metric.config.doc`.
"""

from metric.config.check import RESNEST_DEPTHS, RESNET_DEPTHS, register_name_source, validate  # noqa: F401
from metric.config.defaults import CURRENT_VERSION, cfg  # noqa: F401
from metric.config.merge import (  # noqa: F401
    all_keys,
    dump_cfg,
    get_cfg,
    load_cfg,
    merge_from_file,
    merge_from_list,
    upgrade_original,
)

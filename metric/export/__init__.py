"""Export: PyTorch -> ONNX (:mod:`.onnx`) -> TensorFlow SavedModel / TFLite (:mod:`.tensorflow`),
and the Kaggle Landmark Retrieval 2020 submission model (:mod:`.kaggle`). See docs/EXPORT.md.

The submodules are imported explicitly (``from metric.export.onnx import export_onnx``);
:mod:`.tensorflow` and :mod:`.kaggle` also run as worker scripts inside ``.venv-tf``.
"""

from metric.utils.cli import make_parser


def parse_tool_args(description, add_flags, argv=None, config=True, required=()):
    """Parse a tool's command line: :func:`metric.utils.cli.make_parser` plus the flags that
    ``add_flags(parser)`` adds (options may follow the ``KEY VALUE`` overrides). ``required``
    names flags (by dest) that must be given."""
    parser = make_parser(description, config=config)
    add_flags(parser)
    args = parser.parse_args(argv)
    missing = [f"--{name.replace('_', '-')}" for name in required if getattr(args, name, None) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    return args

"""Checkpoints and weights: file I/O (:mod:`.io`), loading into a model (:mod:`.load`), the
training state assembled and restored (:mod:`.checkpointer`) and the recognition and key mapping
of foreign weight files (:mod:`.convert`)."""

from metric.checkpoint.checkpointer import Checkpointer  # noqa: F401
from metric.checkpoint.files import (  # noqa: F401
    CHECKPOINT_VERSION,
    best_checkpoint_path,
    check_resumable,
    checkpoint_dir,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
    save_checkpoint,
    state_checksum,
    verify_checkpoint,
)
from metric.checkpoint.load import (  # noqa: F401
    CLASSIFIER_PREFIX,
    config_differences,
    load_for_resume,
    load_inference_weights,
    load_state,
    load_weights,
    model_state_of,
    select_weights,
    unwrap,
    weights_digest,
)

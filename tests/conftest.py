"""pytest fixtures shared by the tests. The plain helpers (tiny data set, tiny model options,
running the tools, ...) are in ``tests/helpers.py``: import them from there, not from here.

Markers (setup.cfg): ``slow`` end-to-end tests (training, subprocesses, export); ``dist`` tests that
start several processes (gloo process groups, torchrun); ``export`` ONNX / TensorFlow export;
``tf`` tests that need the TensorFlow environment ``.venv-tf``. ``make test-fast`` runs
``-m "not slow and not tf"``."""

import os

# One CPU thread per process, as run_py gives the subprocesses (unless the caller set
# OMP_NUM_THREADS): the tests' tiny models gain nothing from more, and on a busy machine every op
# of a multi-threaded process waits for its slowest thread (at load 3 on 2 cores the fast tier
# took 450 s with torch's default of 2 threads, 65 s with 1). Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import write_tiny_dataset  # noqa: E402

_THREADS = os.environ["OMP_NUM_THREADS"]
torch.set_num_threads(int(_THREADS) if _THREADS.isdigit() and int(_THREADS) > 0 else 1)  # if torch came first


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return write_tiny_dataset(str(tmp_path_factory.mktemp("tiny_data")))


# Multi-process tests in files that another refactor keeps unchanged for now (they are its
# regression net): their `dist` marker is added here. Move it to a decorator on the test when
# those files are next edited, and drop the entry.
_DIST_TESTS = {
    ("test_trainer.py", "test_two_process_training_keeps_ranks_identical"),
    ("test_steer.py", "test_two_processes_keep_identical_ema"),
    ("test_finetune_recipe.py", "test_two_processes_freeze_then_train_the_backbone_and_stay_identical"),
    ("test_partial_fc.py", "test_two_gloo_processes_equal_the_full_classifier"),
    ("test_partial_fc.py", "test_partial_fc_demo_learns_resumes_elsewhere_and_refuses_another_class_count"),
    ("test_partial_fc.py", "test_partial_fc_resume_after_a_checkpoint_equals_the_uninterrupted_run"),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = getattr(item, "originalname", item.name)
        if (item.path.name, name) in _DIST_TESTS:
            item.add_marker(pytest.mark.dist)
        if "tf_env" in getattr(item, "fixturenames", ()) and item.get_closest_marker("tf") is None:
            raise pytest.UsageError(
                f"{item.nodeid} uses the TensorFlow environment (tf_env): mark it "
                "@pytest.mark.tf so that `make test-fast` leaves it out"
            )

"""benchmarks/gpu_smoke.py on a machine without a GPU (the CUDA paths themselves run only where
one is: `python benchmarks/gpu_smoke.py`), and the formatting of its per-path lines."""

import importlib.util
import os

from tests.helpers import REPO, run_py


def _smoke_module():
    spec = importlib.util.spec_from_file_location("gpu_smoke", os.path.join(REPO, "benchmarks", "gpu_smoke.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0():
    proc = run_py(["benchmarks/gpu_smoke.py"], env={"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_smoke: no CUDA device") and "nothing to check" in lines[0]


def test_one_line_per_path_and_the_counts():
    smoke = _smoke_module()

    def skipped():
        raise smoke.Skipped("one GPU (needs 2)")

    def fails():
        raise ValueError("first line\nsecond line")

    def fails_long():
        raise RuntimeError("x" * 1000)

    def child_failed():
        raise smoke.PathFailed("DistributedError: rank 0: timed out (log: /w/logs/p.log)")

    printed = []
    counts = smoke.run_paths(
        [
            ("a", lambda: "detail"),
            ("b", lambda: None),
            ("c", skipped),
            ("d", fails),
            ("e", fails_long),
            ("f", child_failed),
        ],
        out=printed.append,
    )
    assert counts == {"ok": 2, "failed": 3, "skipped": 1}
    assert len(printed) == 6 and all("\n" not in line for line in printed)
    assert printed[0].startswith("a: ok (") and printed[0].endswith(" s; detail)")
    assert printed[1].startswith("b: ok (") and printed[1].endswith(" s)")
    assert printed[2] == "c: skipped (one GPU (needs 2))"
    assert printed[3] == "d: FAILED ValueError: first line"
    assert printed[4].startswith("e: FAILED RuntimeError: xxx") and len(printed[4]) == len("e: FAILED ") + 300
    assert printed[5] == "f: FAILED DistributedError: rank 0: timed out (log: /w/logs/p.log)"


def test_every_path_has_a_function_and_a_time_limit():
    smoke = _smoke_module()
    assert {
        "amp_fp16_scaler",
        "amp_bf16",
        "channels_last",
        "compile",
        "nccl_1_process",
        "nccl_ddp_2_processes",
        "extract_gpu",
        "search_torch_gpu",
        "search_faiss_gpu",
        "partial_fc_1_process",
        "partial_fc_nccl_2_processes",
    } == set(smoke.PATHS)
    assert all(callable(fn) and 0 < limit <= 300 for fn, limit in smoke.PATHS.values())

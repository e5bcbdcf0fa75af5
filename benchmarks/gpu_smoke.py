"""GPU smoke check: run every CUDA path of pymetric once, on a tiny model and a tiny generated data
set, and print one line per path: ok, skipped (why), or FAILED and the error.

    python benchmarks/gpu_smoke.py [--only NAME,NAME] [--keep DIR]

Paths: training with AMP fp16 (the grad scaler) and with bf16, channels_last, TRAIN.COMPILE,
an nccl process group in 1 process (DDP step and metric.utils.distributed collectives) and
training with nccl DDP in N = min(2, GPUs) processes, feature extraction on the GPU (checked
against the CPU), torch and faiss search on the GPU (checked against the CPU), and Partial FC in one
process and on nccl with 2 processes. Each path runs in its own process (a CUDA error or a crash
cannot spoil the next one) through the project's own entry points (``train_model``,
``extract_features``, ``search``); each has a time limit. Meant to take under 5 minutes on one
GPU (a few training steps per path; TRAIN.COMPILE takes the longest).

Without a CUDA device it prints one line saying so and exits 0. The last line is a key=value
summary (``ok=.. failed=.. skipped=.. seconds=..``); the exit status is 1 if any path failed.
``--cpu`` runs the same paths on the CPU (gloo instead of nccl, AMP ignored, faiss on CPU
skipped): it checks this script, not CUDA. Not a test: the test suite only checks the no-GPU line.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

RESULT_MARK = "GPU_SMOKE_RESULT "
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Skipped(Exception):
    """A path that cannot run here (e.g. one GPU for a 2-process path); the message says why."""


class PathFailed(Exception):
    """A path's error, already as one line (from the child process that ran it)."""


def one_line(err):
    """``Type: first line of the message`` of an exception (a :class:`PathFailed`: its message),
    at most 300 characters."""
    text = str(err).strip()
    if isinstance(err, PathFailed):
        line = text.splitlines()[0] if text else "failed"
    else:
        line = f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _print(line):
    print(line, flush=True)


def run_paths(paths, out=_print):
    """Run ``paths`` (``[(name, fn)]``; ``fn()`` returns a detail string or None, raises
    :class:`Skipped` or any error) one after the other; print one line each and return
    ``{"ok": n, "failed": n, "skipped": n}``."""
    counts = {"ok": 0, "failed": 0, "skipped": 0}
    for name, fn in paths:
        start = time.monotonic()
        try:
            detail = fn()
        except Skipped as why:
            counts["skipped"] += 1
            out(f"{name}: skipped ({why})")
            continue
        except Exception as err:  # every failure is reported, then the next path runs
            counts["failed"] += 1
            out(f"{name}: FAILED {one_line(err)}")
            continue
        counts["ok"] += 1
        seconds = time.monotonic() - start
        out(f"{name}: ok ({seconds:.1f} s{'; ' + detail if detail else ''})")
    return counts


# --- the paths (each runs in a child process: `--child NAME`) ------------------------------------


def _device_count(cpu):
    import torch

    return 2 if cpu else torch.cuda.device_count()


def _opts(data, out, cpu, **extra):
    """Config overrides: a ResNet-18 of width 8 (the tests' tiny model), 1 epoch of 2 steps on the
    generated data, no evaluation unless asked."""
    opts = {
        "MODEL.TYPE": "resnet",
        "MODEL.DEPTH": 18,
        "RESNET.WIDTH_PER_GROUP": 8,
        "RESNET.STEM_WIDTH": 8,
        "MODEL.HEADS.IN_FEAT": 0,
        "MODEL.HEADS.REDUCTION_DIM": 16,
        "MODEL.HEADS.NUM_CLASSES": 8,
        "MODEL.HEADS.POOL_LAYER": "gempool",
        "MODEL.HEADS.CLS_LAYER": "arcface",
        "DATA_DIR": os.path.dirname(data),
        "TRAIN.DATASET": os.path.basename(data),
        "TRAIN.SPLIT": "train_list.txt",
        "TRAIN.BATCH_SIZE": 16,
        "TRAIN.IM_SIZE": 32,
        "TEST.DATASET": "",
        "TEST.SPLIT": "test_list.txt",
        "TEST.BATCH_SIZE": 16,
        "TEST.IM_SIZE": 40,
        "OPTIM.BASE_LR": 0.01,
        "OPTIM.MAX_EPOCH": 1,
        "DATA_LOADER.NUM_WORKERS": 0,
        "LOG_PERIOD": 1,
        "LOG.TENSORBOARD": False,
        "OUT_DIR": out,
        "DIST.TIMEOUT_S": 120,
    }
    if cpu:
        opts["DIST.ALLOW_OVERSUBSCRIBE"] = True
    opts.update(extra)
    flat = []
    for k, v in opts.items():
        flat += [k, str(v)]
    return flat


def _train(data, work, cpu, name, **extra):
    """Train with ``extra``; check the run finished with finite losses; returns (cfg, stats path)."""
    import math

    from metric.config import load_cfg
    from metric.engine.trainer import train_model
    from metric.utils.logger import read_stats

    out = os.path.join(work, name)
    cfg = load_cfg(None, _opts(data, out, cpu, **extra))
    train_model(cfg)
    stats = os.path.join(out, "stats.jsonl")
    iters, final = read_stats(stats, "train_iter"), read_stats(stats, "final")
    if not iters or not final:
        raise RuntimeError(f"training wrote no train_iter or final record to {stats}")
    losses = [r["loss"] for r in iters]
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"non-finite training loss: {losses}")
    return cfg, stats, final[-1]


def _log_lines_with(out_dir, text):
    with open(os.path.join(out_dir, "log.txt")) as f:
        return [line.strip() for line in f if text in line]


def path_train_fp16(data, work, cpu):
    from metric.checkpoint import list_checkpoints, read_checkpoint

    cfg, _, _ = _train(
        data, work, cpu, "fp16", **{"TRAIN.MIXED_PRECISION": "fp16", "TEST.DATASET": os.path.basename(data)}
    )
    scaler = read_checkpoint(list_checkpoints(cfg.OUT_DIR)[-1]).get("scaler_state") or {}
    if not cpu and "scale" not in scaler:
        raise RuntimeError(f"the checkpoint has no grad scaler state (scaler_state={scaler})")
    return f"grad scale {scaler['scale']:g}, with evaluation" if "scale" in scaler else "with evaluation"


def path_train_bf16(data, work, cpu):
    import torch

    if not cpu and not torch.cuda.is_bf16_supported():
        raise Skipped("this GPU has no bf16")
    _train(data, work, cpu, "bf16", **{"TRAIN.MIXED_PRECISION": "bf16"})


def path_channels_last(data, work, cpu):
    amp = "bf16" if cpu or _bf16() else "fp16"
    _train(data, work, cpu, "channels_last", **{"TRAIN.CHANNELS_LAST": True, "TRAIN.MIXED_PRECISION": amp})
    return f"with {amp}"


def _bf16():
    import torch

    return torch.cuda.is_bf16_supported()


def path_compile(data, work, cpu):
    cfg, _, _ = _train(data, work, cpu, "compile", **{"TRAIN.COMPILE": True})
    fallback = _log_lines_with(cfg.OUT_DIR, "torch.compile is not usable")
    if fallback:  # training went on eagerly: the compile path itself did not work
        raise RuntimeError(fallback[0][-300:])


def path_nccl_one_process(data, work, cpu):
    """A 1-process group with the backend of this machine: a DDP step and our collectives."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import metric.utils.distributed as du
    from metric.config import load_cfg
    from metric.modeling import build_model

    device = torch.device("cpu" if cpu else "cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
    du._join_group("gloo" if cpu else "nccl", device, 0, 1, 120)  # what init_process does for world > 1
    try:
        model = build_model(load_cfg(None, _opts(data, work, cpu))).to(device)
        ddp = DistributedDataParallel(model, device_ids=None if cpu else [device.index])
        x, y = torch.randn(4, 3, 32, 32, device=device), torch.arange(4, device=device)
        logits, emb = ddp(x, y)
        torch.nn.functional.cross_entropy(logits, y).backward()
        total = du.all_reduce_sum(torch.ones(3, device=device))
        rows = du.all_gather_rows(torch.ones(2, 5, device=device))
        objs = du.all_gather_objects({"rank": 0})
        du.barrier()
        if total.tolist() != [1.0, 1.0, 1.0] or tuple(rows.shape) != (2, 5) or objs != [{"rank": 0}]:
            raise RuntimeError(f"collectives gave {total.tolist()}, {tuple(rows.shape)}, {objs}")
        return f"backend {dist.get_backend()}"
    finally:
        du.cleanup()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(cpu):
    n = min(2, _device_count(cpu))
    if n < 2:
        raise Skipped("one GPU (needs 2)")
    return n


def path_ddp(data, work, cpu):
    n = _two_processes(cpu)
    _, _, final = _train(
        data,
        work,
        cpu,
        "ddp",
        **{"NUM_GPUS": n, "HOST": "127.0.0.1", "PORT": _free_port(), "TEST.DATASET": os.path.basename(data)},
    )
    digests = final.get("weights_digests", [])
    if len(digests) != n or len(set(digests)) != 1:
        raise RuntimeError(f"the {n} processes ended with different weights: {digests}")
    return f"{n} processes"


def path_extract(data, work, cpu):
    import numpy as np
    import torch

    from metric.config import load_cfg
    from metric.engine.extract import extract_features, list_images
    from metric.engine.predictor import Predictor
    from metric.modeling import build_model
    from metric.retrieval.store import load_features

    opts = _opts(data, work, cpu)
    torch.manual_seed(0)
    weights = os.path.join(work, "extract_weights.pth")
    torch.save(build_model(load_cfg(None, opts)).state_dict(), weights)
    src = os.path.join(data, "index_list.txt")
    worst = {}
    for amp in ("none", "fp16"):
        cfg = load_cfg(
            None,
            opts
            + [
                "TEST.WEIGHTS",
                weights,
                "INFER.INPUT",
                src,
                "INFER.SCALES",
                "[0.75, 1.0]",
                "INFER.FLIP",
                "True",
                "INFER.MIXED_PRECISION",
                amp,
                "INFER.OUTPUT",
                os.path.join(work, f"store_{amp}"),
            ],
        )
        store = load_features(extract_features(cfg, progress=False))
        items = list_images(src)
        cpu_predictor = Predictor.from_cfg(cfg, device="cpu", amp_mode="none")
        ref, ok, _ = cpu_predictor.run(cpu_predictor.loader([p for _, p in items], 8))
        if list(store.ids) != [items[i][0] for i in ok]:
            raise RuntimeError("the store's ids differ from the CPU run's")
        cos = (np.asarray(store.embeddings, np.float32) * ref).sum(1)
        worst[amp] = float(cos.min())
        if worst[amp] < (0.999 if amp == "none" else 0.99):
            raise RuntimeError(f"INFER.MIXED_PRECISION {amp}: GPU and CPU descriptors differ (cosine {worst[amp]:.4f})")
    return f"{len(store.ids)} images, cosine to CPU >= {worst['none']:.5f} (fp32), {worst['fp16']:.4f} (fp16)"


def _vectors(seed, n, d):
    import numpy as np

    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _compare_search(backend, device):
    import numpy as np

    from metric.retrieval.search import search

    q, x = _vectors(1, 300, 64), _vectors(2, 20000, 64)
    s_ref, i_ref = search(q, x, 10, backend="torch", device="cpu")
    s, i = search(q, x, 10, backend=backend, device=device, chunk_size=7000)
    same = float((i == i_ref).mean())
    if same < 0.999 or not np.allclose(s, s_ref, atol=1e-4):
        raise RuntimeError(
            f"{backend} search differs from the CPU: {same:.4f} of the indices equal, max score "
            f"difference {float(np.abs(s - s_ref).max()):.2e}"
        )
    return "300 x 20000 top-10 equal to the CPU's"


def path_search_torch(data, work, cpu):
    return _compare_search("torch", "cpu" if cpu else "cuda")


def path_search_faiss(data, work, cpu):
    from metric.retrieval.search import faiss_num_gpus

    try:
        import faiss  # noqa: F401
    except ImportError:
        raise Skipped("faiss is not installed") from None
    if faiss_num_gpus() == 0:
        raise Skipped("this faiss has no GPU support (faiss-cpu); pip install faiss-gpu to check it")
    return _compare_search("faiss", None)


def path_partial_fc_one(data, work, cpu):
    _train(
        data,
        work,
        cpu,
        "partial_fc_1",
        **{"MODEL.HEADS.PARTIAL_FC.ENABLED": True, "MODEL.HEADS.PARTIAL_FC.SAMPLE_RATE": 0.5},
    )


def path_partial_fc_nccl(data, work, cpu):
    n = _two_processes(cpu)
    _, _, final = _train(
        data,
        work,
        cpu,
        "partial_fc_2",
        **{
            "MODEL.HEADS.PARTIAL_FC.ENABLED": True,
            "MODEL.HEADS.PARTIAL_FC.SAMPLE_RATE": 0.5,
            "NUM_GPUS": n,
            "HOST": "127.0.0.1",
            "PORT": _free_port(),
            "TRAIN.MIXED_PRECISION": "bf16" if cpu or _bf16() else "none",
        },
    )
    return f"{n} processes"


PATHS = {
    "amp_fp16_scaler": (path_train_fp16, 120),
    "amp_bf16": (path_train_bf16, 120),
    "channels_last": (path_channels_last, 120),
    "compile": (path_compile, 240),
    "nccl_1_process": (path_nccl_one_process, 120),
    "nccl_ddp_2_processes": (path_ddp, 180),
    "extract_gpu": (path_extract, 120),
    "search_torch_gpu": (path_search_torch, 120),
    "search_faiss_gpu": (path_search_faiss, 120),
    "partial_fc_1_process": (path_partial_fc_one, 120),
    "partial_fc_nccl_2_processes": (path_partial_fc_nccl, 180),
}


def child(name, data, work, cpu):
    """Run one path in this process; the last line of stdout is its result (JSON)."""
    if cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        result = {"status": "ok", "detail": PATHS[name][0](data, work, cpu)}
    except Skipped as why:
        result = {"status": "skipped", "detail": str(why)}
    except BaseException as err:  # noqa: B902 (SystemExit of a tool, KeyboardInterrupt: reported too)
        import traceback

        traceback.print_exc()
        result = {"status": "failed", "detail": one_line(err)}
    sys.stdout.flush()
    print("\n" + RESULT_MARK + json.dumps(result), flush=True)
    return 0


def in_child(name, data, work, cpu):
    """A path function for :func:`run_paths` that runs ``name`` in a child process; its output
    goes to ``WORK/logs/NAME.log``."""

    def fn():
        argv = [sys.executable, os.path.abspath(__file__), "--child", name, "--data", data, "--work", work]
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        log = os.path.join(work, "logs", f"{name}.log")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        try:
            proc = subprocess.run(
                argv + (["--cpu"] if cpu else []),
                capture_output=True,
                text=True,
                env=env,
                timeout=PATHS[name][1],
                cwd=REPO,
            )
        except subprocess.TimeoutExpired as err:
            _write(log, err.stdout, err.stderr)
            raise PathFailed(f"no result within {PATHS[name][1]} s (log: {log})") from None
        _write(log, proc.stdout, proc.stderr)
        marks = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
        if not marks:
            last = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"])[-1]
            raise PathFailed(f"the process died (exit status {proc.returncode}): {last[:250]} (log: {log})")
        result = json.loads(marks[-1][len(RESULT_MARK) :])
        if result["status"] == "skipped":
            raise Skipped(result["detail"])
        if result["status"] == "failed":
            raise PathFailed(f"{result['detail']} (log: {log})")
        return result["detail"]

    return fn


def _write(path, stdout, stderr):
    def text(x):
        return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")

    with open(path, "w") as f:
        f.write(text(stdout) + "\n--- stderr ---\n" + text(stderr))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--only", default="", help=f"comma-separated paths to run (default all: {', '.join(PATHS)})")
    p.add_argument(
        "--keep",
        default=None,
        help="work folder to keep (data, runs, logs/NAME.log per path); "
        "default: a temporary folder, removed unless a path failed",
    )
    p.add_argument("--cpu", action="store_true", help="run the paths on the CPU (checks this script, not CUDA)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child, args.data, args.work, args.cpu)

    import torch

    if not args.cpu and not torch.cuda.is_available():
        print(f"gpu_smoke: no CUDA device (torch {torch.__version__}); nothing to check")
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(PATHS)
    unknown = [n for n in names if n not in PATHS]
    if unknown:
        p.error(f"unknown path(s) {', '.join(unknown)}; known: {', '.join(PATHS)}")
    if args.cpu:
        print(f"gpu_smoke: --cpu: the paths on the CPU (torch {torch.__version__}); checks this script, not CUDA")
    else:
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        print(
            f"gpu_smoke: torch {torch.__version__}, CUDA {torch.version.cuda}, {len(gpus)} GPU(s): "
            f"{', '.join(sorted(set(gpus)))}"
        )
    work = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="gpu_smoke-")
    os.makedirs(work, exist_ok=True)
    start = time.monotonic()
    counts = {"ok": 0, "failed": 1, "skipped": 0}
    try:
        from metric.datasets.demo import make_demo_dataset

        data = os.path.join(work, "data", "smoke")
        make_demo_dataset(
            data,
            num_train_classes=8,
            train_per_class=4,
            num_heldout_classes=4,
            queries_per_class=2,
            index_per_class=4,
            num_distractor_classes=2,
            image_size=48,
            seed=0,
        )
        counts = run_paths([(n, in_child(n, data, work, args.cpu)) for n in names])
    finally:
        kept = args.keep or counts["failed"]
        if not kept:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"gpu_smoke: ok={counts['ok']} failed={counts['failed']} skipped={counts['skipped']} "
        f"seconds={time.monotonic() - start:.0f}" + (f" logs={work}/logs" if kept else "")
    )
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

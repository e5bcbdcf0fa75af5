"""Search past one process (issue 21): a big clustered index searched by W gloo processes vs one.

    python benchmarks/dist_search_bench.py [--rows 10000000 --dim 512 --queries 1000 --world 4]
                                           [--nlist 1024 --m 64 --nprobe 32] [--tmp /tmp] [--keep]

Steps, each with the real tools as a user runs them (subprocesses), measured in one run:

1. **Data**: an index store of ``--rows`` x ``--dim`` float16 unit vectors drawn from a
   two-level Gaussian mixture: ``--centres`` random centres, around each sub-centres, around each
   sub-centre about ``--group`` rows (so that every row has near neighbours, as retrieval data has,
   and ANN recall means something; uniform noise has none), and a query store of ``--queries``
   rows from the same mixture. Both are written block by block
   (:func:`metric.retrieval.store.write_store_blocks`): memory is one block, never the index.
2. **Exact, one process**: ``tools/search.py --query Q --index I --topk K`` (``--no-verify``:
   the stores were just written; verifying reads the whole index once more).
3. **Exact, W processes**: ``torchrun --nproc_per_node W tools/search.py ... --shard index``.
   Results and scores are compared with step 2: rows identical, and ids equal wherever the
   scores are distinct (ties may be ordered differently only where the printed scores are equal).
4. **IVF build**: ``tools/build_index.py --index I --shards W --type ivfpq`` (one quantizer
   trained on ``--train-size`` rows, one index per shard; ``--sample 0``: no per-shard check).
5. **IVF, W processes**: ``torchrun ... tools/search.py ... --shard index --ann`` (each rank loads
   only its shard's index); recall@K against step 2's exact results.

Memory: every process of a step is sampled every 0.2 s from ``/proc/<pid>/status`` (the launcher
of torchrun is left out; its own RSS is printed apart). ``peak_rss`` is the kernel's ``VmHWM``;
it counts the pages of the memory-mapped index that the process touched (``RssFile``: page
cache, shared, dropped under memory pressure, not memory the process allocated), so the peaks
of anonymous memory (``RssAnon``: what the process allocated) and of mapped file pages are printed
apart too. The goal of sharding: per process <= 1/W of the single process plus a fixed overhead
(the interpreter, torch, faiss, the ids). Before step 2 the index file is read once so that both
runs start with it in the page cache when memory allows (``free`` is printed).

Figures depend on the machine and its load (other processes share its cores): read ratios
measured in the same run. The generated stores are removed at the end unless ``--keep``.
The last line is the ``key=value`` summary.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from metric.retrieval.results import read_results_csv, read_scores_csv
from metric.retrieval.store import load_features, write_store_blocks
from metric.utils.errors import FeatureStoreError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BLOCK_ROWS = 65536
SUB_SPREAD = 0.6  # sub-centre around its centre: cosine ~0.86 to it, ~0.74 between two of one centre
ROW_SPREAD = (0.35, 0.55)  # row around its sub-centre, per centre: cosine ~0.77-0.89 within a group


def make_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--rows", type=int, default=10_000_000, help="index rows (default 10M)")
    p.add_argument("--dim", type=int, default=512, help="dimension (default 512)")
    p.add_argument("--queries", type=int, default=200, help="queries (default 200)")
    p.add_argument("--centres", type=int, default=4096, help="mixture centres (default 4096)")
    p.add_argument(
        "--group", type=int, default=100, help="rows per sub-centre on average (default 100: near neighbours)"
    )
    p.add_argument("--world", type=int, default=4, help="processes of the sharded runs (default 4)")
    p.add_argument("--topk", type=int, default=100, help="k of top-k and recall@k (default 100)")
    p.add_argument("--backend", default="auto", help="exact search backend (default auto)")
    p.add_argument("--nlist", type=int, default=1024, help="IVF lists (default 1024)")
    p.add_argument("--m", type=int, default=64, help="PQ sub-quantizers (default 64: 8 bytes of dims per code)")
    p.add_argument("--nprobe", type=int, default=32, help="IVF lists visited per query (default 32)")
    p.add_argument("--train-size", type=int, default=40960, help="IVF training rows (default 40960, 40 per list)")
    p.add_argument("--skip-ivf", action="store_true", help="no IVF build and search")
    p.add_argument("--tmp", default=None, help="folder for the generated stores (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the generated stores and outputs")
    p.add_argument(
        "--data",
        default=None,
        help="folder of the generated stores, reused when complete (made when missing; kept: remove it yourself)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the generated data")
    return p


# ----------------------------------------------------------------------------- data


def mixture_blocks(rng, rows, centres, spreads, block=BLOCK_ROWS, label=None):
    """Unit rows ``normalize(c + s * g / sqrt(D))`` for a random centre ``c`` of ``centres``, its
    spread ``s`` (``spreads``) and Gaussian noise ``g``; yielded as float32 blocks of ``block`` rows."""
    dim = centres.shape[1]
    done, next_report, t0 = 0, 0.1, time.perf_counter()
    for start in range(0, rows, block):
        n = min(block, rows - start)
        pick = rng.integers(0, len(centres), n)
        x = rng.standard_normal((n, dim), dtype=np.float32)
        x *= (spreads[pick] / np.sqrt(dim))[:, None]
        x += centres[pick]
        x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
        yield x
        done += n
        if label and done / rows >= next_report:
            print(f"  {label}: {done}/{rows} rows, {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
            next_report += 0.1


def generate(args, folder):
    rng = np.random.default_rng(args.seed)
    # two levels: --centres centres, and around each, sub-centres of about --group rows each
    centres = rng.standard_normal((args.centres, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    subs = max(1, args.rows // args.group)
    of = rng.integers(0, args.centres, subs)
    sub = centres[of] + SUB_SPREAD * rng.standard_normal((subs, args.dim), dtype=np.float32) / np.sqrt(args.dim)
    sub /= np.linalg.norm(sub, axis=1, keepdims=True)
    spreads = rng.uniform(*ROW_SPREAD, args.centres).astype(np.float32)[of]
    out = {}
    for name, rows, prefix in (("index", args.rows, "x"), ("query", args.queries, "q")):
        path = os.path.join(folder, name)
        start = time.perf_counter()
        meta = {"generated": f"dist_search_bench: {args.centres} centres, groups of {args.group}, seed {args.seed}"}
        try:
            old = load_features(path, verify=False).meta
        except FeatureStoreError:
            old = {}
        if (old.get("count"), old.get("dim"), old.get("generated")) == (rows, args.dim, meta["generated"]):
            print(f"  reusing {path}", file=sys.stderr, flush=True)
            out[name] = (path, float("nan"))
            continue
        ids = [f"{prefix}{i:09d}" for i in range(rows)]
        blocks = mixture_blocks(rng, rows, sub, spreads, label=f"write {name}" if rows > BLOCK_ROWS else None)
        write_store_blocks(path, rows, args.dim, ids, blocks, meta=meta, dtype="float16")
        out[name] = (path, time.perf_counter() - start)
        del ids
    return out


# ----------------------------------------------------------------------------- measuring


def _status(pid):
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    fields[key] = int(rest.split()[0]) / 1024.0
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return fields


def _descendants(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
                out += kids
                todo += kids
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def _rank_of(pid):
    """``RANK`` of a torchrun worker (from its environment), None for another process."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return None
    if b"tools/" not in cmd or b"RANK" not in env or b"torch.distributed.run" in cmd:
        return None
    return int(env[b"RANK"])


def run_measured(cmd, label, env=None):
    """Run ``cmd``; return ``(wall seconds, {pid: peaks MiB}, root peaks, stdout)``. Peaks of the
    root process (the launcher, under torchrun) are apart from its descendants'."""
    print(f"[{label}] {' '.join(cmd)}", file=sys.stderr, flush=True)
    full_env = dict(os.environ, PYTHONPATH=REPO)
    full_env.update(env or {})
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks, stop = {}, threading.Event()

    def watch():
        while not stop.is_set():
            for pid in [proc.pid] + _descendants(proc.pid):
                st = _status(pid)
                if st:
                    cur = peaks.setdefault(pid, {k: 0.0 for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")})
                    cur.setdefault("rank", _rank_of(pid))
                    for k, v in st.items():
                        cur[k] = max(cur[k], v)
            stop.wait(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    thread.join()
    if proc.returncode != 0:
        sys.stderr.write(err[-4000:])
        raise SystemExit(f"[{label}] failed with exit status {proc.returncode}")
    root = peaks.pop(proc.pid, {})
    return wall, peaks, root, out


def torchrun(world):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]


def _workers(peaks, root, single):
    """The search processes' peaks: the root itself for a single process, else its python children."""
    if single:
        return [root]
    return sorted((p for p in peaks.values() if p.get("rank") is not None), key=lambda p: p["rank"])


def compare(single_res, single_sc, other_res, other_sc):
    """Rows identical; positions whose ids differ where the (printed) scores are distinct; max
    score difference."""
    identical = differ_distinct = 0
    max_diff = 0.0
    for q, ids in single_res.items():
        o_ids, s, o = other_res[q], np.array(single_sc[q]), np.array(other_sc[q])
        if len(s) == len(o):
            max_diff = max(max_diff, float(np.abs(s - o).max()) if len(s) else 0.0)
        if ids == o_ids:
            identical += 1
            continue
        values, counts = np.unique(s, return_counts=True)
        unique = set(values[counts == 1].tolist())
        differ_distinct += sum(
            1 for i, (a, b, v) in enumerate(zip(ids, o_ids, s)) if a != b and v in unique and v != s[-1]
        )
    return identical, differ_distinct, max_diff


def recall(exact, approx, k):
    hits = [len(set(exact[q][:k]) & set(approx.get(q, [])[:k])) / max(1, min(k, len(exact[q]))) for q in exact]
    return float(np.mean(hits))


def free_mib():
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] / 1024.0, info["MemTotal"] / 1024.0


def read_through(path, chunk=64 << 20):
    with open(path, "rb") as f:
        while f.read(chunk):
            pass


# ----------------------------------------------------------------------------- main


def main(argv=None):
    args = make_parser().parse_args(argv)
    cores = os.cpu_count() or 1
    tmp = tempfile.mkdtemp(prefix="dist_search_bench.", dir=args.tmp)
    data = args.data or tmp
    os.makedirs(data, exist_ok=True)
    rows, summary = [], {"rows": args.rows, "dim": args.dim, "queries": args.queries, "world": args.world}

    def row(name, value, note=""):
        rows.append((name, value, note))
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        print(f"{name:44s} {shown:>12s}  {note}", flush=True)

    try:
        made = generate(args, data)
        index, query = made["index"][0], made["query"][0]
        gib = args.rows * args.dim * 2 / 2**30
        row("generate + write index store", made["index"][1], f"s; {args.rows} x {args.dim} float16 = {gib:.2f} GiB")
        summary.update(gen_s=made["index"][1], index_gib=gib)
        emb = os.path.join(index, "embeddings.npy")
        t = time.perf_counter()
        read_through(emb)
        avail, total = free_mib()
        row(
            "read index file once (page cache)",
            time.perf_counter() - t,
            f"s; then {avail:.0f} of {total:.0f} MiB available",
        )

        common = ["--query", query, "--index", index, "--topk", str(args.topk), "--no-verify", "--no-progress"]
        common += ["--backend", args.backend]
        single_out = [os.path.join(tmp, "single.csv"), os.path.join(tmp, "single_scores.csv")]
        cmd = [sys.executable, "tools/search.py", *common, "--output", single_out[0], "--scores", single_out[1]]
        wall1, peaks, root, _ = run_measured(cmd, "exact, 1 process", env={"OMP_NUM_THREADS": str(cores)})
        one = _workers(peaks, root, True)[0]
        row("exact search, 1 process", wall1, f"s wall; {cores} threads")
        row("  peak RSS", one["VmHWM"], f"MiB (anon peak {one['RssAnon']:.0f}, mapped file peak {one['RssFile']:.0f})")
        summary.update(single_s=wall1, single_rss_mib=one["VmHWM"], single_anon_mib=one["RssAnon"])
        summary["single_file_mib"] = one["RssFile"]

        w = args.world
        shard_out = [os.path.join(tmp, "sharded.csv"), os.path.join(tmp, "sharded_scores.csv")]
        cmd = torchrun(w) + ["tools/search.py", *common, "--shard", "index", "--output", shard_out[0]]
        cmd += ["--scores", shard_out[1]]
        threads = str(max(1, cores // w))
        wallw, peaks, root, _ = run_measured(cmd, f"exact, {w} processes", env={"OMP_NUM_THREADS": threads})
        workers = _workers(peaks, root, False)
        hwm = max(p["VmHWM"] for p in workers)
        anon = max(p["RssAnon"] for p in workers)
        filem = max(p["RssFile"] for p in workers)
        row(f"exact search, {w} processes", wallw, f"s wall; {threads} thread(s) each")
        row("  peak RSS (max over processes)", hwm, f"MiB (anon peak {anon:.0f}, mapped file peak {filem:.0f})")
        for p in workers:
            row(
                f"  rank {p['rank']} peak RSS",
                p["VmHWM"],
                f"MiB (anon peak {p['RssAnon']:.0f}, mapped file peak {p['RssFile']:.0f})",
            )
        row("  launcher (torchrun) peak RSS", root.get("VmHWM", 0.0), "MiB")
        goal = one["VmHWM"] / w
        row(
            "  per-process RSS / single RSS",
            hwm / one["VmHWM"],
            f"(1/W = {1 / w:.3f}; overhead above 1/W: {hwm - goal:.0f} MiB)",
        )
        row("  per-process anon / single anon", anon / max(one["RssAnon"], 1e-3), "")
        summary.update(sharded_s=wallw, sharded_rss_mib=hwm, sharded_anon_mib=anon, sharded_file_mib=filem)
        others = [p for p in workers if p["rank"] != 0]
        if others:  # rank 0 alone writes the results (and holds the ids for that)
            summary["rank1plus_rss_mib"] = max(p["VmHWM"] for p in others)
            summary["rank1plus_anon_mib"] = max(p["RssAnon"] for p in others)
        summary.update(rss_ratio=hwm / one["VmHWM"], overhead_mib=hwm - goal, time_ratio=wallw / wall1)

        s_res, s_sc = read_results_csv(single_out[0]), read_scores_csv(single_out[1])
        o_res, o_sc = read_results_csv(shard_out[0]), read_scores_csv(shard_out[1])
        same, differ, max_diff = compare(s_res, s_sc, o_res, o_sc)
        row("  rows identical to 1 process", same, f"of {len(s_res)}")
        row("  ids differing where scores distinct", differ, "(must be 0)")
        row("  max |score difference|", max_diff, "(printed to 6 decimals)")
        summary.update(rows_identical=same, differ_distinct=differ, max_score_diff=max_diff)
        per_proc = args.rows / w * args.queries / wallw
        row("  throughput per process", per_proc / 1e6, "M (index row x query) pairs / s, wall incl. start-up")
        summary["pairs_per_s_per_proc"] = per_proc

        if not args.skip_ivf:
            cmd = [sys.executable, "tools/build_index.py", "--index", index, "--shards", str(w), "--type", "ivfpq"]
            cmd += ["--nlist", str(args.nlist), "--m", str(args.m), "--nprobe", str(args.nprobe)]
            cmd += ["--train-size", str(args.train_size), "--sample", "0", "--no-verify", "--no-progress"]
            wallb, peaks, root, out = run_measured(cmd, "IVF build", env={"OMP_NUM_THREADS": str(cores)})
            row(
                "IVF-PQ build (train once + W shards)",
                wallb,
                f"s; nlist {args.nlist}, m {args.m}, "
                f"train {args.train_size}; peak RSS {root['VmHWM']:.0f} MiB (anon {root['RssAnon']:.0f})",
            )
            summary.update(ivf_build_s=wallb, ivf_build_rss_mib=root["VmHWM"], ivf_build_anon_mib=root["RssAnon"])
            ann_out = os.path.join(tmp, "ann.csv")
            cmd = torchrun(w) + ["tools/search.py", *common, "--shard", "index", "--ann", "--output", ann_out]
            wall_a, peaks, root, _ = run_measured(cmd, f"IVF, {w} processes", env={"OMP_NUM_THREADS": threads})
            workers = _workers(peaks, root, False)
            hwm_a = max(p["VmHWM"] for p in workers)
            r = recall(s_res, read_results_csv(ann_out), args.topk)
            row(f"IVF-PQ search, {w} processes", wall_a, f"s wall; nprobe {args.nprobe}; peak RSS {hwm_a:.0f} MiB")
            row(f"  recall@{args.topk} vs exact", r, "")
            summary.update(ivf_search_s=wall_a, ivf_rss_mib=hwm_a, recall=r, nlist=args.nlist, nprobe=args.nprobe)
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"rows": [list(r) for r in rows]}), file=sys.stderr)
    print(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

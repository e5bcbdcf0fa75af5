"""ROxf+R1M at scale: 70 queries against a real-sized ROxf index (4,993 rows) with a synthetic
1,001,001-row float16 distractor store appended, scored by the revisited protocol in bounded
memory (metric/retrieval/distractors.py).

    python benchmarks/r1m_scale.py [--dim 512] [--count 1001001] [--work /tmp/r1m_scale] [--keep] [--compare-full]

Steps timed: writing the distractor store (float16, through ``save_features`` in blocks), loading
and verifying it (digest, finite rows, norms), and the search + scoring of the 70 queries (E/M/H
mAP and mP@k). Memory: the process's peak resident set (VmHWM: includes the pages of the store's
memory map that verification touched, which are file-backed and reclaimable) and the peak of its
anonymous memory (RssAnon, sampled every 20 ms), the part the scoring allocates. The full
ranking that the standard evaluation builds (70 x 1,005,994 int64) alone would be 563 MB.
``--compare-full`` also scores the standard way (the distractors appended to the index in memory,
the whole ranking formed, :func:`~metric.retrieval.metrics_revisited.rank_index`), checks that the
scores are equal and prints the time and anonymous-memory ratios (it needs about
``count x dim x 4`` bytes for the float32 copy plus 12 bytes per row and query).

Last line: key=value pairs.
"""

import argparse
import os
import shutil
import threading
import time

import numpy as np

from metric.retrieval.distractors import iter_row_blocks, revisited_map_with_distractors
from metric.retrieval.metrics_revisited import rank_index, revisited_map
from metric.retrieval.store import load_features, save_features


def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class AnonPeak:
    """Peak RssAnon of this process, sampled in a thread."""

    def __init__(self, period=0.02):
        self.period, self.peak, self._stop = period, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kb("RssAnon"))
            time.sleep(self.period)

    def __enter__(self):
        self.peak = _status_kb("RssAnon")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_kb("RssAnon"))


def _max_diff(a, b):
    """The largest difference between two revisited results (every protocol and figure)."""
    return max(abs(a[p][k] - b[p][k]) for p in a for k in a[p])


def unit_rows(rng, n, d, dtype=np.float32):
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(dtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--count", type=int, default=1_001_001)
    ap.add_argument("--work", default="/tmp/r1m_scale")
    ap.add_argument("--keep", action="store_true", help="keep the generated store")
    ap.add_argument("--compare-full", action="store_true", help="also score with the whole ranking in memory")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    os.makedirs(args.work, exist_ok=True)
    raw = os.path.join(args.work, "raw.npy")
    store_dir = os.path.join(args.work, "distractors")
    try:
        # the synthetic distractors, written block by block into a .npy memmap, then stored as float16
        t0 = time.time()
        mm = np.lib.format.open_memmap(raw, mode="w+", dtype=np.float16, shape=(args.count, args.dim))
        step = 65536
        for start in range(0, args.count, step):
            n = min(step, args.count - start)
            mm[start : start + n] = unit_rows(rng, n, args.dim, np.float16)
        mm.flush()
        del mm
        gen_s = time.time() - t0
        t0 = time.time()
        src = np.load(raw, mmap_mode="r")
        ids = [f"r1m/{i:07d}" for i in range(args.count)]
        save_features(store_dir, src, ids, dtype="float16")
        del src, ids
        os.remove(raw)
        write_s = time.time() - t0

        # a real-sized ROxf: 4,993 index rows, 70 queries near some of them, gnd lists of the usual size
        index = unit_rows(rng, 4993, args.dim)
        targets = rng.choice(4993, 70, replace=False)
        query = index[targets] + 0.3 * unit_rows(rng, 70, args.dim)
        query /= np.linalg.norm(query, axis=1, keepdims=True)
        gnd = []
        for t in targets:
            others = rng.permutation(4993)
            gnd.append({"easy": np.append(t, others[:40]), "hard": others[40:70], "junk": others[70:120]})

        t0 = time.time()
        store = load_features(store_dir, mmap=True)  # verifies digest, finite rows and norms
        load_s = time.time() - t0
        anon_before_kb = _status_kb("RssAnon")
        anon_before_mb = anon_before_kb / 1024
        with AnonPeak() as anon:
            t0 = time.time()
            metrics = revisited_map_with_distractors(query, index, iter_row_blocks(store.embeddings), gnd)
            score_s = time.time() - t0
        peak_rss_mb = _status_kb("VmHWM") / 1024
        store_mb = os.path.getsize(os.path.join(store_dir, "embeddings.npy")) / 2**20
        full = ""
        if args.compare_full:
            with AnonPeak() as full_anon:
                t0 = time.time()
                merged = np.concatenate([index, np.asarray(store.embeddings, np.float32)])
                want = revisited_map(rank_index(query, merged), gnd)
                full_s = time.time() - t0
            # the rounding baseline: the same full ranking with the scores of another matrix product
            # (numpy's instead of torch's); float32 products of different shapes round differently, and
            # near-ties then swap, so the bounded scores are compared within that baseline, not bit for bit
            other = revisited_map(np.argsort(-(query @ merged.T), axis=1, kind="stable"), gnd)
            del merged
            diff, baseline = _max_diff(metrics, want), _max_diff(other, want)
            if diff > max(10 * baseline, 1e-9):
                raise SystemExit(
                    f"the bounded scoring differs from the full ranking by {diff:.2e} (rounding {baseline:.2e})"
                )
            full_extra_mb = (full_anon.peak - anon_before_kb) / 1024
            bounded_extra_mb = (anon.peak - anon_before_kb) / 1024
            print(
                f"  full ranking in memory: {full_s:.1f} s, +{full_extra_mb:.0f} MiB anonymous; scores differ by "
                f"{diff:.1e} (two full rankings: {baseline:.1e}); bounded/full time {score_s / full_s:.2f}, "
                f"memory {bounded_extra_mb / max(full_extra_mb, 1):.3f}"
            )
            full = (
                f" full_s={full_s:.1f} time_ratio={score_s / full_s:.2f} full_extra_mb={full_extra_mb:.0f} "
                f"bounded_extra_mb={bounded_extra_mb:.0f} max_diff={diff:.1e} rounding_diff={baseline:.1e}"
            )
        print(
            f"ROxf+R1M synthetic: 70 queries x (4,993 + {args.count:,}) x {args.dim}, float16 store {store_mb:.0f} MiB"
        )
        print(f"  generate {gen_s:.1f} s, write store {write_s:.1f} s, load+verify {load_s:.1f} s")
        print(f"  search + scoring {score_s:.1f} s; mAP E/M/H " + "/".join(f"{metrics[p]['mAP']:.4f}" for p in "EMH"))
        print(
            f"  peak RSS {peak_rss_mb:.0f} MiB (with touched store pages), peak anonymous {anon.peak / 1024:.0f} MiB "
            f"({anon_before_mb:.0f} MiB before the scoring: the libraries and the index)"
        )
        print(
            f"rows={args.count} dim={args.dim} write_s={write_s:.1f} load_verify_s={load_s:.1f} "
            f"search_score_s={score_s:.1f} peak_rss_mb={peak_rss_mb:.0f} peak_anon_mb={anon.peak / 1024:.0f} "
            f"anon_before_mb={anon_before_mb:.0f} store_mb={store_mb:.0f}{full}"
        )
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()

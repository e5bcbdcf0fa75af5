"""GLR mAP@100 of the demo's held-out retrieval with each re-ranker and with SuperGlobal pooling.

    python benchmarks/rerank_demo.py [--out-dir output/demo] [--data-dir metric/datasets/data/demo]

Needs a trained demo (``make demo``). Extracts the demo's query and index lists with the last
checkpoint — as the demo does (one scale), with three scales, and with SuperGlobal's extraction
options (GeM+ p=4.6, Regional-GeM, Scale-GeM over three scales) — then searches each pair with no
re-ranking, αQE, DBA, DBA+αQE, SuperGlobal, DBA+αQE+SuperGlobal, k-reciprocal and αQE+k-reciprocal
(published default parameters; two more rows with neighbourhoods scaled to the demo's 8 index
images per class), scores GLR mAP@100 against ``retrieval_solution.csv`` and prints one row per
re-ranking, one column per extraction. The last line holds ``key=value`` pairs.
"""

import argparse
import logging
import os
import tempfile

SCALES = "[0.7071, 1.0, 1.4142]"
EXTRACTIONS = {
    "demo (1 scale)": [],
    "3 scales, gem": ["INFER.SCALES", SCALES],
    "SuperGlobal pooling": [
        "INFER.SCALES",
        SCALES,
        "INFER.MULTISCALE_POOL",
        "max",
        "INFER.POOL_P",
        "4.6",
        "INFER.REGIONAL_GEM",
        "True",
    ],
}
RERANKS = {  # name: (re-rankers, parameters); published defaults unless the name says otherwise
    "none": ([], {}),
    "qe": (["qe"], {}),
    "dba": (["dba"], {}),
    "dba+qe": (["dba", "qe"], {}),
    "superglobal": (["superglobal"], {}),
    "dba+qe+superglobal": (["dba", "qe", "superglobal"], {}),
    "kreciprocal": (["kreciprocal"], {}),
    "qe+kreciprocal": (["qe", "kreciprocal"], {}),
    # neighbourhoods scaled to the demo's 8 index images per query class (not tuned, not published)
    "superglobal K=3": (["superglobal"], {"sg_k": 3}),
    "kreciprocal k1=7,k2=3": (["kreciprocal"], {"kr_k1": 7, "kr_k2": 3}),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--out-dir", default="output/demo", help="the trained demo's OUT_DIR")
    parser.add_argument("--data-dir", default="metric/datasets/data/demo", help="the demo data set folder")
    parser.add_argument("--work-dir", default=None, help="where to put stores and results (default: a temp dir)")
    args = parser.parse_args(argv)  # before the imports: --help and usage errors need no torch

    from metric.checkpoint import list_checkpoints
    from metric.config import load_cfg
    from metric.engine.demo import DEMO_CONFIG
    from metric.engine.extract import extract_features
    from metric.retrieval.metrics import evaluate_glr
    from metric.retrieval.pipeline import SearchOptions, search_stores
    from metric.retrieval.rerank_plan import RerankOptions

    logging.basicConfig(level=logging.WARNING)
    checkpoint = list_checkpoints(args.out_dir)[-1]
    merged = os.path.join(args.out_dir, "config.yaml")
    work = args.work_dir or tempfile.mkdtemp(prefix="rerank_demo_")
    table, summary = {}, {}
    for ename, opts in EXTRACTIONS.items():
        stores = {}
        for split in ("query", "index"):
            stores[split] = os.path.join(work, ename.replace(" ", "_"), split)
            cfg = load_cfg(
                merged if os.path.isfile(merged) else DEMO_CONFIG,
                [
                    "TEST.WEIGHTS",
                    checkpoint,
                    "INFER.INPUT",
                    os.path.join(args.data_dir, f"{split}_list.txt"),
                    "INFER.OUTPUT",
                    stores[split],
                    "OUT_DIR",
                    args.out_dir,
                    *opts,
                ],
            )
            extract_features(cfg, progress=False)
        row = table[ename] = {}
        for rname, (rerank, params) in RERANKS.items():
            out = os.path.join(work, ename.replace(" ", "_"), rname.replace(" ", "_").replace(",", "_") + ".csv")
            options = SearchOptions(rerank=RerankOptions(steps=tuple(rerank), **params))
            search_stores(stores["query"], stores["index"], out, topk=100, options=options)
            row[rname] = evaluate_glr(out, os.path.join(args.data_dir, "retrieval_solution.csv"))["mAP@100"]["All"]
            key = rname.replace(" ", "_").replace(",", "_").replace("=", "")
            summary[f"{ename.split()[0].lower()}_{key}"] = row[rname]
    print(f"GLR mAP@100 (All) of the demo's held-out retrieval, checkpoint {checkpoint}")
    print(f"{'re-ranking':<24}" + "".join(f"{e:>22}" for e in EXTRACTIONS))
    for rname in RERANKS:
        print(f"{rname:<24}" + "".join(f"{table[e][rname]:>22.4f}" for e in EXTRACTIONS))
    print(" ".join(f"{k}={v:.4f}" for k, v in summary.items()))


if __name__ == "__main__":
    main()

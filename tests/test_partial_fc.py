"""Partial FC (the model-parallel margin classifier) against the single-process full classifier:
loss, gradients and training steps with 2 gloo processes, the class sampling, checkpoints of the
full matrix, and the one-line errors."""

import json
import math
import os
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from metric.modeling.layers import adacos  # noqa: F401  (registers adacos)
from metric.modeling.layers.margins import INIT_BLOCK_ROWS, _seeded_rows
from metric.modeling.layers.partial_fc import (
    PartialFC,
    sample_classes,
    sampling_generator,
    shard_of,
    sharded_cross_entropy,
)
from metric.modeling.registry import MARGIN_LAYERS
from tests.helpers import free_port

# (margin layer, its options, label smoothing, dynamic margins)
CASES = [
    ("linear", {}, 0.0, False),
    ("cosface", {"scale": 16.0, "margin": 0.3}, 0.0, False),
    ("cosface", {"scale": 16.0, "margin": 0.3}, 0.1, False),
    ("arcface", {"scale": 16.0, "margin": 0.4}, 0.0, False),
    ("arcface", {"scale": 16.0, "margin": 0.4}, 0.0, True),
    ("arcface", {"scale": 16.0, "margin": 0.4, "easy_margin": True}, 0.0, False),
    ("subcenter_arcface", {"scale": 16.0, "margin": 0.4, "subcenters": 2}, 0.0, False),
    ("circle", {"scale": 16.0, "margin": 0.25}, 0.0, False),
    ("curricularface", {"scale": 16.0, "margin": 0.4}, 0.0, False),
    ("curricularface", {"scale": 16.0, "margin": 0.4}, 0.1, True),
    ("adacos", {"adaptive": True}, 0.0, False),
]
C, D, N = 7, 6, 8  # 7 classes over 2 processes: shards of 4 and 3


def _diff(a, b):
    return float((a - b).detach().abs().max())


def _case_data(name, opts, dynamic, seed=0):
    """The reference (full) layer, a global batch and its labels, all drawn from ``seed``."""
    torch.manual_seed(seed)
    ref = MARGIN_LAYERS.get(name)(D, C, **opts).double().train()
    if name == "curricularface":
        ref.t.fill_(0.3)
    margins = torch.linspace(0.2, 0.6, C) if dynamic else None
    if margins is not None:
        ref.set_class_margins(margins)
    x = torch.randn(N, D, dtype=torch.float64)
    labels = torch.tensor([0, 3, 4, 6, 1, 4, 2, 5])
    return ref, margins, x, labels


def _sharded_copy(name, opts, ref, margins, world, rank):
    start, stop = shard_of(C, world, rank)
    layer = MARGIN_LAYERS.get(name)(D, C, shard=(start, stop), **opts).to(ref.weight.dtype).train()
    k = layer.centers
    with torch.no_grad():
        layer.weight.copy_(ref.weight[start * k : stop * k])
    if name == "curricularface":
        layer.t.fill_(0.3)
    if margins is not None:
        layer.set_class_margins(margins)
    return layer, (start * k, stop * k)


def _compare_case(case, world, rank):
    """Max differences (float64) between Partial FC on this process's half of the batch and the full layer
    on the whole batch: loss, embedding gradient (divided by W: it is pre-scaled for DDP's
    averaging), class-centre gradient of this shard, and the buffers t / scale."""
    name, opts, eps, dynamic = case
    ref, margins, x, labels = _case_data(name, opts, dynamic)
    xr = x.clone().requires_grad_()
    ref_loss = F.cross_entropy(ref(xr, labels), labels, label_smoothing=eps)
    ref_loss.backward()
    layer, (r0, r1) = _sharded_copy(name, opts, ref, margins, world, rank)
    n = N // world
    xl = x[rank * n : (rank + 1) * n].clone().requires_grad_()
    loss = PartialFC(1.0, eps).train()(layer, xl, labels[rank * n : (rank + 1) * n])
    loss.backward()
    out = {
        "loss": abs(float(loss.detach()) - float(ref_loss.detach())),
        "emb_grad": _diff(xl.grad / world, xr.grad[rank * n : (rank + 1) * n]),
        "centre_grad": _diff(layer.weight.grad, ref.weight.grad[r0:r1]) if r1 > r0 else 0.0,
    }
    own = dict(layer.named_buffers())
    for buf, value in ref.named_buffers():  # CurricularFace's t, AdaCos's scale
        if buf != "class_margin":
            out[buf] = _diff(own[buf], value)
    return out


class _Head(nn.Module):
    def __init__(self, classifier, partial_fc=None):
        super().__init__()
        self.classifier, self.partial_fc = classifier, partial_fc


class _Net(nn.Module):
    """A linear 'backbone' and a head, as the trainer's model: ``head.classifier`` (+ ``head.partial_fc``)."""

    def __init__(self, classifier, partial_fc=None):
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Linear(5, D)
        self.head = _Head(classifier, partial_fc)

    def forward(self, inputs, labels):
        emb = self.body(inputs)
        if self.head.partial_fc is not None:
            return self.head.partial_fc(self.head.classifier, emb, labels)
        return F.cross_entropy(self.head.classifier(emb, labels), labels)


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, nesterov=True, weight_decay=0.01)


def _batches(steps=2):
    g = torch.Generator().manual_seed(5)
    return [
        (torch.randn(N, 5, generator=g, dtype=torch.float64), torch.randint(0, C, (N,), generator=g))
        for _ in range(steps)
    ]


def _train_steps(world, rank):
    """Two SGD steps (float64; momentum, Nesterov, weight decay) of a DDP model with a Partial FC head vs the
    full head on one process; then the checkpoint gathered on rank 0 and cut back."""
    from torch.nn.parallel import DistributedDataParallel

    from metric.engine import classifier_shards as engine_pfc

    name, opts = "arcface", {"scale": 16.0, "margin": 0.4}
    torch.manual_seed(0)
    ref_layer = MARGIN_LAYERS.get(name)(D, C, **opts).double().train()
    ref = _Net(ref_layer).double()
    ref_opt = _sgd(ref)
    layer, (r0, r1) = _sharded_copy(name, opts, ref_layer, None, world, rank)
    net = _Net(layer, PartialFC(1.0).train()).double()
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(net, ["head.classifier.weight"])
    ddp = DistributedDataParallel(net)
    opt = _sgd(net)
    n = N // world
    for inputs, labels in _batches():
        ref_opt.zero_grad()
        ref(inputs, labels).backward()
        ref_opt.step()
        opt.zero_grad()
        ddp(inputs[rank * n : (rank + 1) * n], labels[rank * n : (rank + 1) * n]).backward()
        with engine_pfc.sampled_rows(opt, net):
            opt.step()
    out = {
        "body": _diff(net.body.weight, ref.body.weight),
        "centres": _diff(layer.weight, ref_layer.weight[r0:r1]),
    }
    model_state, optim_state = engine_pfc.checkpoint_states(net, opt)
    ref_state = ref_opt.state_dict()
    if rank == 0:
        out["ckpt_weight"] = _diff(model_state["head.classifier.weight"], ref_layer.weight)
        index = len(list(net.body.parameters()))
        out["ckpt_momentum"] = _diff(
            optim_state["state"][index]["momentum_buffer"], ref_state["state"][index]["momentum_buffer"]
        )
    # resuming cuts the full optimizer state back to this shard
    cut = engine_pfc.shard_optimizer_state(ref_state, net, opt)
    index = len(list(net.body.parameters()))
    out["resume_momentum"] = _diff(cut["state"][index]["momentum_buffer"], opt.state[layer.weight]["momentum_buffer"])
    return out


# Every optimizer a user can choose (OPTIM.OPTIMIZER sgd | adamw), with and without its options.
OPTIMIZERS = {
    "sgd-nesterov-wd": lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9, nesterov=True, weight_decay=0.01),
    "sgd-dampening": lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9, dampening=0.1),
    "sgd-plain": lambda ps: torch.optim.SGD(ps, lr=0.5),
    "adamw-wd": lambda ps: torch.optim.AdamW(ps, lr=0.05, betas=(0.9, 0.999), weight_decay=0.05),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, betas=(0.8, 0.99), weight_decay=0.0),
}
MATRIX_STEPS = 8


def _replicated_run(kind, world, rank, batches, permute):
    """The non-parallel head under DDP (what a run without Partial FC trains): per-step global mean
    losses, the final weights and optimizer. ``permute``: each process's rows in reverse order, the
    same mathematics with other rounding (the rounding-only baseline)."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    layer = MARGIN_LAYERS.get("arcface")(D, C, scale=16.0, margin=0.4).double().train()
    net = _Net(layer).double()
    ddp = DistributedDataParallel(net)
    opt = OPTIMIZERS[kind](net.parameters())
    n, losses = N // world, []
    for inputs, labels in batches:
        x, y = inputs[rank * n : (rank + 1) * n], labels[rank * n : (rank + 1) * n]
        if permute:
            x, y = x.flip(0), y.flip(0)
        opt.zero_grad()
        loss = ddp(x, y)
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
    return net, opt, losses


def _optimizer_matrix(world, rank):
    """Partial FC at SAMPLE_RATE 1 against the replicated head for every optimizer over
    MATRIX_STEPS steps (float64): max differences of the per-step losses, the final weights (body and
    this shard), and the checkpoint (full classifier and every row-shaped optimizer state, AdamW's
    step count), next to the same differences of the rounding-only baseline."""
    from torch.nn.parallel import DistributedDataParallel

    from metric.engine import classifier_shards as engine_pfc

    batches = _batches(MATRIX_STEPS)
    out = {}
    for kind in OPTIMIZERS:
        ref, ref_opt, ref_losses = _replicated_run(kind, world, rank, batches, permute=False)
        alt, _, alt_losses = _replicated_run(kind, world, rank, batches, permute=True)
        ref_layer = ref.head.classifier
        torch.manual_seed(0)
        start_layer = MARGIN_LAYERS.get("arcface")(D, C, scale=16.0, margin=0.4).double().train()
        layer, (r0, r1) = _sharded_copy("arcface", {"scale": 16.0, "margin": 0.4}, start_layer, None, world, rank)
        net = _Net(layer, PartialFC(1.0).train()).double()
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(net, ["head.classifier.weight"])
        ddp = DistributedDataParallel(net)
        opt = OPTIMIZERS[kind](net.parameters())
        n, losses = N // world, []
        for step, (inputs, labels) in enumerate(batches):
            engine_pfc.set_step(net, step)
            opt.zero_grad()
            loss = ddp(inputs[rank * n : (rank + 1) * n], labels[rank * n : (rank + 1) * n])
            loss.backward()
            with engine_pfc.sampled_rows(opt, net):
                opt.step()
            losses.append(float(loss.detach()))
        model_state, optim_state = engine_pfc.checkpoint_states(net, opt)
        ours = {
            "loss": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "body": _diff(net.body.weight, ref.body.weight),
            "centres": _diff(layer.weight, ref_layer.weight[r0:r1]),
        }
        baseline = {
            "loss": max(abs(a - b) for a, b in zip(alt_losses, ref_losses)),
            "body": _diff(alt.body.weight, ref.body.weight),
            "centres": _diff(alt.head.classifier.weight, ref_layer.weight),
        }
        if rank == 0:
            index = len(list(net.body.parameters()))
            ref_entry = ref_opt.state_dict()["state"].get(index, {})  # plain SGD keeps no state
            entry = optim_state["state"].get(index, {})
            ours["ckpt_weight"] = _diff(model_state["head.classifier.weight"], ref_layer.weight)
            for key, value in ref_entry.items():
                ours[f"ckpt_{key}"] = _diff(entry[key], value)
            ours["state_keys_equal"] = float(sorted(entry) != sorted(ref_entry))
        out[kind] = {"ours": ours, "baseline": baseline, "magnitude": float(ref_layer.weight.detach().abs().max())}
    return out


def _sampled_steps(world, rank):
    """SAMPLE_RATE 0.3 on 40 classes: every positive sampled, the same set for the same seed and
    step, and the rows not sampled keep their weights and momentum through a step."""
    from metric.engine import classifier_shards as engine_pfc

    classes = 40
    start, stop = shard_of(classes, world, rank)
    torch.manual_seed(0)
    layer = MARGIN_LAYERS.get("cosface")(D, classes, shard=(start, stop), init_seed=3).train()
    net = _Net(layer, PartialFC(0.3, seed=11).train())
    opt = _sgd(net)
    g = torch.Generator().manual_seed(9)
    out = {"missing_positives": 0, "deterministic": True, "untouched_moved": 0.0, "sampled_sizes": []}
    n = N // world
    for step in range(3):
        inputs, labels = torch.randn(N, 5, generator=g), torch.randint(0, classes, (N,), generator=g)
        net.head.partial_fc.set_step(step)
        before_w = layer.weight.detach().clone()
        before_m = opt.state[layer.weight].get("momentum_buffer") if layer.weight in opt.state else None
        before_m = None if before_m is None else before_m.clone()
        opt.zero_grad()
        net(inputs[rank * n : (rank + 1) * n], labels[rank * n : (rank + 1) * n]).backward()
        rows, _ = net.head.partial_fc.sampled
        mine = [int(c) - start for c in labels.unique() if start <= c < stop]
        out["missing_positives"] += len(set(mine) - set(rows.tolist()))
        again = sample_classes(
            stop - start, torch.tensor(mine, dtype=torch.long), 0.3, sampling_generator(11, step, start)
        )
        out["deterministic"] &= torch.equal(again, rows)
        out["sampled_sizes"].append(rows.numel())
        with engine_pfc.sampled_rows(opt, net):
            opt.step()
        rest = torch.ones(stop - start, dtype=torch.bool)
        rest[rows] = False
        out["untouched_moved"] = max(out["untouched_moved"], _diff(layer.weight[rest], before_w[rest]))
        if before_m is not None:
            now_m = opt.state[layer.weight]["momentum_buffer"]
            out["untouched_moved"] = max(out["untouched_moved"], _diff(now_m[rest], before_m[rest]))
        out["sampled_moved"] = _diff(layer.weight[rows], before_w[rows])
    return out


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {
            "cases": [_compare_case(case, world, rank) for case in CASES],
            "train": _train_steps(world, rank),
            "sampled": _sampled_steps(world, rank),
            "matrix": _optimizer_matrix(world, rank),
        }
    except BaseException:  # not a barrier: the other process may be waiting in another collective
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # start_processes then ends the other process and raises
    dist.barrier()
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


@pytest.mark.slow
def test_two_gloo_processes_equal_the_full_classifier(tmp_path):
    world = 2
    mp.start_processes(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, start_method="spawn")
    for rank in range(world):
        result = json.load(open(tmp_path / f"rank{rank}.json"))
        print(rank, json.dumps(result))
        for case, diffs in zip(CASES, result["cases"]):
            assert max(diffs.values()) < 1e-5, (rank, case, diffs)
        assert max(result["train"].values()) < 1e-5, (rank, result["train"])
        s = result["sampled"]
        assert s["missing_positives"] == 0 and s["deterministic"], s
        assert s["untouched_moved"] == 0.0 and s["sampled_moved"] > 0, s
        assert min(s["sampled_sizes"]) >= math.ceil(0.3 * 20) and max(s["sampled_sizes"]) < 20, s
        for kind, m in result["matrix"].items():
            # the rounding-only baseline (same mathematics, rows in another order) sets the scale; a
            # few float64 ulps of the values when it happens to round identically
            floor = 64 * torch.finfo(torch.float64).eps * max(1.0, m["magnitude"])
            tol = 100 * max(max(m["baseline"].values()), floor)
            assert max(m["ours"].values()) <= tol, (rank, kind, tol, m)


# --- one process ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}{'-ls' if c[2] else ''}{'-dyn' if c[3] else ''}" for c in CASES])
def test_one_process_partial_fc_equals_the_margin_layer(case):
    diffs = _compare_case(case, world=1, rank=0)
    assert max(diffs.values()) < 1e-5, diffs


def test_sharded_cross_entropy_is_cross_entropy_in_one_process():
    torch.manual_seed(0)
    logits = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 8, 3, 3, 1])
    for eps in (0.0, 0.2):
        ours = sharded_cross_entropy(logits, labels, eps)
        (g1,) = torch.autograd.grad(ours, logits)
        ref = F.cross_entropy(logits, labels, label_smoothing=eps)
        (g2,) = torch.autograd.grad(ref, logits)
        assert float(ours.detach()) == pytest.approx(float(ref.detach()), abs=1e-12)
        assert torch.allclose(g1, g2, atol=1e-12)


def test_shards_cover_the_classes_once():
    for classes, world in ((7, 2), (10, 4), (3, 4), (1_000_000, 8)):
        spans = [shard_of(classes, world, r) for r in range(world)]
        assert spans[0][0] == 0 and spans[-1][1] == classes
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert max(b - a for a, b in spans) == math.ceil(classes / world)


def test_sampling_keeps_positives_and_is_deterministic():
    positives = torch.tensor([3, 17, 42])
    a = sample_classes(100, positives, 0.1, sampling_generator(0, 5, 0))
    b = sample_classes(100, positives, 0.1, sampling_generator(0, 5, 0))
    c = sample_classes(100, positives, 0.1, sampling_generator(0, 6, 0))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(positives.tolist()) <= set(a.tolist()) and a.numel() == 10 and torch.equal(a, a.sort().values)
    many = torch.arange(0, 100, 5)  # more positives than the rate keeps: all of them
    assert torch.equal(sample_classes(100, many, 0.1, sampling_generator(0, 5, 0)), many)


def test_seeded_init_does_not_depend_on_the_shards():
    cols, rows = 3, 2 * INIT_BLOCK_ROWS + 10
    full = _seeded_rows(range(0, rows), cols, 7, 0.01)
    cuts = ((0, 5), (5, INIT_BLOCK_ROWS + 3), (INIT_BLOCK_ROWS + 3, rows))
    parts = [_seeded_rows(range(a, b), cols, 7, 0.01) for a, b in cuts]
    assert torch.equal(torch.cat(parts), full)
    assert 0.008 < float(full.std()) < 0.012


# --- configuration and the trainer ------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, words",
    [
        (["MODEL.HEADS.PARTIAL_FC.SAMPLE_RATE", "0"], ["MODEL.HEADS.PARTIAL_FC.SAMPLE_RATE", "> 0 and <= 1"]),
        (["MODEL.HEADS.PARTIAL_FC.SAMPLE_RATE", "1.5"], ["MODEL.HEADS.PARTIAL_FC.SAMPLE_RATE", "> 0 and <= 1"]),
        (["MODEL.LOSSES.NAME", "[triplet]"], ["MODEL.LOSSES.NAME", "cross_entropy", "PARTIAL_FC"]),
        (["TRAIN.GRAD_CLIP", "1.0"], ["TRAIN.GRAD_CLIP", "PARTIAL_FC"]),
        (["TRAIN.MIXED_PRECISION", "fp16"], ["TRAIN.MIXED_PRECISION", "bf16 or none", "drift apart"]),
        (
            ["MODEL.HEADS.CLS_LAYER", "adacos", "MODEL.HEADS.PARTIAL_FC.SAMPLE_RATE", "0.5"],
            ["MODEL.HEADS.ADACOS_MODE", "SAMPLE_RATE 1.0"],
        ),
        (["TRAIN.EMA.ENABLED", "True"], ["TRAIN.EMA.ENABLED", "PARTIAL_FC"]),
    ],
)
def test_bad_partial_fc_settings_are_one_line_exit_2(tiny_data, tmp_path, capsys, extra, words):
    from tests.helpers import call_tool, tiny_opts

    opts = tiny_opts(tiny_data, str(tmp_path / "run")) + ["MODEL.HEADS.PARTIAL_FC.ENABLED", "True"] + extra
    status, _, err = call_tool("train_metric", opts, capsys)
    line = err.strip()
    assert status == 2 and "\n" not in line and "Traceback" not in line, err
    assert all(w in line for w in words), line


@pytest.mark.slow
def test_partial_fc_demo_learns_resumes_elsewhere_and_refuses_another_class_count(tmp_path, capsys):
    """The demo config (AdamW) in two spawned gloo processes with SAMPLE_RATE 0.3 on 24 classes: the
    ranks agree, recall@1 among the training images beats the untrained model, the checkpoint
    holds the full classifier and its AdamW moments; it resumes in one process with the
    non-parallel head; another class count is one line (exit 2). About half a minute."""
    from metric.checkpoint import list_checkpoints, read_checkpoint
    from metric.config import load_cfg
    from metric.datasets.demo import make_demo_dataset
    from metric.engine.demo import DEMO_CONFIG
    from metric.engine.evaluator import evaluate_model
    from metric.utils.logger import read_stats
    from tests.helpers import call_tool, run_py

    make_demo_dataset(
        str(tmp_path / "data" / "demo"),
        num_train_classes=24,
        train_per_class=16,
        num_heldout_classes=4,
        queries_per_class=1,
        index_per_class=2,
        num_distractor_classes=1,
        image_size=56,
    )
    out = str(tmp_path / "run")

    def opts(**extra):
        keys = {
            "DATA_DIR": str(tmp_path / "data"),
            "OUT_DIR": out,
            "MODEL.HEADS.NUM_CLASSES": 24,
            "OPTIM.MAX_EPOCH": 10,
            "TRAIN.EVAL_PERIOD": 0,
            "TRAIN.CHECKPOINT_PERIOD": 100,
            "DATA_LOADER.NUM_WORKERS": 0,
            "TRAIN.IM_SIZE": 48,
            "TEST.IM_SIZE": 56,
            "TRAIN.BATCH_SIZE": 16,
            "TEST.BATCH_SIZE": 32,
            "TEST.SPLIT": "train_list.txt",
            "MODEL.HEADS.PARTIAL_FC.ENABLED": True,
            "MODEL.HEADS.PARTIAL_FC.SAMPLE_RATE": 0.3,
            **extra,
        }
        return [str(a) for kv in keys.items() for a in kv]

    untrained = evaluate_model(load_cfg(DEMO_CONFIG, opts()))["recall@1"]
    run_py(
        [
            "tools/train_metric.py",
            "--cfg",
            DEMO_CONFIG,
            *opts(),
            "NUM_GPUS",
            "2",
            "HOST",
            "127.0.0.1",
            "PORT",
            str(free_port()),
        ],
        check=True,
    )
    stats = os.path.join(out, "stats.jsonl")
    final = read_stats(stats, "final")[-1]
    assert len(final["weights_digests"]) == 2 and len(set(final["weights_digests"])) == 1
    trained = read_stats(stats, "test_epoch")[-1]["recall@1"]
    assert trained > untrained, (untrained, trained)
    state = read_checkpoint(list_checkpoints(out)[-1])
    assert state["model_state"]["head.classifier.weight"].shape == (24, 64)
    moments = [v.get("exp_avg") for v in state["optimizer_state"]["state"].values()]
    assert any(m is not None and m.shape == (24, 64) for m in moments)
    # One process, the non-parallel head, one more epoch: resumes from the 2-process checkpoint.
    more = opts(**{"OPTIM.MAX_EPOCH": 11, "TEST.DATASET": "", "MODEL.HEADS.PARTIAL_FC.ENABLED": False})
    status, stdout, err = call_tool("train_metric", ["--cfg", DEMO_CONFIG, *more], capsys)
    assert status == 0 and "resumed from" in stdout + err and "epoch 11/11" in stdout + err, err
    # Another class count: one line, exit 2 (in-process: the subprocess path is tested above).
    status, _, err = call_tool(
        "train_metric", ["--cfg", DEMO_CONFIG, *opts(**{"MODEL.HEADS.NUM_CLASSES": 30, "OPTIM.MAX_EPOCH": 12})], capsys
    )
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "trained with another MODEL.HEADS.NUM_CLASSES" in lines[0], err


@pytest.mark.parametrize(
    "name, opts, dynamic",
    [
        ("subcenter_arcface", {"scale": 16.0, "margin": 0.4, "subcenters": 3}, False),
        ("curricularface", {"scale": 16.0, "margin": 0.4}, True),
        ("cosface", {"scale": 16.0, "margin": 0.3}, True),
    ],
)
def test_sampled_classes_are_the_full_layer_on_those_columns(name, opts, dynamic):
    """One process, SAMPLE_RATE 0.4 on 20 classes: the loss is the full layer's cross-entropy over
    the kept classes only, and only the kept rows get a gradient."""
    torch.manual_seed(0)
    classes = 20
    ref = MARGIN_LAYERS.get(name)(D, classes, **opts).double().train()
    layer = MARGIN_LAYERS.get(name)(D, classes, shard=(0, classes), **opts).double().train()
    with torch.no_grad():
        layer.weight.copy_(ref.weight)
    if dynamic:
        margins = torch.linspace(0.1, 0.5, classes)
        ref.set_class_margins(margins)
        layer.set_class_margins(margins)
    x = torch.randn(N, D, dtype=torch.float64)
    labels = torch.tensor([0, 3, 4, 6, 1, 4, 2, 5])
    pfc = PartialFC(0.4, seed=3).train()
    pfc.set_step(7)
    loss = pfc(layer, x, labels)
    rows, sub = pfc.sampled
    keep = rows.view(-1, layer.centers)[:, 0] // layer.centers
    assert set(labels.tolist()) <= set(keep.tolist()) and keep.numel() == 8
    remap = torch.full((classes,), -1, dtype=torch.long)
    remap[keep] = torch.arange(keep.numel())
    want = F.cross_entropy(ref(x, labels)[:, keep], remap[labels])
    assert float(loss.detach()) == pytest.approx(float(want.detach()), abs=1e-10)
    loss.backward()
    want.backward()
    assert torch.allclose(sub.grad, ref.weight.grad[rows], atol=1e-10)
    others = torch.ones(classes * layer.centers, dtype=torch.bool)
    others[rows] = False
    assert layer.weight.grad is None and float(ref.weight.grad[others].abs().max()) == 0.0


@pytest.mark.slow
def test_partial_fc_resume_after_a_checkpoint_equals_the_uninterrupted_run(tmp_path):
    """Two processes, SAMPLE_RATE 0.3, dropout: removing the last checkpoint and running again (a
    kill after epoch 1's checkpoint) ends with the same weights and momentum, bit for bit."""
    import shutil

    from metric.checkpoint import list_checkpoints, read_checkpoint
    from tests.helpers import run_py, tiny_opts, write_tiny_dataset

    data = write_tiny_dataset(str(tmp_path / "data12"), num_classes=12, per_class=4)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")

    def train(out):
        opts = tiny_opts(
            data,
            out,
            **{
                "MODEL.HEADS.NUM_CLASSES": 12,
                "TEST.DATASET": "",
                "MODEL.HEADS.DROPOUT": 0.2,
                "MODEL.HEADS.PARTIAL_FC.ENABLED": True,
                "MODEL.HEADS.PARTIAL_FC.SAMPLE_RATE": 0.3,
            },
        )
        return run_py(
            ["tools/train_metric.py", *opts, "NUM_GPUS", "2", "HOST", "127.0.0.1", "PORT", str(free_port())], check=True
        )

    train(straight)
    shutil.copytree(straight, resumed)
    os.remove(list_checkpoints(resumed)[-1])
    assert "resumed from" in train(resumed).stdout
    a, b = (read_checkpoint(list_checkpoints(d)[-1]) for d in (straight, resumed))
    assert a["model_state"]["head.classifier.weight"].shape == (12, 16)
    for key, value in a["model_state"].items():
        assert torch.equal(value, b["model_state"][key]), key
    sa, sb = a["optimizer_state"]["state"], b["optimizer_state"]["state"]
    assert all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa)

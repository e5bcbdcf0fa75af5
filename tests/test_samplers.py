"""The P x K sampler: batch structure, ranks disjoint and covering the epoch, determinism,
a real 2-process gloo run, and the loader's use of it."""

import itertools
import json
import os
import random
from collections import Counter

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from metric.datasets.samplers import PKSampler, max_pk_batches
from metric.utils.errors import ConfigError
from tests.helpers import free_port, run_py, tiny_opts


def long_tail_labels(num_classes=30, seed=0):
    """Class sizes from 1 to 40 images (several smaller than K), shuffled."""
    rng = random.Random(seed)
    labels = [c for c in range(num_classes) for _ in range(1 + int(40 * rng.random() ** 3))]
    rng.shuffle(labels)
    return labels


LABELS = long_tail_labels()


@pytest.mark.parametrize("p, k", [(4, 4), (3, 2), (8, 1)])
def test_every_batch_has_p_classes_times_k_images(p, k):
    sampler = PKSampler(LABELS, p * k, k, num_replicas=1, rank=0, seed=3)
    batches = sampler.batches()
    assert batches and len(batches) * p * k == len(sampler) == len(list(sampler))
    counts = Counter(LABELS)
    for batch in batches:
        per_class = Counter(LABELS[i] for i in batch)
        assert len(batch) == p * k and len(per_class) == p and set(per_class.values()) == {k}
        for c in per_class:  # an image repeats only in a class smaller than K
            images = [i for i in batch if LABELS[i] == c]
            assert len(set(images)) == min(k, counts[c])


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_are_disjoint_and_cover_the_epoch_plan(world):
    p, k = 3, 2
    samplers = [PKSampler(LABELS, p * k, k, num_replicas=world, rank=r, seed=5) for r in range(world)]
    for s in samplers:
        s.set_epoch(4)
    parts = [list(s) for s in samplers]
    assert len({len(part) for part in parts}) == 1 and len(parts[0]) == len(samplers[0])
    for a, b in itertools.combinations(parts, 2):
        assert not set(a) & set(b)
    plan = samplers[0].epoch_plan()
    assert len(plan) % world == 0 and all(s.epoch_plan() == plan for s in samplers)  # same plan on every rank
    assert sorted(i for part in parts for i in part) == sorted(i for batch in plan for i in batch)
    # the plan leaves out few images: per class at most the remainder mod K, plus what does not fit
    used = {i for batch in plan for i in batch}
    assert len(used) >= 0.6 * len(LABELS)


def test_deterministic_per_epoch_and_same_length_every_epoch():
    a = PKSampler(LABELS, 8, 4, num_replicas=2, rank=1, seed=7)
    b = PKSampler(LABELS, 8, 4, num_replicas=2, rank=1, seed=7)
    lengths = set()
    for epoch in range(4):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert list(a) == list(b)
        lengths.add(len(list(a)))
    assert lengths == {len(a)}
    first = list(a.batches())
    a.set_epoch(0)
    assert list(a.batches()) != first  # epochs differ
    assert list(PKSampler(LABELS, 8, 4, num_replicas=2, rank=1, seed=8)) != list(a)


def test_max_batches_matches_brute_force_and_plan_reaches_it():
    rng = random.Random(0)
    for _ in range(30):
        chunks = [rng.randint(1, 6) for _ in range(rng.randint(2, 7))]
        p = rng.randint(1, len(chunks))
        brute = max(b for b in range(sum(chunks) + 1) if sum(min(c, b) for c in chunks) >= p * b)
        assert max_pk_batches(chunks, p) == brute
        labels = [c for c, n in enumerate(chunks) for _ in range(2 * n)]  # K = 2: n groups per class
        sampler = PKSampler(labels, 2 * p, 2, num_replicas=1, rank=0, seed=1)
        assert len(sampler.epoch_plan()) == brute


def test_too_few_classes_and_bad_sizes():
    assert len(PKSampler([0, 0, 1, 1], 6, 2, num_replicas=1, rank=0)) == 0  # 3 classes wanted, 2 exist
    with pytest.raises(ValueError, match="multiple of K"):
        PKSampler(LABELS, 7, 2, num_replicas=1, rank=0)


def _spawned_rank(rank, world, init_file, out_dir, labels):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sampler = PKSampler(labels, 6, 3, seed=11)  # rank and world from the process group
        sampler.set_epoch(2)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"rank": sampler.rank, "world": sampler.num_replicas, "indices": list(sampler)}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.dist
def test_two_gloo_processes_split_the_epoch(tmp_path):
    mp.spawn(_spawned_rank, args=(2, str(tmp_path / "init"), str(tmp_path), LABELS), nprocs=2, join=True)
    got = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert [g["rank"] for g in got] == [0, 1] and {g["world"] for g in got} == {2}
    a, b = (g["indices"] for g in got)
    assert a and len(a) == len(b) and not set(a) & set(b)
    reference = PKSampler(LABELS, 6, 3, num_replicas=2, rank=0, seed=11)
    reference.set_epoch(2)
    assert sorted(a + b) == sorted(i for batch in reference.epoch_plan() for i in batch)


def test_loader_uses_pk_batches(tiny_data, tmp_path):
    from metric.config import load_cfg
    from metric.datasets.loader import build_train_loader

    opts = tiny_opts(
        tiny_data, str(tmp_path), **{"TRAIN.SAMPLER": "pk", "TRAIN.NUM_INSTANCES": 2, "TRAIN.BATCH_SIZE": 8}
    )
    cfg = load_cfg(None, opts)
    loader = build_train_loader(cfg, rank=1, world_size=2)
    assert isinstance(loader.sampler, PKSampler) and len(loader) == 4  # 32 images in 8 batches, 2 ranks
    loader.sampler.set_epoch(1)
    indices = list(loader.sampler)
    labels = [loader.dataset.items[i][1] for i in indices]
    for start in range(0, len(labels), 4):
        assert sorted(Counter(labels[start : start + 4]).values()) == [2, 2]
    _, batch_labels, _, _ = next(iter(loader))
    assert batch_labels.tolist() == labels[:4]
    with pytest.raises(ConfigError, match="TRAIN.BATCH_SIZE=8 gives 2 images per process"):
        build_train_loader(cfg, rank=0, world_size=4)


@pytest.mark.slow
@pytest.mark.dist
def test_two_process_training_with_pk_sampler_and_triplet_only(tiny_data, tmp_path):
    """DDP with only a pairwise loss: the classifier gets a zero gradient, ranks stay identical."""
    from metric.utils.logger import read_stats

    port = free_port()
    out = str(tmp_path / "run")
    opts = tiny_opts(
        tiny_data,
        out,
        **{
            "TEST.DATASET": "",
            "TRAIN.SAMPLER": "pk",
            "TRAIN.NUM_INSTANCES": 2,
            "MODEL.LOSSES.NAME": "triplet",
            "OPTIM.MAX_EPOCH": 1,
        },
    )
    run_py(
        [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "tools/train_metric.py",
            *opts,
        ],
        check=True,
    )
    stats = os.path.join(out, "stats.jsonl")
    final = read_stats(stats, "final")[-1]
    assert len(final["weights_digests"]) == 2 and len(set(final["weights_digests"])) == 1
    epoch = read_stats(stats, "train_epoch")[-1]
    assert epoch["loss"] == pytest.approx(epoch["loss_triplet"]) and epoch["loss_triplet"] > 0

"""The P x K identity sampler: batches of P classes with K images each, sharded over ranks.

Pairwise losses (triplet, circle) need positives and negatives in every batch; a random
batch from a data set with many classes has almost no positive pair. Every batch drawn by
:class:`PKSampler` holds K images of each of P different classes.
"""

import random

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

from metric.datasets.items import class_members


def max_pk_batches(chunks_per_class, p):
    """The most batches of ``p`` distinct classes that classes with ``chunks_per_class`` groups
    of K images can fill: the largest B with ``sum_c min(k_c, B) >= p * B``."""
    chunks = np.asarray(chunks_per_class, dtype=np.int64)
    lo, hi = 0, int(chunks.sum()) // p
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(np.minimum(chunks, mid).sum()) >= p * mid:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PKSampler(Sampler):
    """Indices of a data set in batches of ``batch_size = P * K`` (this rank's batch): K images
    of each of P different classes. Use it with a ``DataLoader`` of the same ``batch_size``.

    The plan of an epoch, the same on every rank (it depends only on ``seed``, the epoch set by
    :meth:`set_epoch`, the labels, P, K and the number of ranks):

    1. every class's images are shuffled and cut into groups of K; the images left over when
       a class's count is not a multiple of K are left out this epoch; a class with fewer than
       K images forms one group, filled up by drawing its images again (with replacement);
    2. the classes are shuffled and the groups dealt out in that order, round robin, to
       ``B`` batches, ``B`` being the largest multiple of the number of ranks for which every
       batch gets P groups of different classes (a class with more than ``B`` groups gives
       only ``B`` of them); groups that do not fit are left out this epoch;
    3. the batches are shuffled; rank ``r`` of ``R`` takes batches ``r, r + R, r + 2R, ...``.

    So the ranks' indices are disjoint (a repeated index only ever repeats inside the group of
    a small class), together they are exactly the epoch's plan, and every rank has the same
    number of batches, which stays the same from epoch to epoch.
    """

    def __init__(self, labels, batch_size, num_instances, num_replicas=None, rank=None, seed=0):
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if num_instances < 1 or batch_size % num_instances:
            raise ValueError(f"batch size {batch_size} is not a multiple of K={num_instances}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.batch_size, self.k, self.p = batch_size, num_instances, batch_size // num_instances
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        # Group the indices by class in numpy (a stable sort: ascending indices within a class).
        classes, order, starts = class_members(labels)
        self.classes = classes.tolist()
        self.members = [m.tolist() for m in np.split(order, starts[1:-1])] if len(order) else []
        sizes = np.diff(starts)
        chunks = np.maximum(1, sizes // self.k)
        most = max_pk_batches(chunks, self.p)
        self.num_batches = most - most % num_replicas  # over all ranks, every epoch

    def set_epoch(self, epoch):
        self.epoch = epoch

    def epoch_plan(self):
        """Every rank's batches of this epoch, in order: a list of lists of ``P * K`` indices."""
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        n_batches, k = self.num_batches, self.k
        groups = []  # per class, in class order: its groups of K indices
        for members in self.members:
            members = members[:]
            rng.shuffle(members)
            if len(members) < k:
                groups.append([members + [rng.choice(members) for _ in range(k - len(members))]])
            else:
                groups.append([members[i * k : (i + 1) * k] for i in range(len(members) // k)][:n_batches])
        order = list(range(len(groups)))
        rng.shuffle(order)
        batches = [[] for _ in range(n_batches)]
        stream = (group for c in order for group in groups[c])
        for slot, group in zip(range(n_batches * self.p), stream):
            batches[slot % n_batches].extend(group)
        rng.shuffle(batches)
        return batches

    def batches(self):
        """This rank's batches of this epoch."""
        return self.epoch_plan()[self.rank :: self.num_replicas]

    def __iter__(self):
        for batch in self.batches():
            yield from batch

    def __len__(self):
        return self.num_batches // self.num_replicas * self.batch_size

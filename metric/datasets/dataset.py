"""Image data sets read from list files."""

import logging
from collections import defaultdict

import numpy as np
from torch.utils.data import Dataset

from metric.utils.errors import DataError
from metric.datasets.transforms import decode_image

logger = logging.getLogger(__name__)

MAX_DECODE_RETRIES = 20


class ListDataset(Dataset):
    """``[(path, label)]`` -> ``(image tensor, label, failed)``.

    ``failed`` counts images that could not be decoded while producing this sample;
    it travels with the batch so callers can report it whatever the number of workers.
    A bad image is always logged. With ``on_bad="replace"`` (training) it is replaced by
    another image *of the same class*, so the label never shifts; with ``on_bad="mark"``
    (evaluation) a black image is returned with ``failed=1`` and the caller must drop it.
    Random transforms draw from a generator seeded by (seed, epoch, index).
    """

    def __init__(self, items, transform, seed=0, on_bad="replace"):
        self.items = items
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.on_bad = on_bad
        self._by_class = None
        self._bad = set()

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.items)

    @property
    def labels(self):
        return [label for _, label in self.items]

    def _class_members(self, label):
        if self._by_class is None:
            by_class = defaultdict(list)
            for i, (_, lab) in enumerate(self.items):
                by_class[lab].append(i)
            self._by_class = dict(by_class)
        return self._by_class[label]

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        path, label = self.items[index]
        im = decode_image(path) if index not in self._bad else None
        failed = 0
        while im is None:
            failed += 1
            if index not in self._bad:
                self._bad.add(index)
                logger.warning("cannot decode image %s (label %s)", path, label)
            if self.on_bad == "mark":
                im = np.zeros((32, 32, 3), dtype=np.uint8)
                break
            members = [i for i in self._class_members(label) if i not in self._bad]
            if not members or failed > MAX_DECODE_RETRIES:
                raise DataError(f"no readable image left in class {label} (last tried: {path})")
            index = members[int(rng.integers(len(members)))]
            path = self.items[index][0]
            im = decode_image(path)
        x = self.transform(im, rng)
        return x, (-1 if label is None else label), failed

"""Image data sets read from list files."""

import logging

import numpy as np
import torch
from torch.utils.data import Dataset

from metric.datasets.items import ItemList, class_members
from metric.datasets.transforms import decode_image
from metric.utils.errors import DataError
from metric.utils.imagefile import DEFAULT_MAX_PIXELS, load_image, within_budget

logger = logging.getLogger(__name__)

# Indices of unreadable images reported per sample (more are counted, not listed).
MAX_TRACKED_BAD = 4


class ListDataset(Dataset):
    """``[(path, label)]`` -> ``(image tensor, label, failed, bad)``.

    The items are held as an :class:`~metric.datasets.items.ItemList` (numpy arrays that forked
    DataLoader workers share without copying); a list of pairs is converted.

    ``failed`` counts images that could not be decoded while producing this sample and ``bad``
    holds their indices (up to :data:`MAX_TRACKED_BAD`, padded with -1); both travel with the
    batch, so callers can report and persist them whatever the number of workers. A bad image is
    logged once per process and replaced by another image *of the same class*, so the label never shifts: the
    first readable image of a permutation of
    the class drawn from the sample's generator. Which image that is depends only on (seed,
    epoch, index) and which files are readable; the set of bad images already known
    (:meth:`add_known_bad`, e.g. restored from a checkpoint) only saves decoding them again.
    Random transforms draw from the same generator.

    ``max_pixels`` (``DATA_LOADER.MAX_IMAGE_PIXELS``): an image whose header gives more pixels is
    not decoded and counts as unreadable. What the image library says about a file it could
    decode (a corrupt JPEG) is logged once per process with the file's name.
    """

    def __init__(self, items, transform, seed=0, max_pixels=DEFAULT_MAX_PIXELS):
        self.items = ItemList.from_pairs(items)
        self.transform = transform
        self.seed = seed
        self.max_pixels = max_pixels
        self.epoch = 0
        self._by_class = None
        self._bad = set()
        self._logged = set()

    def set_epoch(self, epoch):
        self.epoch = epoch

    def add_known_bad(self, indices):
        """Indices of images known to be unreadable (they are not decoded again)."""
        self._bad.update(int(i) for i in indices)

    def __len__(self):
        return len(self.items)

    @property
    def labels(self):
        """The labels, an int32 numpy array (-1 where an item has none)."""
        return self.items.labels

    def indices_of(self, paths):
        """``{path: index}`` of those ``paths`` that are items of this data set."""
        return self.items.index_of(paths)

    def _class_members(self, label):
        """Indices of the items of class ``label``, ascending (an int64 array)."""
        if self._by_class is None:
            classes, order, starts = class_members(self.items.labels)
            self._by_class = (classes, order, starts)
        classes, order, starts = self._by_class
        j = int(np.searchsorted(classes, -1 if label is None else label))
        return order[starts[j] : starts[j + 1]]

    def _decode(self, index):
        """The image at ``index``, or ``None`` (logged once) if it cannot be decoded."""
        if index in self._bad:
            return None
        im, note = load_image(self.items.path(index), self.max_pixels)
        if im is None:
            self._bad.add(index)
        if note and index not in self._logged:
            self._logged.add(index)
            if im is None:
                logger.warning("cannot decode image %s (label %s): it %s", *self.items[index], note)
            else:
                logger.info("image %s (label %s): %s", *self.items[index], note)
        return im

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        label = self.items.label(index)
        bad = []
        im = self._decode(index)
        if im is None:
            bad.append(index)
            for other in rng.permutation(self._class_members(label)):
                if other == index:
                    continue
                im = self._decode(int(other))
                if im is not None:
                    break
                bad.append(int(other))
            if im is None:
                raise DataError(
                    f"no readable image left in class {label} ({len(bad)} images, e.g. {self.items.path(index)})"
                )
        x = self.transform(im, rng)
        tracked = torch.full((MAX_TRACKED_BAD,), -1, dtype=torch.long)
        tracked[: min(len(bad), MAX_TRACKED_BAD)] = torch.tensor(bad[:MAX_TRACKED_BAD], dtype=torch.long)
        return x, (-1 if label is None else label), len(bad), tracked


# Leading bytes of common image files (JPEG, PNG, GIF, BMP, TIFF; WebP is RIFF....WEBP).
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def looks_like_image(path):
    """True if the file starts like an image file (a cheap check: 16 bytes are read)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    return head.startswith(_IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def check_readable_classes(items, source, max_report=5, max_pixels=DEFAULT_MAX_PIXELS):
    """Raise :class:`DataError` naming the classes of ``[(path, label)]`` none of whose images
    can be read, before training starts (else the run would stop mid-epoch with "no readable
    image left in class N"). Cheap: per class, images are tried until one starts like an image
    file (usually the first: one 16-byte read per class); a file that does not is decoded, in
    case it is a format the header check does not know. An image with a good header but broken
    data is still found only while training (and replaced by another of its class). An image
    whose header gives more than ``max_pixels`` pixels is not readable."""
    items = ItemList.from_pairs(items)
    classes, order, starts = class_members(items.labels)
    first_seen = np.argsort(order[starts[:-1]], kind="stable")  # classes in order of first appearance
    bad = []
    for j in first_seen:
        members = order[starts[j] : starts[j + 1]]
        if not any(
            (looks_like_image(p) and within_budget(p, max_pixels)) or decode_image(p, max_pixels) is not None
            for p in map(items.path, members)
        ):
            bad.append((items.label(int(members[0])), members))
    if bad:
        label, paths = bad[0]
        more = ""
        if len(bad) > 1:
            shown = ", ".join(str(lab) for lab, _ in bad[1 : 1 + max_report])
            etc = ", ..." if len(bad) > 1 + max_report else ""
            more = f"; {len(bad) - 1} more class(es) have none either: {shown}{etc}"
        raise DataError(
            f"class {label} of {source} has no readable image: none of its {len(paths)} image(s) can be decoded "
            f"(e.g. {items.path(int(paths[0]))}){more}; replace the images or remove the class's lines"
        )

"""Compact lists of ``(path, label)`` items, held in a few numpy arrays.

A training list of GLDv2-full has 4.13M lines. As a Python list of ``(path, label)`` tuples it
costs about 8 objects per line (~0.5 GB) and, worse, every forked DataLoader worker slowly
copies those pages as reference counts are touched. :class:`ItemList` holds the same items in
three arrays (the UTF-8 bytes of all paths in one buffer, their int64 offsets, int32 labels),
which forked workers share without copying, and it parses a list file in numpy
(:func:`parse_simple_list`) instead of line by line.

An ``ItemList`` behaves like the list it replaces: ``len``, ``items[i] -> (path, label)``,
iteration over ``(path, label)``, slicing (another ``ItemList``), ``+`` with a list or an
``ItemList``, equality with a list of tuples. Paths are stored as written in the list file
and joined to ``root`` on access (``os.path.join``, so absolute entries stay as they are).
A missing label (a list read ``with_labels=False``) is ``None``.
"""

import os

import numpy as np

_INT32 = np.iinfo(np.int32)


def _compact_labels(values):
    """int32 when every label fits (always, in practice), else int64."""
    values = np.asarray(values, dtype=np.int64)
    if values.size and (values.min() < _INT32.min or values.max() > _INT32.max):
        return values
    return values.astype(np.int32)


class ItemList:
    """``(path, label)`` items in numpy arrays (see the module doc).

    ``data``: uint8 buffer of the UTF-8 paths; ``offsets``: int64 [n + 1] (path ``i`` is
    ``data[offsets[i]:offsets[i + 1]]``); ``labels``: int32 [n]; ``missing``: bool [n] marking
    items without a label (``None`` when every item has one); ``root``: joined to each path.
    """

    __slots__ = ("data", "offsets", "labels", "missing", "root")

    def __init__(self, data, offsets, labels, missing=None, root=""):
        self.data = np.asarray(data, dtype=np.uint8)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.labels = _compact_labels(labels)
        self.missing = None if missing is None or not np.any(missing) else np.asarray(missing, dtype=bool)
        self.root = root
        if self.offsets.shape != (len(self.labels) + 1,):
            raise ValueError(f"{len(self.offsets)} offsets for {len(self.labels)} labels; need one more")

    # -- construction ---------------------------------------------------------------

    @classmethod
    def from_pairs(cls, pairs, root=""):
        """From ``[(path, label)]`` (label ``None`` for none)."""
        if isinstance(pairs, ItemList):
            return pairs
        encoded, labels, missing = [], [], []
        for path, label in pairs:
            encoded.append(os.fspath(path).encode("utf-8", "surrogateescape"))
            labels.append(-1 if label is None else int(label))
            missing.append(label is None)
        lengths = np.fromiter((len(b) for b in encoded), np.int64, len(encoded))
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        data = np.frombuffer(b"".join(encoded), np.uint8)
        return cls(data, offsets, np.asarray(labels, np.int64), np.asarray(missing, bool), root)

    # -- access ------------------------------------------------------------------------

    def __len__(self):
        return len(self.labels)

    def raw_path(self, i):
        """Path ``i`` as written in the list (not joined to ``root``)."""
        return self.data[self.offsets[i] : self.offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")

    def path(self, i):
        return os.path.join(self.root, self.raw_path(i))

    def label(self, i):
        if self.missing is not None and self.missing[i]:
            return None
        return int(self.labels[i])

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            n = len(self.labels)
            if i < 0:
                i += n
            if not 0 <= i < n:
                raise IndexError(f"item {i} out of range for {n} items")
            start, stop = self.offsets[i : i + 2].tolist()
            path = os.path.join(self.root, self.data[start:stop].tobytes().decode("utf-8", "surrogateescape"))
            missing = self.missing is not None and self.missing[i]
            return path, (None if missing else int(self.labels[i]))
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        return self.take(np.asarray(i))

    def __iter__(self):
        data, offsets, root = self.data.tobytes(), self.offsets.tolist(), self.root
        labels = self.labels.tolist()
        missing = self.missing
        for i, label in enumerate(labels):
            path = os.path.join(root, data[offsets[i] : offsets[i + 1]].decode("utf-8", "surrogateescape"))
            yield path, (None if missing is not None and missing[i] else label)

    def take(self, indices):
        """The items at ``indices`` (an integer array or a boolean mask), as a new ItemList."""
        indices = np.asarray(indices)
        if indices.dtype == bool:
            indices = np.flatnonzero(indices)
        indices = indices.astype(np.int64, copy=False)
        if indices.size and (indices.min() < -len(self) or indices.max() >= len(self)):
            raise IndexError(f"item index out of range for {len(self)} items")
        indices = indices % max(1, len(self))
        starts, stops = self.offsets[indices], self.offsets[indices + 1]
        lengths = stops - starts
        offsets = np.zeros(len(indices) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if len(indices) and np.all(indices[1:] == indices[:-1] + 1):  # a contiguous range: one slice
            data = self.data[starts[0] : stops[-1]].copy()
        else:
            # Byte positions: for each byte of the result, its position in self.data.
            pos = np.arange(offsets[-1], dtype=np.int64) + np.repeat(starts - offsets[:-1], lengths)
            data = self.data[pos]
        missing = None if self.missing is None else self.missing[indices]
        return ItemList(data, offsets, self.labels[indices], missing, self.root)

    # -- combination and comparison ----------------------------------------------------

    def _absolute(self):
        """The same items with ``root`` joined into the stored paths (``root`` becomes "")."""
        if not self.root:
            return self
        return ItemList.from_pairs(list(self))

    def __add__(self, other):
        if not isinstance(other, ItemList):
            other = ItemList.from_pairs(other)
        a, b = (self, other) if self.root == other.root else (self._absolute(), other._absolute())
        data = np.concatenate([a.data, b.data])
        offsets = np.concatenate([a.offsets[:-1], b.offsets + a.offsets[-1]])
        labels = np.concatenate([a.labels.astype(np.int64), b.labels.astype(np.int64)])
        missing = np.concatenate([a.missing_mask(), b.missing_mask()])
        return ItemList(data, offsets, labels, missing, a.root)

    def __radd__(self, other):
        return ItemList.from_pairs(other) + self

    def missing_mask(self):
        return np.zeros(len(self), bool) if self.missing is None else self.missing

    def __eq__(self, other):
        if isinstance(other, (ItemList, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None

    def __repr__(self):
        return f"ItemList({len(self)} items, {self.data.nbytes} path bytes, root={self.root!r})"

    # -- lookups -----------------------------------------------------------------------

    def index_of(self, paths):
        """``{path: index}`` of those ``paths`` (as :meth:`path` gives them) that are items;
        the first item when a path repeats. Searches the byte buffer, no per-item objects."""
        buf = self.data.tobytes()
        found = {}
        for p in paths:
            candidates = {p}
            if self.root:
                rel = os.path.relpath(p, self.root) if os.path.isabs(p) == os.path.isabs(self.root) else p
                candidates.add(rel)
            for raw in candidates:
                needle = raw.encode("utf-8", "surrogateescape")
                start = buf.find(needle)
                while start >= 0 and p not in found:
                    i = int(np.searchsorted(self.offsets, start, side="right")) - 1
                    if self.offsets[i] == start and self.offsets[i + 1] == start + len(needle) and self.path(i) == p:
                        found[p] = i
                    start = buf.find(needle, start + 1)
        return found


def class_members(labels):
    """``(classes, order, starts)`` of an array of labels: the distinct labels (ascending), the
    indices sorted by label (ascending index within a class) and where each class starts in
    ``order`` (``starts[j]:starts[j + 1]``, with ``starts[-1] == len(labels)``)."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    classes, first = np.unique(labels[order], return_index=True)
    return classes, order, np.append(first, len(labels)).astype(np.int64)


# ----------------------------------------------------------------------------- parsing


def parse_simple_list(raw, root, with_labels=True, num_classes=None):
    """Parse the bytes of a list file in numpy; ``None`` when the file needs the line-by-line
    reader (anything unusual: a malformed line, a label that is not plain digits, a non-ASCII
    space, ...), which then gives the exact error message or result.

    Accepts what the line reader accepts in the common case: lines of ``path label`` (or
    ``path`` alone without labels) separated by ASCII spaces/tabs, blank lines, ``\\r\\n`` ends.
    """
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if not raw.isascii():
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None  # the line reader names the line and byte
        if any(ch.isspace() and ch not in "\n" and ord(ch) > 127 for ch in set(text)):
            return None  # a non-ASCII space separates fields for str.split(): leave it to the line reader
        if "\ufeff" in text:
            return None
    arr = np.frombuffer(raw, np.uint8)
    if arr.size == 0:
        return None
    # Separators (line ends included): the bytes <= 32, once the few control bytes among them
    # are known to be spaces for str.split() (else the line reader decides).
    # The ASCII bytes str.split() separates on are exactly the bytes <= 32 except 0-8 and 14-27.
    space = arr <= 32
    if (arr < 9).any() or ((arr > 13) & (arr < 28)).any():  # control bytes that are not spaces
        return None
    # Token boundaries: where space[i] != space[i + 1], alternately the start of a token (at
    # i + 1) and its end (exclusive, at i + 1); a separator is put before and after the bytes.
    change = np.flatnonzero(np.diff(space.view(np.int8))) + 1
    if not space[0]:
        change = np.concatenate([[0], change])
    if not space[-1]:
        change = np.append(change, arr.size)
    starts, ends = change[0::2], change[1::2]
    del space, change
    if starts.size == 0:
        return None
    line_of = np.searchsorted(np.flatnonzero(arr == 10), starts)  # 0-based line of each token
    first = np.ones(starts.size, bool)  # the first token of its line: a path
    first[1:] = line_of[1:] != line_of[:-1]
    line_start = np.flatnonzero(first)
    tokens_per_line = np.diff(np.append(line_start, starts.size))
    if with_labels:
        if np.any(tokens_per_line != 2):
            return None
    elif np.any(tokens_per_line > 2):
        return None
    del line_of
    path_starts, path_ends = starts[first], ends[first]
    n = path_starts.size
    has_label = tokens_per_line == 2
    labels = np.full(n, -1, np.int64)
    lab_tok = line_start[has_label] + 1
    if lab_tok.size:
        ls, width = starts[lab_tok], ends[lab_tok] - starts[lab_tok]
        if width.max() > 18:
            return None  # int64 overflow territory: the line reader
        values = np.zeros(lab_tok.size, np.int64)
        for j in range(int(width.max())):  # column j from the left, of the tokens at least j + 1 wide
            live = np.flatnonzero(width > j) if j else slice(None)
            d = arr[ls[live] + j]
            if np.any((d < 48) | (d > 57)):
                return None  # not plain ASCII digits (a sign, '_', letters): the line reader decides
            values[live] = values[live] * 10 + (d.astype(np.int64) - 48)
        labels[has_label] = values
    if with_labels and num_classes is not None and labels.size and labels.max() >= num_classes:
        return None
    # The path bytes, concatenated: a mask of the bytes inside path tokens.
    span = np.zeros(arr.size + 1, np.int8)
    span[path_starts] = 1  # tokens are separated: no position is both a start and an end
    span[path_ends] = -1
    inside = np.cumsum(span[:-1], dtype=np.int8).astype(bool)
    del span
    data = arr[inside]
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(path_ends - path_starts, out=offsets[1:])
    return ItemList(data, offsets, labels, None if with_labels else ~has_label, root)


def release_free_memory():
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    The parse's temporaries are several times the size of the result; glibc keeps the freed heap
    pages, which would then count in this process's RSS and be inherited by every forked
    DataLoader worker (whose own allocations would copy them)."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass

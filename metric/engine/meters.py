"""Meters of the training loop (pycls style): averages of per-iteration scalars, and timers.

One :class:`ScalarMeter` covers the iterations since the last log line, another the whole
epoch; :class:`IterTimer` splits each iteration into waiting for data and the rest;
:class:`RunClock` counts the iterations of the run for the ETA.
"""

import time


class ScalarMeter:
    """Sums of named scalars added once per iteration, and their means over those iterations."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums, self.count = {}, 0

    def add(self, values):
        """Add one iteration's ``{name: number}``."""
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.count += 1

    def mean(self, name):
        return self.sums[name] / self.count

    def rate(self, amount, seconds):
        """``sum(amount) / sum(seconds)``, e.g. images per second over the iterations added."""
        return self.sums[amount] / max(self.sums[seconds], 1e-9)


class Timer:
    """Seconds since construction or the last :meth:`reset`."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.start = time.time()

    def seconds(self):
        return time.time() - self.start


class IterTimer:
    """Per-iteration times, measured from the end of the previous iteration (or construction)."""

    def __init__(self):
        self.last = time.time()

    def data_loaded(self):
        """Seconds spent waiting for the current batch."""
        return time.time() - self.last

    def iteration_done(self):
        """Seconds the whole iteration took (data included); the next one starts now."""
        now = time.time()
        seconds, self.last = now - self.last, now
        return seconds


class RunClock:
    """Wall time and iterations since :meth:`start`: the average iteration time gives the ETA."""

    def __init__(self):
        self.start()

    def start(self):
        self.started, self.iters = time.time(), 0

    def tick(self):
        """Count one finished iteration."""
        self.iters += 1

    def elapsed(self):
        return time.time() - self.started

    def eta(self, iters_left):
        """Seconds for ``iters_left`` more iterations at the average pace so far."""
        return self.elapsed() / max(self.iters, 1) * iters_left

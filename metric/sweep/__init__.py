"""Sweeps: many training runs as one experiment (``docs/SWEEPS.md``).

A sweep config (:mod:`metric.sweep.config`) names a base training config, samplers for some of its
keys, seeds and constraints. ``tools/sweep_setup.py`` writes one complete training config per run
(:mod:`metric.sweep.setup`), ``tools/sweep_launch.py`` runs them (:mod:`metric.sweep.local`, or
SLURM: :mod:`metric.sweep.slurm`; each run is :func:`metric.sweep.run.run_job`, its state in
:mod:`metric.sweep.jobs`), ``tools/sweep_collect.py`` gathers what the runs recorded
(:mod:`metric.sweep.collect`) and ``tools/sweep_analyze.py`` writes ``analysis.html``
(:mod:`metric.sweep.analyze`). Nothing is imported here: each tool imports what it uses.
"""

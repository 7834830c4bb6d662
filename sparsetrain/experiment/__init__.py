"""`python -m sparsetrain.experiment DATASET --eps 0.2 ...`: the DSD2 study, reproducible and resumable.

The study composes the engine (sparse layers) and the pruning rules. Modules, bottom up:
files (atomic writes) -> metrics (reading runs) -> early_stop (Algorithm 2) -> datasets, data
(splits, noise, batches) -> models (resnet) -> train (epoch, KD loss) -> entropy (Eq. 1), flops ->
checkpoint -> config (presets as data, the CLI) -> loop (Algorithm 1 for one model) -> report/
(tables, labels, plots) -> study (the seeds and phases, main). `main` and `run_study` load lazily,
so parsing arguments does not import the whole study.
"""
import importlib

__all__ = ["main", "run_study"]


def __getattr__(name):
    if name in __all__:
        return getattr(importlib.import_module("sparsetrain.experiment.study"), name)
    raise AttributeError(f"module 'sparsetrain.experiment' has no attribute {name!r}")

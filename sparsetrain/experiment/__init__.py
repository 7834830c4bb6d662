"""`python -m sparsetrain.experiment DATASET --eps 0.2 ...`: the DSD2 study, reproducible and resumable.

The study composes the engine (sparse layers) and the pruning rules. Modules, bottom up:
files (atomic writes) -> metrics (reading runs) -> early_stop (Algorithm 2) -> datasets, data
(splits, noise, batches) -> models (resnet) -> train (epoch, KD loss) -> entropy (Eq. 1), flops ->
checkpoint -> config (presets as data, the CLI) -> loop (Algorithm 1 for one model) -> report/
(tables, labels, plots) -> study (the seeds and phases, main). `main` and `run_study` load lazily,
so parsing arguments does not import the whole study. `config_for(dataset, profile, **settings)` is the
Config the command would run (presets applied), for `run_study`.
"""
import importlib

__all__ = ["main", "run_study", "config_for"]
_HOME = {"main": "study", "run_study": "study", "config_for": "config_resolve"}


def __getattr__(name):
    if name in __all__:
        return getattr(importlib.import_module(f"sparsetrain.experiment.{_HOME[name]}"), name)
    raise AttributeError(f"module 'sparsetrain.experiment' has no attribute {name!r}")

"""`python -m sparsetrain.experiment DATASET --eps 0.2 ...`: the DSD2 study, reproducible and resumable.

The study composes the engine (sparse layers) and the pruning rules. Modules, bottom up:
files (atomic writes) -> metrics (reading runs) -> early_stop (Algorithm 2) -> datasets, data
(splits, noise, batches) -> models -> train (epoch, KD loss) -> entropy (Eq. 1), flops ->
checkpoint -> config (presets as data, the CLI) -> loop (Algorithm 1 for one model) -> report/
(tables, labels, plots) -> study (the seeds and phases, main).
"""
from .study import main, run_study

__all__ = ["main", "run_study"]

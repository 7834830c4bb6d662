"""Sweeps: the paper's grids (eps x seeds x teachers x ...) as ordinary experiment runs on Ray, and
the aggregation of any run directories into the paper's multi-run tables and figures.

    python -m sparsetrain.sweep paper-eps --profile quick        # a recipe
    python -m sparsetrain.sweep grid --dataset mnist --eps 0.1 0.5 --seeds 0 1
    python -m sparsetrain.sweep report sweeps/runs               # tables and figures only

The layer above the experiment: it composes experiment runs and reads their directories; nothing
below imports it. plan.py expands a grid into runs with dependencies, runner.py executes them on
Ray, aggregate.py / figures.py / report.py write the multi-run report, recipes.py holds the grids.
"""

"""`python -m sparsetrain ...` is `python -m sparsetrain.experiment ...`."""
import runpy

runpy.run_module("sparsetrain.experiment", run_name="__main__", alter_sys=True)

"""Merge a sweep's HDF5 logs: python jobs/collect_results.py eval_results/SWEEP. Flags: CollectArgs."""
from sitra.cli import main
from sitra.recipes.collect_results import CollectArgs, run

if __name__ == "__main__":
    main(CollectArgs, run, positional="sweep_dir")

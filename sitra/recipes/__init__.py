"""One module per job: its argument dataclass (`ARGS`), `run(args)` and, where it has one,
`check(args)` (bad input found before any compute)."""
import importlib

JOBS = {
    "retrain_single_block": "sitra.recipes.retrain_single_block",
    "build_retrained": "sitra.recipes.build_retrained",
    "eval_retrained": "sitra.recipes.eval_retrained",
    "collect_results": "sitra.recipes.collect_results",
}


def job_module(name: str):
    from sitra.cli import UsageError

    if name not in JOBS:
        raise UsageError(f"job {name!r}: unknown; choose from {', '.join(JOBS)}")
    return importlib.import_module(JOBS[name])

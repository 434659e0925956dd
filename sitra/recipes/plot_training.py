"""Draw the curves of a run's HDF5 log as a PNG: one panel per quantity, training and validation."""
from dataclasses import dataclass, field
from pathlib import Path

from sitra.errors import UsageError
from sitra.evaluate import curve_kind, plot_training
from sitra.results import read_log

JOB = "plot_training"


@dataclass(kw_only=True)
class PlotTrainingArgs:
    log: str | None = field(default=None, metadata={"help": "a run's HDF5 log, eval_results/RUN.h5 (also positional)"})
    output: str | None = field(default=None, metadata={"help": "PNG to write (default: the log's name with .png)"})


def run(args: PlotTrainingArgs) -> Path:
    if not args.log:
        raise UsageError("--log is required: a run's HDF5 log (eval_results/RUN.h5)")
    if not Path(args.log).is_file():
        raise UsageError(f"--log {args.log}: no such file")
    try:
        log = read_log(args.log)
    except (OSError, KeyError, ValueError) as e:
        raise UsageError(f"--log {args.log}: not a sitra run log ({type(e).__name__})") from None
    output = Path(args.output) if args.output else Path(args.log).with_suffix(".png")
    panels = plot_training(log, output)
    if not panels:
        raise UsageError(f"--log {args.log}: holds no training or evaluation curves (loss, accuracy, perplexity)")
    kinds = ", ".join(dict.fromkeys(curve_kind(p) for p in panels))
    print(f"{kinds} curves of {log['attrs'].get('run_name', args.log)}: {output} (a panel each: {', '.join(panels)})")
    return output


ARGS = PlotTrainingArgs

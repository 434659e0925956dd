"""Merge the HDF5 logs of a sweep into one table: HDF5, CSV, Markdown and a heatmap."""
import csv
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from sitra.errors import UsageError
from sitra.evaluate import heatmap
from sitra.results import atomic_write, sweep_rows, write_h5


@dataclass(kw_only=True)
class CollectArgs:
    sweep_dir: str = field(metadata={"help": "a sweep folder of HDF5 logs, e.g. eval_results/retrain_single_block"})
    metric: str | None = field(default=None, metadata={
        "help": "metric of the heatmap (default: block_mse, model/mlm_accuracy or model/hidden_cosine, eval_loss)"})
    output: str | None = field(default=None, metadata={"help": "file stem of the merged files (default: SWEEP_DIR/results)"})


def run(args: CollectArgs) -> Path:
    sweep_dir = Path(args.sweep_dir)
    if not sweep_dir.is_dir():
        raise UsageError(f"--sweep_dir {sweep_dir}: no such folder")
    rows, axes, problems = sweep_rows(sweep_dir)
    if not rows:
        raise UsageError(f"--sweep_dir {sweep_dir}: no HDF5 logs and no sweep.json there")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    metrics = [c for c in columns if c not in axes and c not in ("run_name", "status", "job_id")]
    metric = args.metric or next((m for m in ("block_mse", "model/mlm_accuracy", "model/hidden_cosine", "eval_loss")
                                  if m in columns), None)
    if args.metric and args.metric not in columns:
        raise UsageError(f"--metric {args.metric}: not in the logs; choose from {', '.join(metrics)}")
    stem = Path(args.output) if args.output else sweep_dir / "results"

    def fill_h5(f):
        f.attrs["axes"] = axes
        f.attrs["problems"] = problems
        for c in columns:
            values = [r.get(c) for r in rows]
            if all(isinstance(v, (int, float, np.floating)) or v is None for v in values):
                f[c] = np.array([np.nan if v is None else v for v in values], dtype="f8")
            else:
                f[c] = np.array(["" if v is None else str(v) for v in values], dtype=h5py.string_dtype())

    def write_csv(tmp):
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=columns)
            w.writeheader()
            w.writerows(rows)

    write_h5(stem.with_suffix(".h5"), fill_h5)
    atomic_write(stem.with_suffix(".csv"), write_csv)
    table = markdown_table(rows, columns)
    atomic_write(stem.with_suffix(".md"), lambda tmp: tmp.write_text(table + "\n"))
    complete = [r for r in rows if r["status"] == "complete"]
    plot = None
    if metric and complete and axes:
        plot = stem.with_name(f"{stem.name}_{metric.replace('/', '_')}.png")
        atomic_write(plot, lambda tmp: heatmap(complete, axes, metric, tmp))
    print(table)
    print(f"{len(complete)} of {len(rows)} tasks complete; merged into {stem}.h5, .csv, .md" + (f", {plot}" if plot else ""))
    for p in problems:
        print(f"not merged: {p}")
    return stem.with_suffix(".h5")


def markdown_table(rows, columns) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


ARGS = CollectArgs

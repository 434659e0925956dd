"""Teacher versus student on the same fixed masked validation cells of a Geneformer corpus: MLM
accuracy, top-5 accuracy, perplexity and parameter count, as a table and an HDF5 log."""
from dataclasses import dataclass, field
from pathlib import Path

from sitra import models, results, runtime
from sitra.args import PlaceArgs
from sitra.data.cells import CellDataArgs, check_cell_data, eval_cell_batches
from sitra.errors import UsageError
from sitra.evaluate import evaluate_mlm, format_table

JOB = "eval_quick"


@dataclass(kw_only=True)
class EvalQuickArgs(CellDataArgs, PlaceArgs):
    teacher: str | None = field(default=None, metadata={"teacher_source": True, "help": "Geneformer teacher folder (BertForMaskedLM)"})
    student: str | None = field(default=None, metadata={"help": "student folder, e.g. checkpoints/RUN/model of distill_geneformer"})
    batch_size: int = field(default=16, metadata={"help": "cells per batch"})
    seed: int = field(default=42, metadata={"help": "seed of the masks (distill_geneformer's --seed gives its validation masks)"})
    run_name: str = field(default="eval_quick", metadata={"not_part_of_run": True, "help": "name of the results file in eval_results/"})


def check(args: EvalQuickArgs):
    for flag in ("teacher", "student"):
        if not getattr(args, flag):
            raise UsageError(f"--{flag} is required: a BertForMaskedLM folder")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size {args.batch_size}: must be at least 1")
    teacher = models.load_config(args.teacher, "--teacher")
    student = models.load_config(args.student, "--student")
    for flag, name, config in (("--teacher", args.teacher, teacher), ("--student", args.student, student)):
        if not models.has_mlm_head(config):
            raise UsageError(f"{flag} {name}: no MLM head ({config.architectures}); MLM accuracy needs a *ForMaskedLM")
    if student.vocab_size != teacher.vocab_size:
        raise UsageError(f"--student {args.student}: vocabulary of {student.vocab_size} genes, the teacher's has "
                         f"{teacher.vocab_size}; they cannot be scored on the same cells")
    cells = check_cell_data(args, teacher)
    cells["max_length"] = min(teacher.max_position_embeddings, student.max_position_embeddings)
    return cells


def run(args: EvalQuickArgs) -> dict:
    cells = check(args)
    results.check_results_place(args)
    _, eval_cells, batches = eval_cell_batches(cells, args, args.batch_size, args.seed)
    device = runtime.pick_device(args.device)
    table = evaluate_mlm({"Teacher": models.load_model(args.teacher, device, mlm=True),
                          "Student": models.load_model(args.student, device, mlm=True, flag="--student")}, batches, device)
    log_path = Path(args.storage_directory) / "eval_results" / f"{args.run_name}.h5"
    with results.RunLog(log_path, JOB, args.run_name, results.config_dict(args)) as log:
        log.complete({f"{n.lower()}/{k}": v for n, m in table.items() for k, v in m.items()} | {"cells": len(eval_cells)})
    print(f"{len(eval_cells):,} validation cells of {args.data}")
    print(format_table(table, gap=("Student", "Teacher")))
    print(f"results: {log_path}")
    return table


ARGS = EvalQuickArgs

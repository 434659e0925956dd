"""Teacher versus student on the same fixed masked validation cells of a Geneformer corpus: MLM
accuracy, top-5 accuracy, perplexity and parameter count, as a table and an HDF5 log; with
--probe_column, also how well a linear probe reads a cell annotation (e.g. cell type) from each
model's mean-pooled embeddings of the held-out cells."""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sitra import models, results, runtime
from sitra.args import PlaceArgs
from sitra.data.cells import CellDataArgs, check_cell_data, eval_cell_batches
from sitra.data.mlm import pad
from sitra.errors import UsageError
from sitra.evaluate import evaluate_mlm, format_table

JOB = "eval_quick"


@dataclass(kw_only=True)
class EvalQuickArgs(CellDataArgs, PlaceArgs):
    teacher: str | None = field(default=None, metadata={"teacher_source": True, "help": "Geneformer teacher folder (BertForMaskedLM)"})
    student: str | None = field(default=None, metadata={"help": "student folder, e.g. checkpoints/RUN/model of distill_geneformer"})
    batch_size: int = field(default=16, metadata={"help": "cells per batch"})
    seed: int = field(default=42, metadata={"help": "seed of the masks (distill_geneformer's --seed gives its validation masks)"})
    probe_column: str | None = field(default=None, metadata={
        "help": "corpus column (from tokenize_cells --obs_columns, e.g. cell_type) a logistic-regression probe predicts "
                "from each model's mean-pooled embeddings of the validation cells"})
    probe_test_fraction: float = field(default=0.3, metadata={
        "help": "share of the validation cells the probe is scored on (split by --split_seed); it is fitted on the rest",
        "bounds": {"above": 0, "below": 1}})
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
    if args.probe_column:
        check_probe(args, cells["dataset"])
    return cells


def check_probe(args: EvalQuickArgs, dataset):
    if not 0 < args.probe_test_fraction < 1:
        raise UsageError(f"--probe_test_fraction {args.probe_test_fraction}: must be in (0, 1)")
    if args.probe_column == "input_ids" or args.probe_column not in dataset.column_names:
        raise UsageError(f"--probe_column {args.probe_column}: not a column of cell annotations in the corpus (it has: "
                         f"{', '.join(dataset.column_names)}; tokenize_cells --obs_columns adds obs columns)")
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise UsageError("--probe_column needs scikit-learn (pip install scikit-learn)") from None


def probe_split(args: EvalQuickArgs, dataset, eval_cells) -> dict:
    """The probe's cells (positions in eval_cells) and labels: those with a value, split into
    train and test by --split_seed, stratified when every class has two cells."""
    from sklearn.model_selection import train_test_split

    column = dataset.data.column(args.probe_column).to_pylist()
    labels = np.array([column[i] for i in eval_cells.indices], dtype=object)
    cells = np.flatnonzero([v is not None for v in labels])
    labels = labels[cells].astype(str)
    classes, sizes = np.unique(labels, return_counts=True)
    n_test = round(args.probe_test_fraction * len(cells))
    if len(classes) < 2 or not len(classes) <= n_test <= len(cells) - len(classes):
        raise UsageError(f"--probe_column {args.probe_column}: {len(cells)} validation cells with {len(classes)} distinct "
                         "values; the probe needs two values or more and enough cells to train and test on "
                         "(raise --max_eval_cells or --validation_fraction)")
    train, test = train_test_split(np.arange(len(cells)), test_size=n_test, random_state=args.split_seed,
                                   stratify=labels if sizes.min() >= 2 else None)
    return {"cells": cells, "labels": labels, "train": train, "test": test,
            "majority": max(np.mean(labels[test] == c) for c in classes), "classes": len(classes)}


@torch.inference_mode()
def mean_pooled(model, examples, positions, pad_id: int, batch_size: int, device) -> np.ndarray:
    """[cells, hidden]: the last hidden layer averaged over each cell's genes (padding excluded)."""
    out = []
    for b in range(0, len(positions), batch_size):
        input_ids, mask = pad([examples[int(i)] for i in positions[b:b + batch_size]], pad_id)
        input_ids, mask = input_ids.to(device), mask.to(device)
        hidden = model.base_model(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
        out.append(((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).cpu().double().numpy())
    return np.concatenate(out)


def probe_accuracy(embeddings: np.ndarray, probe: dict) -> float:
    """Accuracy on the test cells of a logistic regression fitted on the train cells (features standardised)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = embeddings, probe["labels"]
    fitted = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x[probe["train"]], y[probe["train"]])
    return float(fitted.score(x[probe["test"]], y[probe["test"]]))


def run(args: EvalQuickArgs) -> dict:
    cells = check(args)
    results.check_results_place(args)
    _, eval_cells, batches = eval_cell_batches(cells, args, args.batch_size, args.seed)
    probe = probe_split(args, cells["dataset"], eval_cells) if args.probe_column else None
    device = runtime.pick_device(args.device)
    loaded = {"Teacher": models.load_model(args.teacher, device, mlm=True),
              "Student": models.load_model(args.student, device, mlm=True, flag="--student")}
    table = evaluate_mlm(loaded, batches, device)
    if probe:
        for name, model in loaded.items():
            x = mean_pooled(model, eval_cells, probe["cells"], cells["pad_id"], args.batch_size, device)
            table[name]["probe_accuracy"] = probe_accuracy(x, probe)
    log_path = Path(args.storage_directory) / "eval_results" / f"{args.run_name}.h5"
    with results.RunLog(log_path, JOB, args.run_name, results.config_dict(args)) as log:
        log.complete({f"{n.lower()}/{k}": v for n, m in table.items() for k, v in m.items()} | {"cells": len(eval_cells)}
                     | ({"probe_majority": probe["majority"], "probe_test_cells": len(probe["test"])} if probe else {}))
    print(f"{len(eval_cells):,} validation cells of {args.data}")
    if probe:
        print(f"probe_accuracy: logistic regression on mean-pooled last-layer embeddings predicts {args.probe_column} of "
              f"{len(probe['test']):,} validation cells, fitted on {len(probe['train']):,} others ({probe['classes']} values; "
              f"always guessing the commonest scores {probe['majority']:.4f})")
    print(format_table(table, gap=("Student", "Teacher")))
    print(f"results: {log_path}")
    return table


ARGS = EvalQuickArgs

"""Fine-tune a sentence classifier (the teacher of distill_classifier) from any pretrained encoder:
a new classification head, cross-entropy on the training split, the checkpoint chosen on the
validation split, the test split evaluated once with it, and a model card. (The head starts
random, so the log's step-0 evaluation is the "before" number.)"""
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from sitra import models, results, runtime
from sitra.cards import data_description, optimiser_line, write_card
from sitra.data import tasks
from sitra.data.tasks import (
    ClassifierDataArgs,
    check_classifier_data,
    check_padding,
    classification_batches,
    labelled_splits,
)
from sitra.errors import UsageError
from sitra.evaluate import classifier_table, flat, format_table, validation_scores
from sitra.models.assembly import load_weights, save_model_folder
from sitra.models.teacher import declared_labels
from sitra.train import TrainArgs, check_train_args, train

JOB = "finetune_classifier"


@dataclass(kw_only=True)
class FinetuneClassifierArgs(TrainArgs, ClassifierDataArgs):
    model: str = field(metadata={"help": "pretrained encoder (or classifier) folder or hub id; its head is made anew"})
    lr: float = field(default=5e-5, metadata={"help": "peak learning rate (AdamW)"})


def check(args: FinetuneClassifierArgs):
    check_train_args(args)
    check_classifier_data(args)
    config = models.load_config(args.model, "--model")
    models.load_tokenizer(args.model, "--model")
    return config


def run(args: FinetuneClassifierArgs):
    config = check(args)
    splits = labelled_splits(args)
    id2label = tasks.label_names(splits["train"][1])
    declared = declared_labels(args.model, config)
    if declared is not None and declared != len(id2label):
        raise UsageError(f"--model {args.model}: a classifier with {declared} labels, the training data has "
                         f"{len(id2label)} ({', '.join(id2label.values())})")
    tokenizer = models.load_tokenizer(args.model, "--model")
    check_padding(tokenizer, "--model", args.model)
    batches = classification_batches(splits, id2label, tokenizer, args.max_seq_length, args.batch_size, args.seed)
    run_ = results.open_run(args, f"{JOB}_{Path(args.model).name}_lr{args.lr:g}")
    device = runtime.pick_device(args.device)
    runtime.seed_everything(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()},
        dtype=torch.float32).to(device)

    def step_loss(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["labels"]), {}

    with results.RunLog(run_.log_path, JOB, run_.name, run_.config) as log:
        progress = train(model, batches["train"], step_loss, args, run_, log,
                         lambda: validation_scores(model, batches["validation"], device, args.select_on),
                         select="selection_error")
        model.load_state_dict(load_weights(run_.checkpoint_dir), strict=False)
        model.eval()
        output = run_.checkpoint_dir / "model"
        save_model_folder(model, tokenizer, output, JOB, own=True)
        table = classifier_table({"fine-tuned": (model, "")}, batches, device)
        log.complete(flat(table) | {"best_step": progress.best_step})
    text = format_table(table)
    write_card(output, JOB, args, f"Sentence classifier fine-tuned from {args.model}",
               [f"Made with sitra's `{JOB}` job: `{args.model}` with a new {len(id2label)}-way classification head "
                f"(labels {', '.join(id2label.values())}), trained end to end."],
               ["Loss: cross-entropy of the labels", f"Optimiser: {optimiser_line(args)}",
                f"Checkpoint: the best validation {args.select_on} (step {progress.best_step})"],
               data_description(args, len(batches["train"].examples), splits),
               "Results", text)
    print(text)
    print(f"fine-tuned classifier: {output} (model card: {output / 'README.md'}); log: {run_.log_path}")
    return run_


ARGS = FinetuneClassifierArgs

"""Distil a sequence-classification teacher into a smaller student for the same task:
L = kd_weight * T^2 * D(teacher_T || student_T) + ce_weight * CE(labels) (sitra.losses.distill_loss).
The checkpoint is chosen on the validation split; the test split is evaluated once with it. One
table: teacher, student before KD and student after KD (accuracy, macro-F1, parameters, examples/s).
The student can be ternary (1.58-bit) and the teacher 8-bit, or the teacher recorded once
(--teacher_logits: its label log-probabilities for every training example, never loaded here)."""
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForSequenceClassification

from sitra import data, losses, models, records, results, runtime
from sitra.args import (
    KDArgs,
    RecordsArgs,
    StudentInitArgs,
    check_kd,
    student_init_field,
)
from sitra.cards import data_description, gguf_lines, kept_layers_line, optimiser_line, seen_in_training, write_card
from sitra.data.tasks import (
    ClassifierDataArgs,
    check_classifier_data,
    check_padding,
    classification_batches,
    labelled_splits,
)
from sitra.errors import UsageError
from sitra.evaluate import classifier_table, flat, format_table, validation_scores
from sitra.models import lowbit
from sitra.models.assembly import load_weights, save_model_folder, save_student_before
from sitra.models.causal import student_from_teacher_layers, teacher_layer_indices
from sitra.models.teacher import TOKENIZER_FILES, declared_labels, is_classifier, is_gguf
from sitra.train import TrainArgs, check_train_args, train

JOB = "distill_classifier"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(kw_only=True)
class DistillClassifierArgs(TrainArgs, ClassifierDataArgs, KDArgs, RecordsArgs, StudentInitArgs, lowbit.LowBitArgs):
    teacher: str | None = field(default=None, metadata={"teacher_source": True, 
        "help": "sequence-classification model folder or hub id (see finetune_classifier); or give --teacher_logits"})
    student: str | None = field(default=None, metadata={
        "help": "pretrained encoder or classifier (its head is new where it has none), or a folder with only config.json"})
    student_init: Literal["auto", "pretrained", "config", "teacher_layers"] = student_init_field(
        "auto", "auto", "pretrained", "config", "teacher_layers")


def student_source(args) -> str:
    """pretrained, config or teacher_layers: what --student_init means for this --student."""
    if args.student_init != "auto":
        return args.student_init
    if not args.student:
        return "teacher_layers"
    folder = Path(args.student)
    if folder.is_dir() and not is_gguf(args.student) and not any((folder / f).exists() for f in WEIGHT_FILES):
        return "config"
    return "pretrained"


def check(args: DistillClassifierArgs):
    """(teacher config, student source, student layers, records or None) after checking every flag."""
    check_train_args(args)
    check_classifier_data(args)
    check_kd(args)
    lowbit.check_lowbit(args)
    if not args.teacher and not args.teacher_logits:
        raise UsageError("--teacher is required (a sequence classifier), or --teacher_logits (its records made by "
                         "jobs/record_teacher.py --job distill_classifier)")
    rec = check_records(args) if args.teacher_logits else None
    teacher_config = rec.teacher_config() if rec else classifier_config(args.teacher)
    source = student_source(args)
    n_layers = teacher_config.num_hidden_layers
    layers = args.student_layers or max(1, n_layers // 2)
    if source == "teacher_layers":
        if not 1 <= layers <= n_layers:
            raise UsageError(f"--student_layers {layers}: allowed 1-{n_layers}")
        student_config = copy.deepcopy(teacher_config)
        student_config.num_hidden_layers = layers
    else:
        if not args.student:
            raise UsageError(f"--student_init {args.student_init} needs --student")
        student_config = models.load_config(args.student, "--student")
        declared = declared_labels(args.student, student_config)
        if declared is not None and declared != teacher_config.num_labels:
            raise UsageError(f"--student {args.student}: {declared} labels, the teacher has {teacher_config.num_labels}; "
                             "both must classify into the same labels")
        teacher_ids = None if has_tokenizer(args.student) else len(teacher_tokenizer(args, rec))
        if teacher_ids and student_config.vocab_size < teacher_ids:
            raise UsageError(f"--student {args.student}: has no tokenizer and its vocabulary ({student_config.vocab_size}) "
                             f"is smaller than the teacher's tokenizer ({teacher_ids})")
    lowbit.check_student_modules(student_config, args, AutoModelForSequenceClassification)
    return teacher_config, source, layers, rec


def classifier_config(teacher: str):
    """The config of --teacher, refused where it is not a sequence classifier."""
    config = models.load_config(teacher)
    if not is_classifier(config):
        raise UsageError(f"--teacher {teacher}: not a sequence classifier (architectures "
                         f"{config.architectures}); fine-tune one with jobs/finetune_classifier.py")
    return config


def check_records(args: DistillClassifierArgs) -> records.TeacherRecords:
    """The records of --teacher_logits, refused where they cannot stand in for the teacher (open_records
    refuses a --loss they cannot serve)."""
    rec = records.open_records(args, JOB)
    if student_source(args) == "teacher_layers":
        raise UsageError(f"--student_init {args.student_init}: " + ("without --student " if args.student_init == "auto" else "")
                         + "copies the teacher's layers, which --teacher_logits leaves out; give --student (pretrained "
                         "or config)")
    return rec


def teacher_tokenizer(args: DistillClassifierArgs, rec: records.TeacherRecords | None):
    return rec.tokenizer() if rec else models.load_tokenizer(args.teacher)


def teacher_examples(examples: list) -> list[tuple]:
    """What the teacher reads of each example: (its token ids, label id). These, not the student's
    ids, are what records are made from and fingerprinted by, so a student with a tokenizer of its
    own reads the records of the examples the teacher saw."""
    return [(e[2] if len(e) > 2 else e[0], e[1]) for e in examples]


def one_position(batch) -> torch.Tensor:
    """The positions a classifier distils: one per example (its sequence-classification logits)."""
    return torch.ones(len(batch["labels"]), 1, dtype=torch.bool, device=batch["labels"].device)


def teacher_pass(args: DistillClassifierArgs) -> records.TeacherPass:
    """The teacher's work of this job, for record_teacher: its logits over the labels for every
    training example, in the teacher's tokens (the held-out splits are scored on labels only)."""
    check_classifier_data(args)
    if not args.teacher:
        raise UsageError("--teacher is required: the classifier whose logits are recorded")
    config, tokenizer = classifier_config(args.teacher), models.load_tokenizer(args.teacher)
    check_padding(tokenizer, "--teacher", args.teacher)
    splits = labelled_splits(args)
    train_batches = classification_batches({"train": splits["train"]}, id2label_of(config), tokenizer, args.max_seq_length,
                                           args.batch_size, args.seed)["train"]
    return records.TeacherPass(
        parts=[("train", None, teacher_examples(train_batches.examples))], collate=train_batches.collate, scored=one_position,
        load_teacher=lambda device: models.load_model(args.teacher, device, auto=AutoModelForSequenceClassification),
        features=lambda teacher, batch: teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, None],
        head=lambda teacher: torch.nn.Identity(), tokenizer=tokenizer, config=config, vocab=config.num_labels,
        data=args.train_file or f"{args.dataset_dir} (train)")


def id2label_of(config) -> dict:
    return {int(k): v for k, v in config.id2label.items()}


def has_tokenizer(name: str) -> bool:
    return any((Path(name) / f).exists() for f in TOKENIZER_FILES) if Path(name).is_dir() and not is_gguf(name) else True


def classification_kd_loss(student_logits, teacher, labels, objective: dict, loss_name: str):
    """(loss, parts) of sitra.losses.distill_loss over a batch of [B, C] logits (one position per
    example); teacher: its logits [B, C] or its records there. parts: the label CE and the divergence."""
    every = torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
    loss, kd, ce = losses.distill_loss(student_logits, teacher, every, labels, **objective)
    return loss, {"ce": ce.detach(), loss_name: kd.detach()}


def make_student(args, source: str, layers: int, teacher, id2label: dict, device):
    labels = dict(num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()})
    if source == "teacher_layers":
        student = student_from_teacher_layers(teacher, layers)
    elif source == "pretrained":
        student = models.load_model(args.student, flag="--student", auto=AutoModelForSequenceClassification, trainable=True,
                                    dtype=torch.float32, **labels)
    else:
        config = models.load_config(args.student, "--student")
        for key, value in labels.items():
            setattr(config, key, value)
        student = AutoModelForSequenceClassification.from_config(config)
    for p in student.parameters():
        p.requires_grad_(True)
    return student.to(device).train()


def run(args: DistillClassifierArgs):
    teacher_config, source, layers, rec = check(args)
    if rec:  # the card and the log name the recorded teacher and what the records hold
        args = records.with_recorded_teacher(args, rec)
    id2label = id2label_of(teacher_config)
    splits = labelled_splits(args)
    teacher_tok = teacher_tokenizer(args, rec)
    own = source != "teacher_layers" and has_tokenizer(args.student)  # a config-only student reads the teacher's tokens
    student_tok = models.load_tokenizer(args.student, "--student") if own else teacher_tok
    same_tokens = student_tok.get_vocab() == teacher_tok.get_vocab()
    check_padding(teacher_tok, *(("--teacher_logits", args.teacher_logits) if rec else ("--teacher", args.teacher)))
    check_padding(student_tok, "--student", args.student)
    batches = classification_batches(splits, id2label, student_tok, args.max_seq_length, args.batch_size, args.seed,
                                     None if same_tokens else teacher_tok)
    train_lengths = [len(e[0]) for e in batches["train"].examples]  # in the student's tokens
    if rec:
        plain = batches["train"]
        rec.check_data("train", teacher_examples(plain.examples), "training examples")
        batches["train"] = data.Batches(records.Indexed(plain.examples), args.batch_size,
                                        records.RecordCollator(plain.collate, rec, one_position, rec.offsets("train")), seed=args.seed)
    student_name = f"{source}{layers}" if source == "teacher_layers" else f"{source}_{Path(args.student).name}"
    run_ = results.open_run(args, f"{JOB}_{student_name}_{args.loss}_{args.weights_name()}_T{args.temperature:g}" + lowbit.name_suffix(args)
                            + records.name_suffix(rec))
    device = runtime.pick_device(args.device)
    runtime.seed_everything(args.seed)
    teacher, teacher_info, prefix = None, {}, "" if same_tokens else "teacher_"
    if not rec:
        # an 8-bit teacher is loaded on the CPU in full precision, so a teacher_layers student can copy it first
        teacher = models.load_model(args.teacher, "cpu" if args.teacher_bits else device, auto=AutoModelForSequenceClassification)
    student = make_student(args, source, layers, teacher, id2label, device)
    before = copy.deepcopy(student).eval()  # "student before KD" stays full precision
    kept = teacher_layer_indices(teacher_config.num_hidden_layers, layers) if source == "teacher_layers" else None
    init = {"teacher_layers": f"{layers} of the teacher's {teacher_config.num_hidden_layers} layers "
                              f"({', '.join(map(str, kept or []))}; every k-th, as DistilBERT)",
            "pretrained": f"`{args.student}`", "config": f"random weights of `{args.student}`'s config"}[source]
    before_folder = save_student_before(before, student_tok, run_.checkpoint_dir, JOB, f"Initialised from {init}.")
    if teacher is not None:
        held_out = ({"input_ids": b[f"{prefix}input_ids"], "attention_mask": b[f"{prefix}attention_mask"]}
                    for b in batches["validation"].epoch(0))  # in the teacher's tokens
        teacher_info = lowbit.quantize_teacher(teacher, device, args, held_out)
    ternary = lowbit.prepare_student(student, args)

    def step_loss(batch):
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if rec:  # the records' one position per example
            return classification_kd_loss(s, records.from_batch(batch, rec.sampling, (slice(None), 0)), batch["labels"],
                                          args.objective(), args.loss)
        with torch.inference_mode():
            t = teacher(input_ids=batch[f"{prefix}input_ids"], attention_mask=batch[f"{prefix}attention_mask"]).logits
        return classification_kd_loss(s, t.clone(), batch["labels"], args.objective(), args.loss)

    with results.RunLog(run_.log_path, JOB, run_.name, run_.config) as log:
        log.note(**teacher_info)
        progress = train(student, batches["train"], step_loss, args, run_, log,
                         lambda: validation_scores(student, batches["validation"], device, args.select_on),
                         select="selection_error")
        student.load_state_dict(load_weights(run_.checkpoint_dir), strict=False)
        student.eval()
        output = run_.checkpoint_dir / "model"
        save_model_folder(student, student_tok, output, JOB, own=True)
        compared = {"teacher": (teacher, prefix)} if teacher is not None else {}  # from records the teacher is never loaded
        table = classifier_table(compared | {"student before KD": (before, ""), "student after KD": (student, "")}, batches, device)
        log.complete(flat(table) | {"best_step": progress.best_step} | {f"lowbit/{k}": v for k, v in teacher_info.items()})
    text = format_table(table, gap=("student after KD", "student before KD"))
    seen = seen_in_training(batches["train"], progress, train_lengths)
    write_card(output, JOB, args, f"Distilled student of {args.teacher}",
               [f"Made with sitra's `{JOB}` job: knowledge distillation of the classifier `{args.teacher}` into a "
                f"{student.config.num_hidden_layers}-layer student initialised from {init}."],
               [f"Loss: {args.describe('labels')}; dynamic padding",
                *([records.card_line(rec, "every training example (no teacher column below)", "labels")] if rec else []),
                f"Optimiser: {optimiser_line(args)}",
                f"Checkpoint: the best validation {args.select_on} (step {progress.best_step}); the test split, where given, "
                "is evaluated once with it", *([kept_layers_line(kept, teacher_config.num_hidden_layers)] if kept else []),
                *gguf_lines(args, ("teacher",) * (rec is None) + ("student",) * (source != "teacher_layers")),
                *lowbit.card_lines(output, ternary, teacher_info)],
               data_description(args, len(batches["train"].examples), splits, seen),
               f"Results ({', '.join(table)}; examples/s timed in the same run)", text)
    print(text)
    print(f"distilled student: {output} (model card: {output / 'README.md'}); log: {run_.log_path}")
    print(f"student before distillation: {before_folder}")
    return run_


ARGS = DistillClassifierArgs

"""Distil a causal-LM summarizer into a smaller one on (document, summary) pairs:
L = kd_weight * T^2 * D(teacher_T || student_T) + ce_weight * CE (sitra.losses.distill_loss) on the summary tokens (and the EOS
after them) only: the prompt and the padding carry no labels and no KD. The checkpoint is chosen
on the validation loss; greedy summaries of teacher, student before and student after KD are
scored with ROUGE-1/2/L (rouge-score, stemming on). The student can be ternary (1.58-bit) and the
teacher 8-bit, or the teacher recorded once (record_teacher --job distill_summarizer) and replaced by
its records (--teacher_logits): then it is never loaded and the ROUGE table has no teacher row."""
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM

from sitra import data, losses, models, records, results, runtime
from sitra.args import (
    KDArgs,
    RecordsArgs,
    StudentInitArgs,
    check_kd,
    student_init_field,
)
from sitra.cards import data_description, gguf_lines, kept_layers_line, optimiser_line, seen_in_training, write_card
from sitra.data import tasks
from sitra.data.mlm import LengthGroupingArgs, check_length_grouping, training_batches
from sitra.data.tasks import TaskDataArgs, check_task_data, load_splits
from sitra.errors import UsageError
from sitra.evaluate import flat, format_table, generate_summaries, rouge, rouge_config
from sitra.models import lowbit
from sitra.models.assembly import load_weights, save_model_folder, save_student_before
from sitra.models.causal import (
    final_hidden,
    lm_head,
    shared_vocab,
    student_from_teacher_layers,
    teacher_layer_indices,
)
from sitra.train import TrainArgs, check_train_args, held_out_mean, train

JOB = "distill_summarizer"
DEFAULT_TEMPLATE = "Summarize the following:\n{document}\nSummary:"
LOSS_SPLITS = ("train", "validation")  # the splits the loss runs on (and records cover); test is for ROUGE only


@dataclass(kw_only=True)
class SummaryDataArgs(TaskDataArgs):
    document_column: str = field(default="document", metadata={"help": "column of the document"})
    summary_column: str = field(default="summary", metadata={"help": "column of the reference summary"})
    prompt_template: str = field(default=DEFAULT_TEMPLATE, metadata={
        "help": "prompt around {document}; a typed \\n is a newline. Labels start after it"})
    max_prompt_length: int = field(default=384, metadata={"help": "prompt tokens at most (the document is cut, the template kept)"})
    max_summary_length: int = field(default=128, metadata={"help": "summary tokens learned at most (the EOS comes after them)"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens generated per summary for ROUGE"})
    generation_examples: int = field(default=0, metadata={
        "help": "validation/test pairs summarised for ROUGE, taken evenly (0: all)"})
    generation_batch_size: int = field(default=8, metadata={"help": "prompts per batch of greedy generation (left-padded)"})


@dataclass(kw_only=True)
class DistillSummarizerArgs(TrainArgs, SummaryDataArgs, LengthGroupingArgs, KDArgs, RecordsArgs, StudentInitArgs, lowbit.LowBitArgs):
    teacher: str | None = field(default=None, metadata={"teacher_source": True, 
        "help": "causal LM (fine-tuned for the task): folder, hub id or .gguf file (or its records: --teacher_logits)"})
    student: str | None = field(default=None, metadata={"help": "causal LM with the teacher's tokenizer (--student_init pretrained): folder, hub id or .gguf file"})
    student_init: Literal["pretrained", "teacher_layers"] = student_init_field("pretrained", "pretrained", "teacher_layers")
    loss_chunks: int = field(default=4, metadata={"help": "summary positions are cut into this many pieces for the logit losses (1: plain)"})
    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch"})


def template_of(args) -> str:
    return args.prompt_template.replace("\\n", "\n")


def check_data_flags(args):
    """One-line errors for the flags that shape the examples (the job's and its recording's)."""
    check_task_data(args)
    tasks.split_template(template_of(args))
    for flag in ("max_prompt_length", "max_summary_length"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: must be at least 1")


def summary_tokenizer(tokenizer, where: str):
    """The teacher's tokenizer, which must have an EOS to end the summaries with; it pads with
    the EOS where it has no padding token."""
    if tokenizer.eos_token_id is None:
        raise UsageError(f"{where}: its tokenizer has no EOS token to end the summaries with")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class Setup:
    """What check() learns from configs, tokenizers and records, before any weights are loaded."""
    teacher_config: object
    tokenizer: object
    layers: int
    records: records.TeacherRecords | None
    vocab_notice: str | None  # records: the student has output rows past the recorded ids


def check(args: DistillSummarizerArgs) -> Setup:
    check_train_args(args)
    check_data_flags(args)
    check_length_grouping(args)
    check_kd(args)
    lowbit.check_lowbit(args)
    if not args.teacher and not args.teacher_logits:
        raise UsageError("--teacher: required, or --teacher_logits DIR (the teacher's records from jobs/record_teacher.py)")
    rec = check_records(args) if args.teacher_logits else None
    teacher_name = f"the records at --teacher_logits {args.teacher_logits}" if rec else f"--teacher {args.teacher}"
    teacher_config = rec.teacher_config() if rec else models.load_config(args.teacher)
    tokenizer = summary_tokenizer(rec.tokenizer() if rec else models.load_tokenizer(args.teacher), teacher_name)
    layers = args.student_layers or max(1, teacher_config.num_hidden_layers // 2)
    student_config = copy.deepcopy(teacher_config)
    student_config.num_hidden_layers = layers
    notice = None
    if args.student_init == "pretrained":
        if not args.student:
            raise UsageError("--student_init pretrained needs --student")
        student_config = models.load_config(args.student, "--student")
        if not rec and student_config.vocab_size != teacher_config.vocab_size:
            raise UsageError(f"--student {args.student}: vocabulary of {student_config.vocab_size} tokens, the teacher's "
                             f"has {teacher_config.vocab_size}; distillation needs the same vocabulary")
        # records compare the first rec.vocab rows (the tokenizer's ids), so only the tokenizers must agree
        vocab, notice = shared_vocab(tokenizer.get_vocab(), models.load_tokenizer(args.student, "--student").get_vocab(),
                                     teacher_config.vocab_size, student_config.vocab_size,
                                     student=f"--student {args.student}", teacher=teacher_name)
        if rec and vocab < rec.vocab:
            raise UsageError(f"--student {args.student}: {student_config.vocab_size:,} output rows, fewer than the "
                             f"{rec.vocab:,} ids {teacher_name} hold")
        layers = student_config.num_hidden_layers
    elif not 1 <= layers <= teacher_config.num_hidden_layers:
        raise UsageError(f"--student_layers {layers}: allowed 1-{teacher_config.num_hidden_layers}")
    lowbit.check_student_modules(student_config, args, AutoModelForCausalLM)
    return Setup(teacher_config, tokenizer, layers, rec, notice if rec else None)


def check_records(args: DistillSummarizerArgs) -> records.TeacherRecords:
    """The records of --teacher_logits (open_records refuses a --loss they cannot serve), refused
    where they cannot stand in for the teacher."""
    rec = records.open_records(args, JOB)
    if args.student_init == "teacher_layers":
        raise UsageError("--student_init teacher_layers: copies the teacher's weights, which --teacher_logits leaves out; "
                         "use pretrained with --student")
    return rec


def summary_pairs(args, tokenizer) -> dict[str, tuple[list[list[int]], list[str], list[list[int]], str]]:
    """{split: (prompt ids, reference summaries, summary ids, source)}."""
    template = template_of(args)
    space = "" if template.endswith((" ", "\n")) else " "
    out = {}
    for split, (rows, source) in load_splits(args).items():
        doc = tasks.pick_column(rows, args.document_column, (), "--document_column", source)
        summ = tasks.pick_column(rows, args.summary_column, (), "--summary_column", source)
        documents, summaries = tasks.column_values(rows, doc, source), tasks.column_values(rows, summ, source)
        prompts = [tasks.encode_prompt(tokenizer, template, d, args.max_prompt_length) for d in documents]
        targets = [ids[: args.max_summary_length]
                   for ids in tokenizer([space + s for s in summaries], add_special_tokens=False)["input_ids"]]
        out[split] = (prompts, summaries, targets, source)
    return out


def summary_examples(pairs: dict, split: str, eos_id: int) -> list[tuple[list[int], list[int]]]:
    """The (input_ids, labels) examples of a split: prompt, summary, EOS."""
    prompts, _, targets, _ = pairs[split]
    return [tasks.summary_example(p, t, eos_id) for p, t in zip(prompts, targets)]


def teacher_pass(args) -> records.TeacherPass:
    """The teacher's work of this job, for record_teacher: the next-token logits at every position
    that predicts a summary token or the EOS, on the training and validation pairs."""
    check_data_flags(args)
    if not args.teacher:
        raise UsageError("--teacher: required (the teacher to record)")
    config = models.load_config(args.teacher)
    tokenizer = summary_tokenizer(models.load_tokenizer(args.teacher), f"--teacher {args.teacher}")
    pairs = summary_pairs(args, tokenizer)
    return records.TeacherPass(
        parts=[(split, None, summary_examples(pairs, split, tokenizer.eos_token_id)) for split in LOSS_SPLITS],
        collate=tasks.SummaryCollator(tokenizer.pad_token_id), scored=scored_positions,
        load_teacher=lambda device: models.load_model(args.teacher, device, auto=AutoModelForCausalLM),
        features=lambda teacher, batch: final_hidden(teacher, batch).last_hidden_state[:, :-1], head=lm_head,
        tokenizer=tokenizer, config=config, vocab=min(max(tokenizer.get_vocab().values()) + 1, config.vocab_size),
        data=args.dataset_dir or f"{args.train_file} (validation: "
        + (args.validation_file or f"{args.validation_from_train} pairs held out from it") + ")")


def scored_positions(batch) -> torch.Tensor:
    """[B, L - 1]: the positions whose next token carries a label (a summary token or the EOS)."""
    return batch["labels"][:, 1:] != -100


def student_positions(student, batch):
    """(student hidden states [N, D], next tokens [N]) at the scored positions."""
    scored = scored_positions(batch)
    return final_hidden(student, batch).last_hidden_state[:, :-1][scored], batch["labels"][:, 1:][scored]


def summary_kd_loss(student, teacher, batch, objective: dict, chunks: int = 1):
    """sitra.losses.distill_loss over the positions whose next token carries a label (the summary
    and its EOS): the prompt and the padding take no part."""
    with torch.inference_mode():
        t = final_hidden(teacher, batch).last_hidden_state[:, :-1][scored_positions(batch)]
    s, targets = student_positions(student, batch)
    every = torch.ones(len(targets), dtype=torch.bool, device=targets.device)
    return losses.chunked_distill_loss(s, lm_head(student), t.clone(), lm_head(teacher), every, targets,
                                       chunks=chunks, **objective)


def summary_record_loss(student, batch, rec: records.TeacherRecords, objective: dict, chunks: int = 1):
    """summary_kd_loss with the teacher's distribution from the batch's records (RecordCollator)
    at the same positions, on the student's first `rec.vocab` logits."""
    s, targets = student_positions(student, batch)
    every = torch.ones(len(targets), dtype=torch.bool, device=targets.device)
    recorded = tuple(batch[k][scored_positions(batch)] for k in records.RECORD_KEYS[rec.sampling])

    def record_loss(s_logits, *pieces_mask, targets=None):
        *pieces, mask = pieces_mask
        return losses.distill_loss(s_logits, records.as_teacher(rec.sampling, *pieces), mask, targets, **objective)[0]

    return losses.chunked_record_loss(record_loss, s, lambda h: lm_head(student)(h)[..., :rec.vocab], recorded, every,
                                      chunks=chunks, targets=targets)


def run(args: DistillSummarizerArgs):
    setup = check(args)
    rec, tokenizer = setup.records, setup.tokenizer
    if rec:  # the card and the log name the recorded teacher and what the records hold
        args = records.with_recorded_teacher(args, rec)
    pairs = summary_pairs(args, tokenizer)
    examples = {split: summary_examples(pairs, split, tokenizer.eos_token_id) for split in LOSS_SPLITS}
    collate = tasks.SummaryCollator(tokenizer.pad_token_id)
    collates = dict.fromkeys(LOSS_SPLITS, collate)
    train_lengths = [len(ids) for ids, _ in examples["train"]]
    if rec:
        rec.check_data("train", examples["train"], "training pairs")
        rec.check_data("validation", examples["validation"], "validation pairs")
        collates = {split: records.RecordCollator(collate, rec, scored_positions, rec.offsets(split)) for split in LOSS_SPLITS}
        examples = {split: records.Indexed(examples[split]) for split in LOSS_SPLITS}
    if setup.vocab_notice:
        print(setup.vocab_notice)
    train_batches = training_batches(args, examples["train"], args.batch_size, collates["train"], train_lengths, args.seed)
    val_batches = data.Batches(examples["validation"], args.batch_size, collates["validation"], seed=args.seed, shuffle=False)
    layers = setup.layers
    student_name = f"teacher_layers{layers}" if args.student_init == "teacher_layers" else f"pretrained_{Path(args.student).name}"
    run_ = results.open_run(args, f"{JOB}_{student_name}_{args.loss}_{args.weights_name()}_T{args.temperature:g}" + lowbit.name_suffix(args)
                            + records.name_suffix(rec))
    device = runtime.pick_device(args.device)
    runtime.seed_everything(args.seed)
    teacher = None
    if not rec:
        # an 8-bit teacher is loaded on the CPU in full precision, so a teacher_layers student can copy it first
        teacher = models.load_model(args.teacher, "cpu" if args.teacher_bits else device, auto=AutoModelForCausalLM)
    if args.student_init == "pretrained":
        student = models.load_model(args.student, flag="--student", auto=AutoModelForCausalLM, trainable=True, dtype=torch.float32)
    else:
        student = student_from_teacher_layers(teacher, layers)
    student = student.to(device).train()
    for p in student.parameters():
        p.requires_grad_(True)
    before = copy.deepcopy(student).eval()  # "student before KD" stays full precision
    kept = (teacher_layer_indices(setup.teacher_config.num_hidden_layers, layers)
            if args.student_init == "teacher_layers" else None)
    init = (f"{layers} of the teacher's {setup.teacher_config.num_hidden_layers} layers ({', '.join(map(str, kept))})"
            if kept else f"`{args.student}`")
    before_folder = save_student_before(before, tokenizer, run_.checkpoint_dir, JOB, f"Initialised from {init}.")
    teacher_info = lowbit.quantize_teacher(teacher, device, args, val_batches.epoch(0)) if teacher is not None else {}
    ternary = lowbit.prepare_student(student, args)

    def step_loss(batch):
        if rec:
            return summary_record_loss(student, batch, rec, args.objective(), args.loss_chunks), {}
        return summary_kd_loss(student, teacher, batch, args.objective(), args.loss_chunks), {}

    with results.RunLog(run_.log_path, JOB, run_.name, run_.config) as log:
        log.note(**teacher_info)
        progress = train(student, train_batches, step_loss, args, run_, log,
                         lambda: held_out_mean(step_loss, val_batches, device))
        student.load_state_dict(load_weights(run_.checkpoint_dir), strict=False)
        student.eval()
        output = run_.checkpoint_dir / "model"
        save_model_folder(student, tokenizer, output, JOB, own=True)
        # the teacher's row needs its generations: from records there is none
        compared = ({"teacher": teacher} if teacher is not None else {}) | {"student before KD": before, "student after KD": student}
        table, samples = rouge_table(compared, pairs, tokenizer, args, device)
        log.complete(flat(table) | {"best_step": progress.best_step, "rouge_use_stemmer": 1.0}
                     | {f"lowbit/{k}": v for k, v in teacher_info.items()})
    text = format_table(table, gap=("student after KD", "student before KD"))
    seen = seen_in_training(train_batches, progress, train_lengths)
    n_rouge = {s: len(pick(pairs[s][0], args.generation_examples)) for s in ("validation", "test") if s in pairs}
    write_card(output, JOB, args, f"Distilled summarizer of {args.teacher}",
               [f"Made with sitra's `{JOB}` job: knowledge distillation of the causal LM `{args.teacher}` into a "
                f"{student.config.num_hidden_layers}-layer student initialised from {init}."],
               [f"Prompt: `{template_of(args)!r}`; the summary follows it, then an EOS",
                f"Loss on summary tokens and the EOS only: {args.describe('the summary')}",
                *([records.card_line(rec, "every summary token and the EOS; the results have no teacher row (it needs the "
                                        "teacher's generations)")] if rec else []),
                f"Optimiser: {optimiser_line(args)}",
                f"Batches: {'length-grouped' if args.group_by_length else 'random'}, padded to the longest pair of the batch",
                f"Checkpoint: the lowest validation loss (step {progress.best_step})",
                f"Evaluation: greedy generation, at most {args.max_new_tokens} new tokens; {rouge_config()}; "
                + ", ".join(f"{n} {s} pairs" for s, n in n_rouge.items()),
                *([kept_layers_line(kept, setup.teacher_config.num_hidden_layers)] if kept else []),
                *gguf_lines(args, ("teacher",) * (rec is None) + ("student",) * (args.student_init == "pretrained")),
                *lowbit.card_lines(output, ternary, teacher_info)],
               data_description(args, len(train_batches.examples), pairs, seen),
               "Results (ROUGE F-measure; examples/s of greedy generation in the same run)", text,
               extra=sample_lines(samples))
    print(text)
    print(f"distilled summarizer: {output} (model card: {output / 'README.md'}); log: {run_.log_path}")
    print(f"student before distillation: {before_folder}")
    return run_


def pick(items: list, n: int) -> list:
    """n items taken evenly (all for n = 0)."""
    return items if not n or n >= len(items) else data.take_fraction(items, n / len(items))[:n]


def rouge_table(models_: dict, pairs: dict, tokenizer, args, device) -> tuple[dict, dict]:
    """({model: {split_rouge1, ..., parameters, examples_per_s}}, the validation summaries)."""
    table, samples, speeds = {n: {} for n in models_}, {}, {}
    for split in ("validation", "test"):
        if split not in pairs:
            continue
        prompts, references = pick(pairs[split][0], args.generation_examples), pick(pairs[split][1], args.generation_examples)
        for name, model in models_.items():
            summaries, speed = generate_summaries(model, prompts, tokenizer, args.max_new_tokens, args.generation_batch_size,
                                                  device, desc=f"{name} on {split}")
            table[name].update({f"{split}_{k}": v for k, v in rouge(summaries, references).items()})
            if split == "validation":
                samples[name], speeds[name] = summaries, speed
    for name, model in models_.items():
        table[name].update(parameters=sum(p.numel() for p in model.parameters()), examples_per_s=speeds[name])
    samples["reference"] = pick(pairs["validation"][1], args.generation_examples)
    return table, samples


def sample_lines(samples: dict, n: int = 2) -> list[str]:
    lines = ["## Sample validation summaries", ""]
    for i in range(min(n, len(samples["reference"]))):
        lines += [f"{i + 1}."] + [f"   - {name}: {texts[i]!r}" for name, texts in samples.items()] + [""]
    return lines


ARGS = DistillSummarizerArgs

"""Distil a Geneformer teacher (a BERT MLM over rank-value encoded genes) into a narrower student:
L = kd_weight * T^2 * D(teacher_T || student_T) + ce_weight * CE (sitra.losses.distill_loss) over the masked genes only, on
length-grouped batches of a pretokenized cell corpus, optionally with a ternary (1.58-bit) student
or an 8-bit teacher, or a teacher recorded once (--teacher_logits); the student is saved as a
BertForMaskedLM folder with a model card, and compared with the teacher on fixed masked validation
cells."""
import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from sitra import cards, losses, models, records, results, runtime
from sitra.args import KDArgs, RecordsArgs, check_kd, kd_field
from sitra.cli import command_line
from sitra.data.cells import (
    BucketedMLMCollator,
    CellDataArgs,
    bucket_sizes,
    check_cell_data,
    eval_cell_batches,
    masking,
    values_line,
)
from sitra.data.mlm import Batches, LengthGroupingArgs, MLMCollator, check_length_grouping, training_batches
from sitra.errors import UsageError
from sitra.evaluate import MLMMetrics, evaluate_mlm, format_table, masked_logits
from sitra.models import lowbit
from sitra.models.assembly import load_weights, save_model_folder, save_student_before
from sitra.models.causal import LAYER_KEY, teacher_layer_indices
from sitra.train import SCHEDULERS, TrainArgs, check_train_args, train

JOB = "distill_geneformer"


def masked_positions(batch) -> torch.Tensor:
    """The genes the job distils: the masked ones (labels set)."""
    return batch["labels"] != -100


class GeneIds:
    """The records' tokenizer of a Geneformer teacher: its cells come as gene ids already
    (tokenize_cells), so this is the ids 0..V-1 (vocab.json in the records' tokenizer/)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def get_vocab(self) -> dict:
        return {str(i): i for i in range(self.vocab_size)}

    def save_pretrained(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "vocab.json").write_text(json.dumps(self.get_vocab()))


@dataclass(kw_only=True)
class DistillGeneformerArgs(TrainArgs, CellDataArgs, LengthGroupingArgs, KDArgs, RecordsArgs, lowbit.LowBitArgs):
    ALPHA_MEANING = "kd"
    KD_DEFAULTS = (0.65, 1 - 0.65)

    teacher: str | None = field(default=None, metadata={"teacher_source": True, "help": "Geneformer folder (BertForMaskedLM config.json + weights)"})
    hidden_size: int = field(default=128, metadata={"help": "student hidden size"})
    num_hidden_layers: int = field(default=4, metadata={"help": "student layers"})
    num_attention_heads: int = field(default=4, metadata={"help": "student attention heads (must divide --hidden_size)"})
    intermediate_size: int | None = field(default=None, metadata={"help": "student feed-forward width (default: 4 x hidden)"})
    attention_dropout: float = field(default=0.0, metadata={
        "help": "student attention dropout (Geneformer's own: 0.02); above 0, PyTorch's CPU attention leaves its flash "
                "kernel and keeps batch x heads x length^2 matrices per layer for backward (2.3x the peak memory at 2,048 genes)"})
    init_from_teacher: bool = field(default=False, metadata={
        "help": "start from every k-th teacher layer and its embeddings and head (needs the teacher's hidden size)"})
    temperature: float = kd_field("temperature", 2.5)
    compile: bool = field(default=False, metadata={"help": "torch.compile the student, padding batches to a few bucket lengths"})
    bucket_sizes: list[int] = field(default_factory=list, metadata={
        "help": "padded lengths with --compile (default: 8 evenly spaced up to the teacher's max length)"})
    batch_size: int = field(default=16, metadata={"help": "cells per micro-batch on each process (device)"})
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate (AdamW)"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps"})
    lr_scheduler: Literal[SCHEDULERS] = field(default="cosine", metadata={"help": "learning-rate shape after warm-up"})


@dataclass
class Setup:
    """What check() learns from configs, the corpus and records, before any weights are loaded."""
    student_config: object
    cells: dict
    train_cells: object
    eval_cells: object
    eval_batches: Batches  # the validation cells with their fixed masks (epoch 0's)
    records: records.TeacherRecords | None


def teacher_config(args: DistillGeneformerArgs, rec: records.TeacherRecords | None = None):
    """The teacher's BertForMaskedLM config: from --teacher, or from its records."""
    config = rec.teacher_config() if rec else models.load_config(args.teacher)
    if config.model_type != "bert" or not models.has_mlm_head(config):
        raise UsageError(f"--teacher {args.teacher}: a {config.model_type} {config.architectures}; "
                         "Geneformer distillation needs a BertForMaskedLM")
    return config


def check(args: DistillGeneformerArgs) -> Setup:
    """Every check on the flags, before any compute."""
    from transformers import AutoModelForMaskedLM

    check_train_args(args)
    check_kd(args)
    lowbit.check_lowbit(args)
    if not args.teacher and not args.teacher_logits:
        raise UsageError("--teacher or --teacher_logits is required: a Geneformer (BertForMaskedLM) folder, or records "
                         f"of one (jobs/record_teacher.py --job {JOB})")
    rec = check_records(args) if args.teacher_logits else None
    config = teacher_config(args, rec)
    student = student_config(config, args)
    lowbit.check_student_modules(student, args, AutoModelForMaskedLM)
    check_length_grouping(args)
    if args.bucket_sizes and not args.compile:
        raise UsageError("--bucket_sizes only applies with --compile")
    too_long = [b for b in args.bucket_sizes if not 1 <= b <= config.max_position_embeddings]
    if too_long:
        raise UsageError(f"--bucket_sizes {too_long[0]}: allowed 1-{config.max_position_embeddings} (the teacher's max length)")
    if args.init_from_teacher:
        if args.hidden_size != config.hidden_size:
            raise UsageError(f"--init_from_teacher needs --hidden_size {config.hidden_size} (the teacher's); "
                             f"no teacher weight fits a {args.hidden_size}-wide student")
        if args.num_hidden_layers > config.num_hidden_layers:
            raise UsageError(f"--init_from_teacher: --num_hidden_layers {args.num_hidden_layers} is more than the "
                             f"teacher's {config.num_hidden_layers}")
    cells = check_cell_data(args, config)
    train_cells, eval_cells, eval_batches = eval_cell_batches(cells, args, args.batch_size, args.seed)
    if rec:
        check_recorded_epochs(args, rec, len(train_cells))
    return Setup(student, cells, train_cells, eval_cells, eval_batches, rec)


def record_settings(args: DistillGeneformerArgs) -> dict:
    """The flags the records depend on besides the cells themselves: the temperature and every
    flag of the masks (which are drawn from --seed, the epoch and the cell's index)."""
    return {"--seed": args.seed, "--mlm_probability": args.mlm_probability,
            "--mask_token_id": args.mask_token_id, "--special_token_ids": list(args.special_token_ids)}


def check_records(args: DistillGeneformerArgs) -> records.TeacherRecords:
    """The records of --teacher_logits, refused where they cannot stand in for the teacher."""
    rec = records.open_records(args, JOB, record_settings(args))
    if args.init_from_teacher:
        raise UsageError("--init_from_teacher: copies the teacher's weights, which --teacher_logits leaves out; "
                         "drop one of them")
    return rec


def steps_per_epoch(args: DistillGeneformerArgs, n_train: int, world: int = 1) -> int:
    """Optimizer steps of one epoch over n_train cells shared by `world` processes (as train() counts)."""
    batches = Batches(range(n_train), args.batch_size, None)
    return math.ceil(len(batches.shard(0, world) if world > 1 else batches) / args.gradient_accumulation_steps)


def training_epochs(args: DistillGeneformerArgs, n_train: int, world: int = 1) -> int:
    """How many epochs a run reads (0..n-1), each with its own masks: --epochs, or as many as
    --max_steps take."""
    if not args.max_steps:
        return args.epochs
    return math.ceil(args.max_steps / steps_per_epoch(args, n_train, world))


def check_recorded_epochs(args: DistillGeneformerArgs, rec: records.TeacherRecords, n_train: int):
    """Refuse a run that would reach an epoch whose masks the records do not hold."""
    recorded = len(rec.parts("train"))
    world = runtime.world_size()
    if training_epochs(args, n_train, world) <= recorded:
        return
    where = f"the records at --teacher_logits {args.teacher_logits} hold {recorded} epoch(s) of masks"
    if not args.max_steps:
        raise UsageError(f"--epochs {args.epochs}: {where}; allowed 1-{recorded}, or record with --epochs {args.epochs}")
    per_epoch = steps_per_epoch(args, n_train, world)
    raise UsageError(f"--max_steps {args.max_steps}: {where} ({per_epoch} steps an epoch here); allowed 1-"
                     f"{recorded * per_epoch}, or record with the same --max_steps and --batch_size")


def teacher_pass(args: DistillGeneformerArgs) -> records.TeacherPass:
    """The teacher's work of this job, for record_teacher: its MLM logits at the masked genes of
    the training cells in every epoch the job will run (the masks differ each epoch) and of the
    validation cells (with epoch 0's masks, as the job evaluates)."""
    check_train_args(args)
    if not args.teacher:
        raise UsageError("--teacher is required: a Geneformer (BertForMaskedLM) folder")
    config = teacher_config(args)
    cells = check_cell_data(args, config)
    train_cells, eval_cells, _ = eval_cell_batches(cells, args, args.batch_size, args.seed)
    epochs = training_epochs(args, len(train_cells))
    return records.TeacherPass(
        parts=[("train", epoch, train_cells) for epoch in range(epochs)] + [("validation", None, eval_cells)],
        collate=MLMCollator(*masking(cells, args)), scored=masked_positions,
        load_teacher=lambda device: models.load_model(args.teacher, device, mlm=True),
        features=lambda teacher, batch: teacher.base_model(input_ids=batch["input_ids"],
                                                           attention_mask=batch["attention_mask"]).last_hidden_state,
        head=lambda teacher: teacher.cls, tokenizer=GeneIds(config.vocab_size), config=config, vocab=config.vocab_size,
        settings=record_settings(args),
        data=f"{args.data} (validation fraction {args.validation_fraction:g}, split seed {args.split_seed})")


def student_config(teacher_config, args):
    """The teacher's BERT config (vocabulary, special ids, max length, activation, hidden dropout)
    with the student's width, depth and attention dropout (0 by default: SDPA's flash kernel then
    runs on CPU too, and no length^2 matrices are kept for backward)."""
    for flag in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    h, heads = args.hidden_size, args.num_attention_heads
    if h % heads:
        fits = [n for n in range(1, min(h, 64) + 1) if h % n == 0]
        raise UsageError(f"--hidden_size {h} is not a multiple of --num_attention_heads {heads} (each head is "
                         f"hidden/heads wide): use heads from {', '.join(map(str, fits))} or a hidden size that "
                         f"{heads} divides, e.g. {h - h % heads or heads}")
    intermediate = args.intermediate_size or 4 * h
    if intermediate < 1:
        raise UsageError(f"--intermediate_size {intermediate}: must be at least 1")
    config = copy.deepcopy(teacher_config)
    config.hidden_size, config.num_hidden_layers, config.num_attention_heads = h, args.num_hidden_layers, heads
    config.intermediate_size = intermediate
    config.attention_probs_dropout_prob = args.attention_dropout
    config.architectures = ["BertForMaskedLM"]
    return config


def init_from_teacher(student, teacher) -> tuple[list[int], int, int]:
    """Copy every k-th teacher layer, the embeddings and the MLM head into the student wherever
    a tensor's shape matches. Returns (teacher layers used, tensors copied, student tensors)."""

    keep = teacher_layer_indices(teacher.config.num_hidden_layers, student.config.num_hidden_layers)
    new_index = {old: new for new, old in enumerate(keep)}
    own, state = student.state_dict(), {}
    for key, value in teacher.state_dict().items():
        m = LAYER_KEY.search(key)
        if m is not None:
            if int(m[2]) not in new_index:
                continue
            key = key[: m.start()] + f".{m[1]}.{new_index[int(m[2])]}." + key[m.end():]
        if key in own and own[key].shape == value.shape:
            state[key] = value
    student.load_state_dict(state, strict=False)
    return keep, len(state), len(own)


def run(args: DistillGeneformerArgs):
    from transformers import BertForMaskedLM

    setup = check(args)
    rec, cells, config = setup.records, setup.cells, setup.student_config
    if rec:  # the card and the log name the recorded teacher and what the records hold
        args = records.with_recorded_teacher(args, rec)
    train_cells, eval_cells, eval_batches = setup.train_cells, setup.eval_cells, setup.eval_batches
    buckets = bucket_sizes(cells["max_length"], args.bucket_sizes) if args.compile else None
    collate = BucketedMLMCollator(*masking(cells, args), buckets=buckets) if buckets else MLMCollator(*masking(cells, args))
    kd_batches = eval_batches  # what the held-out loss is taken on
    if rec:
        rec.check_data("train", train_cells, "training cells")
        rec.check_data("validation", eval_cells, "validation cells")
        collate = records.RecordCollator(collate, rec, masked_positions, rec.offsets("train"))
        kd_batches = Batches(records.Indexed(eval_cells), args.batch_size, shuffle=False, seed=args.seed,
                             collate=records.RecordCollator(eval_batches.collate, rec, masked_positions, rec.offsets("validation")))
    train_examples = records.Indexed(train_cells) if rec else train_cells
    train_batches = training_batches(args, train_examples, args.batch_size, collate, train_cells.lengths, args.seed)
    name = (f"{JOB}_h{config.hidden_size}_l{config.num_hidden_layers}_{args.weights_name()}_T{args.temperature:g}" + lowbit.name_suffix(args)
            + records.name_suffix(rec))
    run_ = results.open_run(args, name)
    device = runtime.pick_device(args.device)
    runtime.seed_everything(args.seed)
    teacher, teacher_info = None, {}
    if not rec:
        # an 8-bit teacher is loaded on the CPU in full precision, so a student can copy its layers first
        teacher = models.load_model(args.teacher, "cpu" if args.teacher_bits else device, mlm=True)
    student = BertForMaskedLM(config).to(device)
    start = None  # (teacher layers kept, tensors copied, student tensors, teacher layers) where it starts from the teacher
    if args.init_from_teacher:
        keep, copied, total = init_from_teacher(student, teacher)
        start = keep, copied, total, teacher.config.num_hidden_layers
        print(f"student starts from teacher layers {keep}: {copied} of {total} tensors copied")
    before = save_student_before(student, None, run_.checkpoint_dir, JOB, "Initialised from " + (
        f"teacher layers {', '.join(map(str, start[0]))} where shapes match ({start[1]} of {start[2]} tensors copied)"
        if start else f"random weights (seed {args.seed})") + ".")
    if teacher is not None:
        teacher_info = lowbit.quantize_teacher(teacher, device, args, eval_batches.epoch(0))
    ternary = lowbit.prepare_student(student, args)
    print(f"{len(train_cells):,} training cells, {len(eval_cells):,} validation cells; student "
          f"{sum(p.numel() for p in student.parameters()):,} parameters"
          + (f", teacher {sum(p.numel() for p in teacher.parameters()):,}" if teacher is not None
             else f"; teacher recorded in {args.teacher_logits}"))
    encoder = student.base_model
    if buckets:
        encoder = torch.compile(student.base_model, dynamic=False)
        print(f"compiling the student; batches padded to {', '.join(map(str, buckets))}")
    shapes = set()

    def kd(s_logits, labels, batch, t_logits=None):
        """(loss, kl, ce) over the masked genes: from the teacher's logits there, or from its records."""
        everywhere = torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
        teacher_there = t_logits if rec is None else records.from_batch(batch, rec.sampling, masked_positions(batch))
        return losses.distill_loss(s_logits, teacher_there, everywhere, labels, **args.objective())

    def step_loss(batch):
        t_logits = None
        if teacher is not None:
            with torch.inference_mode():
                t_logits = masked_logits(teacher, batch)[0]
            t_logits = t_logits.clone()  # a normal tensor: the loss is differentiated
        s_logits, labels = masked_logits(student, batch, encoder)
        loss, kl, ce = kd(s_logits, labels, batch, t_logits)
        hits = (s_logits.detach().argmax(-1) == labels).float()
        parts = {"kl": kl.detach(), "ce": ce.detach(), "mlm_accuracy": hits.mean() if len(labels) else hits.sum()}
        if buckets:
            shapes.add(tuple(batch["input_ids"].shape))
            parts["distinct_shapes"] = len(shapes)
        return loss, parts

    def evaluate():
        sums, n, metrics = {"eval_loss": 0.0, "eval_kl": 0.0, "eval_ce": 0.0}, 0, MLMMetrics()
        for batch in kd_batches.epoch(0):
            batch = {k: v.to(device) for k, v in batch.items()}
            s_logits, labels = masked_logits(student, batch)
            t_logits = masked_logits(teacher, batch)[0] if teacher is not None else None
            for key, value in zip(sums, kd(s_logits, labels, batch, t_logits)):
                sums[key] += float(value) * len(labels)
            n += len(labels)
            metrics.update(s_logits, labels)
        return {k: v / max(n, 1) for k, v in sums.items()} | metrics.result()

    with results.RunLog(run_.log_path, JOB, run_.name, run_.config) as log:
        log.note(**teacher_info)
        progress = train(student, train_batches, step_loss, args, run_, log, evaluate)
        if not runtime.is_main():  # data-parallel: rank 0 evaluates and writes the student
            return run_
        student.load_state_dict(load_weights(run_.checkpoint_dir), strict=False)
        student.eval()
        compared = {"Teacher": teacher, "Student": student} if teacher is not None else {"Student": student}
        table = evaluate_mlm(compared, eval_batches, device)
        final = ({f"{n.lower()}/{k}": v for n, m in table.items() for k, v in m.items()} | {"best_step": progress.best_step}
                 | {f"lowbit/{k}": v for k, v in teacher_info.items()})
        if buckets:
            final["distinct_shapes"] = len(shapes)
            print(f"the compiled student saw {len(shapes)} distinct batch shapes")
        output = run_.checkpoint_dir / "model"
        seen = cards.seen_in_training(train_batches, progress, train_cells.lengths)
        card = model_card(args, table, config, len(train_cells), len(eval_cells), seen, start,
                          teacher_lines(rec) + lowbit.card_lines(output, ternary, teacher_info))
        save_model_folder(student, None, output, JOB, own=True, files={"README.md": card})
        log.complete(final)
    print(format_table(table, gap=gap(table)))
    print(f"student: {output} (model card: {output / 'README.md'}); log: {run_.log_path}")
    print(f"student before distillation: {before}")
    return run_


def gap(table: dict) -> tuple[str, str] | None:
    """The results table's gap column: student minus teacher, where the teacher was evaluated."""
    return ("Student", "Teacher") if "Teacher" in table else None


def teacher_lines(rec: records.TeacherRecords | None) -> list[str]:
    if rec is None:
        return []
    epochs = len(rec.parts("train"))
    return [records.card_line(rec, f"every masked gene, with the masks of {epochs} training epoch{'s' if epochs > 1 else ''}", "genes")]


def model_card(args: DistillGeneformerArgs, table: dict, config, n_train: int, n_eval: int, seen: dict,
               start: tuple | None = None, low_bit: list[str] = ()) -> str:
    """README.md of the student: what it is, how it was trained, on which cells (and how many it
    read), what it kept of the teacher, its validation results and the command."""
    data_lines = [
        f"Data: {args.data}: {n_train:,} training cells, {n_eval:,} validation cells "
        f"(split seed {args.split_seed}), {'length-grouped' if args.group_by_length else 'random'} batches",
        cards.seen_line(seen, "cells"),
        f"Held-out: the {n_eval:,} validation cells (never trained on), with the same masks for every model and evaluation",
    ]
    if values_line(args.data):
        data_lines.append(values_line(args.data))
    if start:
        keep, copied, total, teacher_layers = start
        data_lines.append(f"{cards.kept_layers_line(keep, teacher_layers)}; {copied} of the student's {total} tensors "
                          "copied from the teacher where shapes match")
    lines = [
        f"# Distilled Geneformer student of {args.teacher}", "",
        f"Made with sitra's `{JOB}` job: a BertForMaskedLM with {config.num_hidden_layers} layers, hidden size "
        f"{config.hidden_size}, {config.num_attention_heads} heads and feed-forward {config.intermediate_size}; vocabulary "
        f"{config.vocab_size}, up to {config.max_position_embeddings} genes per cell"
        + (" (started from teacher layers)" if args.init_from_teacher else " (random start)") + ".", "",
        "## Method", "",
        f"- Loss over masked genes only: {args.describe('the masked genes')}",
        f"- Masking: {args.mlm_probability:.0%} of the non-special genes (80% <mask>, 10% random gene, 10% kept)",
        f"- Optimiser: AdamW, lr {args.lr}, weight decay {args.adam_weight_decay}, warm-up {args.warmup_steps} steps, "
        f"{args.lr_scheduler} schedule, clipping {args.max_grad_norm}, batch {args.batch_size} x "
        f"{args.gradient_accumulation_steps}, {args.max_steps or args.epochs} {'steps' if args.max_steps else 'epochs'}, seed {args.seed}",
        *(f"- {line}" for line in data_lines + list(low_bit)), "",
        "## Results (validation cells, the same masks for both models)" if gap(table) else "## Results (validation cells)", "",
        format_table(table, gap=gap(table)), "",
        "## Reproduce", "", "```bash", command_line(f"jobs/{JOB}.py", args), "```", "",
    ]
    return "\n".join(lines)


ARGS = DistillGeneformerArgs

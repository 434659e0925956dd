"""Distil a causal LM into a smaller one (Pythia-160m -> Pythia-70m by default; any pair that
shares a tokenizer): L = kd_weight * T^2 * D(teacher_T || student_T) + ce_weight * CE (the one
objective of every job, sitra.losses.distill_loss), with D from the loss menu, optional hidden-state terms, length-grouped (default) or packed text, a ternary (1.58-bit) student or an
8-bit teacher, a teacher recorded once (--teacher_logits), on-policy batches, and a model card."""
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from sitra import cards, data, losses, models, records, results, runtime
from sitra.args import (
    KDArgs,
    RecordsArgs,
    StudentInitArgs,
    check_kd,
    kd_field,
    student_init_field,
)
from sitra.cli import command_line
from sitra.data.mlm import LengthGroupingArgs, check_length_grouping, training_batches
from sitra.data.text import BUILTIN, TextDataArgs, check_data_args
from sitra.errors import UsageError
from sitra.evaluate import evaluate_lm, format_table, sliding_windows
from sitra.models import lowbit
from sitra.models.assembly import load_weights, save_model_folder, save_student_before
from sitra.models.capture import qkv_hooks
from sitra.models.causal import (
    final_hidden,
    lm_head,
    on_policy_prompts,
    check_student_shape,
    random_student,
    student_config,
    sample_continuations,
    shared_vocab,
    student_from_teacher_layers,
    teacher_layer_indices,
)
from sitra.train import TrainArgs, check_train_args, held_out_mean, train

JOB = "distill_pythia"
LR_FROM_SCRATCH = 1e-3  # --lr's default for teacher_layers and random students


@dataclass(kw_only=True)
class DistillLMArgs(TrainArgs, TextDataArgs, LengthGroupingArgs, KDArgs, RecordsArgs, StudentInitArgs, lowbit.LowBitArgs):
    teacher: str = field(default="EleutherAI/pythia-160m", metadata={"teacher_source": True, "help": "causal LM: hub id, local folder or .gguf file (de-quantised on load)"})
    student: str | None = field(default="EleutherAI/pythia-70m", metadata={"help": "the model the student starts from (--student_init pretrained): hub id, folder or .gguf file"})
    student_init: Literal["pretrained", "teacher_layers", "random"] = student_init_field("pretrained", "pretrained", "teacher_layers", "random")
    # T 1: at T 2 a cut SmolLM2 student reached 1.6x the held-out perplexity of T 1 at the same budget (benchmarks/quality.py)
    temperature: float = kd_field("temperature", 1.0)
    student_heads: int | None = field(default=None, metadata={"bounds": {"min": 1}, "help":
        "attention heads of a random student (--student_init random; default: the teacher's), each of the teacher's head "
        "size: fewer heads make a narrower student"})
    student_intermediate_size: int | None = field(default=None, metadata={"bounds": {"min": 1}, "help":
        "feed-forward width of a random student (--student_init random; default: the teacher's)"})
    hidden_weight: float = field(default=0.0, metadata={"help": "weight of the hidden-state term"})
    hidden_loss: Literal["mse", "cosine"] = field(default="mse", metadata={"help": "hidden-state term: MSE or cosine distance"})
    layer_map: str | None = field(default=None, metadata={
        "help": "student:teacher hidden-state pairs, e.g. 0:1,1:3 (0 = embeddings, i = output of layer i; default: last:last)"})
    attention_weight: float = field(default=0.0, metadata={"help": "weight of the MiniLM attention-distribution (query-key relation) KL"})
    value_weight: float = field(default=0.0, metadata={"help": "weight of the MiniLM value-relation KL"})
    relation_layers: str | None = field(default=None, metadata={
        "help": "student:teacher transformer layers of the relation terms, e.g. 1:3 (default: last:last)"})
    relation_heads: int | None = field(default=None, metadata={"help": "relation heads (default: the teacher's attention heads)"})
    packing: bool = field(default=False, metadata={
        "help": "concatenate the text and cut it into constant-length blocks (attention then crosses documents; "
                "default: one line an example, batches grouped by length)"})
    loss_chunks: int = field(default=4, metadata={
        "help": "scored positions are cut into this many pieces for the logit losses (1: plain; more: less memory, more time)"})
    eval_stride: int | None = field(default=None, metadata={"help": "sliding-window stride of the perplexity evaluation (default: half the window)"})
    lr: float | None = field(default=None, metadata={"help": "peak learning rate (AdamW; default: 1e-4 for a pretrained "
                                                             "student, 1e-3 for a student cut from the teacher or random)"})
    dataset_config: str | None = field(default="wikitext-2-raw-v1", metadata={"help": "datasets config name"})
    on_policy_fraction: float = field(default=0.0, metadata={
        "help": "fraction in [0, 1] of training batches made of continuations the student samples from the batch's prompts"})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens the student samples per on-policy prompt"})
    sampling_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of on-policy sampling"})

    def __post_init__(self):
        super().__post_init__()
        if self.lr is None:  # a cut or random student is far from any good model: at 1e-4 a cut SmolLM2 student
            # ended at 10x the held-out perplexity of 1e-3 (benchmarks/quality.py's learning-rate sweep)
            self.lr = 1e-4 if self.student_init == "pretrained" else LR_FROM_SCRATCH


def parse_layer_map(text: str | None, student_layers: int, teacher_layers: int, flag: str = "--layer_map") -> list[tuple[int, int]]:
    if not text:
        return [(student_layers, teacher_layers)]
    try:
        pairs = [tuple(int(x) for x in item.split(":")) for item in text.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        raise UsageError(f"{flag} {text}: write student:teacher pairs such as 0:1,2:6")
    for s, t in pairs:
        if not (0 <= s <= student_layers and 0 <= t <= teacher_layers):
            raise UsageError(f"{flag} {text}: {s}:{t} is out of range (student 0-{student_layers}, "
                             f"teacher 0-{teacher_layers}; 0 is the embeddings)")
    return pairs


@dataclass
class Setup:
    """What check() learns from configs, tokenizers and records, before any weights are loaded."""
    teacher_config: object
    n_student: int
    layer_map: list
    relation_map: list
    relation_heads: int
    vocab: int  # the logit losses compare the first `vocab` rows of both models (the shared ids)
    vocab_notice: str | None
    records: records.TeacherRecords | None
    student_config: object  # of a random student; None for the other starts
    teacher_forwards: bool  # whether the loss reads a live teacher (not at --kd_weight 0 without hidden-state terms)


def check(args: DistillLMArgs) -> Setup:
    check_train_args(args)
    check_data_args(args)
    check_length_grouping(args)
    check_kd(args)
    lowbit.check_lowbit(args)
    rec = check_records(args) if args.teacher_logits else None
    teacher_config = rec.teacher_config() if rec else models.load_config(args.teacher)
    teacher_vocab = (rec.tokenizer() if rec else models.load_tokenizer(args.teacher)).get_vocab()
    n_student = args.student_layers or max(1, teacher_config.num_hidden_layers // 2)
    for flag in ("student_heads", "student_intermediate_size"):
        if getattr(args, flag) and args.student_init != "random":
            raise UsageError(f"--{flag} {getattr(args, flag)}: shapes a random student; add --student_init random")
    check_student_shape(teacher_config, args.student_heads, args.student_intermediate_size)
    student_vocab = teacher_vocab
    if args.student_init == "pretrained":
        if not args.student:
            raise UsageError("--student_init pretrained needs --student")
        s_config = models.load_config(args.student, "--student")
        student_vocab = models.load_tokenizer(args.student, "--student").get_vocab()
        n_student = s_config.num_hidden_layers
    elif not 1 <= n_student <= teacher_config.num_hidden_layers:
        raise UsageError(f"--student_layers {n_student}: allowed 1-{teacher_config.num_hidden_layers}")
    else:
        s_config = student_config(teacher_config, n_student, args.student_heads, args.student_intermediate_size)
    teacher_name = f"the records at --teacher_logits {args.teacher_logits}" if rec else f"--teacher {args.teacher}"
    vocab, notice = shared_vocab(teacher_vocab, student_vocab, teacher_config.vocab_size, s_config.vocab_size,
                                 student=f"--student {args.student}", teacher=teacher_name)
    if rec and vocab < rec.vocab:
        raise UsageError(f"--student {args.student}: {s_config.vocab_size:,} output rows, fewer than the "
                         f"{rec.vocab:,} ids {teacher_name} hold")
    if args.on_policy_fraction:
        if not args.kd_weight:
            raise UsageError(f"--on_policy_fraction {args.on_policy_fraction} with --kd_weight 0: on-policy batches "
                             "train only the divergence; give --kd_weight a positive weight")
        if not 1 <= args.max_new_tokens < args.max_seq_length:
            raise UsageError(f"--max_new_tokens {args.max_new_tokens}: allowed 1-{args.max_seq_length - 1} "
                             f"(--max_seq_length {args.max_seq_length})")
    lowbit.check_student_modules(s_config, args, AutoModelForCausalLM)
    layer_map = parse_layer_map(args.layer_map, n_student, teacher_config.num_hidden_layers)
    relation_map = parse_layer_map(args.relation_layers or f"{n_student - 1}:{teacher_config.num_hidden_layers - 1}",
                                   n_student - 1, teacher_config.num_hidden_layers - 1, "--relation_layers")
    heads = args.relation_heads or teacher_config.num_attention_heads
    if args.attention_weight or args.value_weight:
        if heads < 1 or teacher_config.hidden_size % heads:
            raise UsageError(f"--relation_heads {heads}: must divide the teacher's hidden size {teacher_config.hidden_size}")
    teacher_forwards = rec is None and bool(args.kd_weight or args.hidden_weight or args.attention_weight or args.value_weight)
    return Setup(teacher_config, n_student, layer_map, relation_map, heads, vocab, notice, rec,
                 s_config if args.student_init == "random" else None, teacher_forwards)


def check_records(args: DistillLMArgs) -> records.TeacherRecords:
    """The records of --teacher_logits, refused where they cannot stand in for the teacher."""
    rec = records.open_records(args, JOB, record_settings(args))
    for flag in ("hidden_weight", "attention_weight", "value_weight"):
        if getattr(args, flag):
            raise UsageError(f"--{flag} {getattr(args, flag)}: needs the teacher's hidden states, which records do not keep; "
                             "drop it or --teacher_logits")
    if args.on_policy_fraction:
        raise UsageError(f"--on_policy_fraction {args.on_policy_fraction}: on-policy batches need the teacher online; "
                         "drop --teacher_logits")
    if args.student_init == "teacher_layers":
        raise UsageError("--student_init teacher_layers: copies the teacher's weights, which --teacher_logits leaves out; "
                         "use pretrained or random")
    return rec


class Distillation(nn.Module):
    """What trains: the student and, where hidden widths differ, one projection per mapped layer."""

    def __init__(self, student, student_width: int, teacher_width: int, pairs: int):
        super().__init__()
        self.student = student
        self.projections = nn.ModuleList(
            nn.Linear(student_width, teacher_width) if student_width != teacher_width else nn.Identity()
            for _ in range(pairs))


def record_settings(args: DistillLMArgs) -> dict:
    """The flags the records depend on besides the data itself."""
    return {"--max_seq_length": args.max_seq_length, "--packing": args.packing, "--percentage_data": args.percentage_data}


def load_corpus(args: DistillLMArgs, tokenizer) -> tuple[list, list]:
    train_ids, eval_ids = data.lm_corpus(tokenizer, args.dataset_name, args.dataset_config, args.train_file, args.eval_file,
                                         args.max_seq_length, args.packing, args.percentage_data)
    if not train_ids or not eval_ids:
        raise UsageError("the training or held-out text is empty: give --train_file/--eval_file or more data")
    return train_ids, eval_ids


def make_train_batches(args: DistillLMArgs, examples, collate, lengths: list[int]) -> data.Batches:
    """Length-grouped batches of whole lines (--group_by_length, the default): a batch is padded to
    its longest line, which is close to its shortest, and attention never crosses documents.
    Packed blocks all have --max_seq_length tokens, so they are drawn at random."""
    if args.packing:
        return data.Batches(examples, args.batch_size, collate, seed=args.seed)
    return training_batches(args, examples, args.batch_size, collate, lengths, args.seed)


def teacher_pass(args: DistillLMArgs) -> records.TeacherPass:
    """The teacher's work of this job, for record_teacher: the next-token logits of every token."""
    check_data_args(args)
    config, tokenizer = models.load_config(args.teacher), models.load_tokenizer(args.teacher)
    train_ids, eval_ids = load_corpus(args, tokenizer)
    return records.TeacherPass(
        parts=[("train", None, train_ids), ("eval", None, eval_ids)], collate=data.CausalCollator(0),
        scored=lambda batch: data.shifted(batch)[0],
        load_teacher=lambda device: models.load_model(args.teacher, device, auto=AutoModelForCausalLM),
        features=lambda teacher, batch: final_hidden(teacher, batch).last_hidden_state[:, :-1], head=lm_head,
        tokenizer=tokenizer, config=config, vocab=min(max(tokenizer.get_vocab().values()) + 1, config.vocab_size),
        settings=record_settings(args), data=args.train_file or f"{args.dataset_name} ({args.dataset_config})")


def make_student(args: DistillLMArgs, teacher, setup: Setup, device):
    if args.student_init == "pretrained":
        student = models.load_model(args.student, flag="--student", auto=AutoModelForCausalLM, trainable=True, dtype=torch.float32)
    elif args.student_init == "teacher_layers":
        student = student_from_teacher_layers(teacher, setup.n_student)
    else:
        student = random_student(setup.student_config, args.seed)
    return student.to(device).train()


def run(args: DistillLMArgs):
    setup = check(args)
    rec = setup.records
    if rec:  # the card and the log name the recorded teacher and what the records hold
        args = records.with_recorded_teacher(args, rec)
    tokenizer = rec.tokenizer() if rec else models.load_tokenizer(args.teacher)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_ids, eval_ids = load_corpus(args, tokenizer)
    if rec:
        rec.check_data("train", train_ids, "training text")
        rec.check_data("eval", eval_ids, "held-out text")
        collate = data.CausalCollator(tokenizer.pad_token_id)
        scored = lambda batch: data.shifted(batch)[0]  # noqa: E731
        train_collate = records.RecordCollator(collate, rec, scored, rec.offsets("train"))
        eval_collate = records.RecordCollator(collate, rec, scored, rec.offsets("eval"))
        train_examples, eval_examples = records.Indexed(train_ids), records.Indexed(eval_ids)
    else:
        train_collate = eval_collate = data.CausalCollator(tokenizer.pad_token_id)
        train_examples, eval_examples = train_ids, eval_ids
    if setup.vocab_notice:
        print(setup.vocab_notice)
    train_batches = make_train_batches(args, train_examples, train_collate, [len(x) for x in train_ids])
    eval_batches = data.Batches(eval_examples, args.batch_size, eval_collate, seed=args.seed, shuffle=False)
    stream = [t for block in eval_ids for t in block]
    stride = args.eval_stride or max(1, args.max_seq_length // 2)
    windows = sliding_windows(stream, args.max_seq_length, stride)
    name = (f"{JOB}_{args.student_init}_{args.loss}_{args.weights_name()}_T{args.temperature:g}" + ("_packed" if args.packing else "")
            + lowbit.name_suffix(args)
            + records.name_suffix(rec) + (f"_onpolicy{args.on_policy_fraction:g}" if args.on_policy_fraction else ""))
    run_ = results.open_run(args, name)
    device = runtime.pick_device(args.device)
    runtime.seed_everything(args.seed)
    teacher, teacher_info = None, {}
    if setup.teacher_forwards or (not rec and args.student_init == "teacher_layers"):
        # an 8-bit teacher is loaded on the CPU in full precision: a teacher_layers student copies its
        # weights first, then its linear layers go to `device` in 8 bits one at a time
        teacher = models.load_model(args.teacher, "cpu" if args.teacher_bits else device, auto=AutoModelForCausalLM)
    student = make_student(args, teacher, setup, device)
    if not setup.teacher_forwards and teacher is not None:
        print("--kd_weight 0: the loss reads no teacher; it was loaded only to copy its layers and runs no forwards")
        teacher = None
    kept = (teacher_layer_indices(setup.teacher_config.num_hidden_layers, setup.n_student)
            if args.student_init == "teacher_layers" else None)
    before = save_student_before(student, tokenizer, run_.checkpoint_dir, JOB, f"Initialised from {student_start(args, setup, kept)}.")
    if teacher is not None:
        teacher_info = lowbit.quantize_teacher(teacher, device, args, eval_batches.epoch(0))
    base_metrics = evaluate_lm(student.eval(), windows, device, args.batch_size)
    ternary = lowbit.prepare_student(student, args)
    module = Distillation(student, student.config.hidden_size, setup.teacher_config.hidden_size, len(setup.layer_map)).to(device)
    step_loss, counts = distillation_loss(args, setup, module, teacher, tokenizer)

    with results.RunLog(run_.log_path, JOB, run_.name, run_.config) as log:
        log.note(**teacher_info)
        progress = train(module, train_batches, step_loss, args, run_, log,
                         lambda: held_out_mean(step_loss, eval_batches, device))
        log.note(**counts)
        if args.on_policy_fraction:
            print(f"on-policy batches: {counts['on_policy_batches']:,} of {counts['training_batches']:,} training batches "
                  f"in this process ({counts['teacher_forwards']:,} teacher forwards in all)")
        module.load_state_dict(load_weights(run_.checkpoint_dir), strict=False)
        student.eval()
        output = run_.checkpoint_dir / "model"
        save_model_folder(student, tokenizer, output, JOB, own=True)
        table, final = results_table(args, teacher, student, base_metrics, windows, device)
        log.complete({f"{n}/{k}": v for n, m in table.items() for k, v in m.items()} | {"best_step": progress.best_step}
                     | {f"lowbit/{k}": v for k, v in teacher_info.items()})
        seen = cards.seen_in_training(train_batches, progress, [len(x) for x in train_ids])
        held_out = f"{held_out_source(args)}: {len(stream) - 1:,} tokens scored, sliding windows of {args.max_seq_length} (stride {stride})"
        write_model_card(output, args, table, setup, len(train_ids), seen, held_out, kept, ternary, teacher_info, rec)
    print(format_table(table, gap=(final, "student base")))
    print(f"distilled student: {output} (model card: {output / 'README.md'})")
    print(f"teacher, student before and distilled student: python jobs/eval_lm.py {shlex.join(map(str, [args.teacher, before, output]))}")
    return run_


def distillation_loss(args: DistillLMArgs, setup: Setup, module: Distillation, teacher, tokenizer):
    """(step_loss, counts): the loss of one batch, and how many teacher forwards, on-policy and
    training batches it has run in this process.

    Online, the teacher runs once on the batch the student learns from. From records, the
    teacher's distribution comes with the batch (losses.topk_logit_loss / sampled_kl). An
    on-policy batch (training only, with probability --on_policy_fraction, drawn from the step's
    random stream so a resumed run draws the same) replaces the batch by the student's sampled
    continuations of its prompts; the teacher scores only those, and the cross-entropy term is
    left out (the targets are the student's own samples), the divergence keeps its weight."""
    rec, V = setup.records, setup.vocab
    objective = args.objective()
    need_hidden = args.hidden_weight > 0
    counts = {"teacher_forwards": 0, "on_policy_batches": 0, "training_batches": 0}

    def student_head(h):
        return lm_head(module.student)(h)[..., :V]

    def logit_loss(batch, s, t, flat, targets, with_ce):
        """The objective over the scored positions, chunked; on-policy batches leave the CE out
        (their targets are the student's own samples), the divergence keeps its weight. Only the
        scored rows of the hidden states reach the heads: padding costs no logits."""
        hidden = s.last_hidden_state[:, :-1].reshape(flat.numel(), -1)[flat]
        targets, every = targets[flat], flat[flat]
        kw = objective if with_ce else objective | {"ce_weight": 0.0}

        if rec is None:  # a live teacher, or none at --kd_weight 0 (the objective is then ce_weight x CE)
            t_hidden = t_head = None
            if t is not None:  # indexing copies out of inference mode
                t_hidden, t_head = t.last_hidden_state[:, :-1].reshape(flat.numel(), -1)[flat], lm_head(teacher)
            return losses.chunked_distill_loss(hidden, lm_head(module.student), t_hidden, t_head, every,
                                               targets if with_ce else None, chunks=args.loss_chunks, vocab=V, **kw)

        def recorded(s_logits, *pieces_mask, targets=None):
            *pieces, mask = pieces_mask
            return losses.distill_loss(s_logits, records.as_teacher(rec.sampling, *pieces), mask,
                                       targets if with_ce else None, **kw)[0]

        recorded_rows = tuple(batch[k].reshape(flat.numel(), *batch[k].shape[2:])[flat] for k in records.RECORD_KEYS[rec.sampling])
        return losses.chunked_record_loss(recorded, hidden, student_head, recorded_rows, every, chunks=args.loss_chunks, targets=targets)

    relations = [(w, kind) for w, kind in ((args.attention_weight, "attention"), (args.value_weight, "value")) if w]
    t_qkv, s_qkv = {}, {}
    if relations:
        qkv_hooks(teacher, [t for _, t in setup.relation_map], t_qkv)
        qkv_hooks(module.student, [s for s, _ in setup.relation_map], s_qkv)

    def step_loss(batch):
        training = module.training and torch.is_grad_enabled()
        on_policy = training and args.on_policy_fraction > 0 and float(torch.rand(())) < args.on_policy_fraction
        if on_policy:
            prompts = on_policy_prompts(batch, args.max_new_tokens)
            ids, scored = sample_continuations(module.student, prompts, args.max_new_tokens, args.sampling_temperature,
                                               tokenizer.eos_token_id, vocab=V)
            batch, next_tokens = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids[:, 1:]
        else:
            scored, next_tokens = data.shifted(batch)
        counts["training_batches"] += training
        counts["on_policy_batches"] += on_policy
        t = None
        if setup.teacher_forwards:
            with torch.inference_mode():
                t = final_hidden(teacher, batch, need_hidden)
            counts["teacher_forwards"] += 1
        s = final_hidden(module.student, batch, need_hidden)
        flat = scored.reshape(-1)
        loss = logit_loss(batch, s, t, flat, next_tokens.reshape(-1), with_ce=not on_policy)
        parts = {"teacher_forwards": float(setup.teacher_forwards)} | ({"on_policy": float(on_policy)} if args.on_policy_fraction else {})
        if need_hidden:
            token_mask = batch["attention_mask"].bool()
            terms = []
            for proj, (si, ti) in zip(module.projections, setup.layer_map):
                hs, ht = proj(s.hidden_states[si]), t.hidden_states[ti].clone()
                terms.append(losses.mse(hs, ht, token_mask[..., None]) if args.hidden_loss == "mse"
                             else losses.cosine_distance(hs, ht, token_mask))
            hidden = sum(terms) / len(terms)
            loss = loss + args.hidden_weight * hidden
            parts["hidden"] = hidden.detach()
        for weight, kind in relations:
            token_mask = batch["attention_mask"].bool()
            terms = []
            for si, ti in setup.relation_map:
                sq, tq = s_qkv[si], {k: v.clone() for k, v in t_qkv[ti].items()}
                if kind == "attention":
                    terms.append(losses.relation_kl(sq["q"], tq["q"], token_mask, setup.relation_heads, sq["k"], tq["k"]))
                else:
                    terms.append(losses.relation_kl(sq["v"], tq["v"], token_mask, setup.relation_heads))
            term = sum(terms) / len(terms)
            loss = loss + weight * term
            parts[f"{kind}_relation_kl"] = term.detach()
        return loss, parts

    return step_loss, counts


def results_table(args: DistillLMArgs, teacher, student, base_metrics: dict, windows, device) -> tuple[dict, str]:
    """Held-out numbers side by side, and the name of the column that is the job's result.

    Full precision: teacher | student base | distilled. Ternary: teacher | student base |
    full-precision student (the trained latent weights run without quantisation: what the same
    weights give as a float model, not a separately distilled one) | ternary student (the
    quantised forward, which is what the export holds). An 8-bit teacher is named so."""
    table = {}
    if teacher is not None:  # from records the teacher is never loaded
        table["teacher (8-bit)" if args.teacher_bits else "teacher"] = evaluate_lm(teacher, windows, device, args.batch_size)
    table["student base"] = base_metrics
    if args.student_bits:
        with lowbit.full_precision(student):
            table["full-precision student"] = evaluate_lm(student, windows, device, args.batch_size)
        final = "ternary student"
    else:
        final = "distilled"
    table[final] = evaluate_lm(student, windows, device, args.batch_size)
    for name, metrics in table.items():
        metrics["parameters"] = sum(p.numel() for p in (teacher if name.startswith("teacher") else student).parameters())
    return table, final


def student_start(args: DistillLMArgs, setup: Setup, kept: list[int] | None) -> str:
    """How the student was initialised, in words."""
    if args.student_init == "pretrained":
        return f"`{args.student}` (pretrained)"
    if args.student_init == "teacher_layers":
        return f"{len(kept)} of the teacher's {setup.teacher_config.num_hidden_layers} layers ({', '.join(map(str, kept))})"
    return f"random weights, the teacher's config with {setup.n_student} layers (seed {args.seed})"


def held_out_source(args: DistillLMArgs) -> str:
    """The held-out text, as sitra.data.text.load_texts chooses it (never trained on)."""
    if args.eval_file:
        return args.eval_file
    if args.train_file:
        return f"every tenth line of {args.train_file} (left out of training)"
    if args.dataset_name == BUILTIN:
        return f"every tenth paragraph of {BUILTIN} (left out of training)"
    return f"{args.dataset_name} ({args.dataset_config}), validation split (test where it has none)"


def write_model_card(folder: Path, args: DistillLMArgs, table: dict, setup: Setup, n_examples: int, seen: dict,
                     held_out: str, kept: list[int] | None = None, ternary: list[str] = (), teacher_info: dict | None = None,
                     rec: records.TeacherRecords | None = None):
    """README.md in the model folder: method, loss, hyperparameters, data (what training read of it,
    the held-out text), metrics, command."""
    data_source = args.train_file or f"{args.dataset_name} ({args.dataset_config})"
    share = f", the {args.percentage_data:.0%} of it --percentage_data keeps" if args.percentage_data < 1 else ""
    command = command_line(f"jobs/{JOB}.py", args)
    lines = [
        f"# Distilled student of {args.teacher}", "",
        f"Made with sitra's `{JOB}` job: knowledge distillation of the causal LM `{args.teacher}` into a "
        f"{setup.n_student}-layer student initialised from {student_start(args, setup, kept)}.", "",
        "## Method", "",
        f"- Loss: {args.describe('next tokens')}"
        + (f"; plus {args.hidden_weight} x hidden-state {args.hidden_loss} on layers {args.layer_map or 'last:last'}" if args.hidden_weight else "")
        + (f"; plus {args.attention_weight} x attention-relation and {args.value_weight} x value-relation KL on layers "
           f"{args.relation_layers or 'last:last'}" if args.attention_weight or args.value_weight else ""),
        f"- Optimiser: AdamW, lr {args.lr}, weight decay {args.adam_weight_decay}, warm-up {args.warmup_steps} steps, "
        f"{args.lr_scheduler} schedule, batch {args.batch_size} x {args.gradient_accumulation_steps} accumulation, "
        f"{args.max_steps or args.epochs} {'steps' if args.max_steps else 'epochs'}, seed {args.seed}",
        f"- Data: {data_source}{share}: {n_examples:,} training examples of up to "
        f"{args.max_seq_length} tokens, {batching(args)}",
        f"- {cards.seen_line(seen)}",
        f"- Held-out: {held_out}",
        *([f"- {cards.kept_layers_line(kept, setup.teacher_config.num_hidden_layers)}"] if kept else []),
        *(f"- {line}" for line in cards.gguf_lines(args, ("teacher",) * (rec is None) + ("student",) * (args.student_init == "pretrained"))),
        *teacher_lines(args, rec), *low_bit_lines(folder, ternary, teacher_info or {}), "",
        "## Results (held-out text, sliding-window perplexity)", "",
        format_table(table), "",
        "## Reproduce", "", "```bash", command, "```", "",
    ]
    results.atomic_write(folder / "README.md", lambda tmp: tmp.write_text("\n".join(lines)))


def batching(args: DistillLMArgs) -> str:
    """How the training text was cut and batched, in words (the card's data line)."""
    if args.packing:
        return "packed into blocks (attention crossed documents), random batches"
    return ("one line an example, " + ("length-grouped batches" if args.group_by_length else "random batches")
            + ", padded to the longest of the batch")


def teacher_lines(args: DistillLMArgs, rec: records.TeacherRecords | None) -> list[str]:
    lines = []
    if rec:
        lines.append(f"- {records.card_line(rec, 'every token')}")
    if args.on_policy_fraction:
        lines.append(f"- On-policy: {args.on_policy_fraction:.0%} of the batches were the student's own continuations "
                     f"({args.max_new_tokens} tokens sampled at temperature {args.sampling_temperature} from the batch's "
                     "prompts), scored by the teacher without the cross-entropy term.")
    return lines


def low_bit_lines(folder: Path, ternary: list[str], teacher_info: dict) -> list[str]:
    lines = [f"- {line}" for line in lowbit.card_lines(folder, ternary, teacher_info)]
    if ternary:
        lines.append("- 'full-precision student' below is the same trained weights run without quantisation.")
    return lines


ARGS = DistillLMArgs

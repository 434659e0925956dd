"""Distil a causal LM into a smaller one (Pythia-160m -> Pythia-70m by default; any pair that
shares a tokenizer): L = (1 - alpha) * T^2 * D_T(teacher || student) + alpha * CE, with D from the
loss menu, optional hidden-state terms, packed or padded text, a ternary (1.58-bit) student or an
8-bit teacher, and a model card."""
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

from sitra import data, losses, models, results
from sitra.cli import UsageError, apply_preset, command_line
from sitra.evaluate import evaluate_lm, format_table, sliding_windows
from sitra.models import lowbit
from sitra.models.capture import qkv_hooks
from sitra.models.causal import final_hidden, lm_head, random_student, student_from_teacher_layers
from sitra.presets import PRESETS
from sitra.recipes.build_retrained import save_model_folder
from sitra.recipes.common import TextDataArgs, check_data_args, held_out_mean, load_weights
from sitra.train import TrainArgs, check_train_args, seed_everything, train

JOB = "distill_pythia"


@dataclass(kw_only=True)
class DistillLMArgs(TrainArgs, TextDataArgs, lowbit.LowBitArgs):
    teacher: str = field(default="EleutherAI/pythia-160m", metadata={"help": "causal LM: hub id or local folder"})
    student: str | None = field(default="EleutherAI/pythia-70m", metadata={"help": "student to warm-start from (--student_init pretrained)"})
    student_init: Literal["pretrained", "teacher_layers", "random"] = field(default="pretrained", metadata={
        "help": "pretrained: load --student; teacher_layers: every k-th teacher layer; random: the teacher's config, fewer layers"})
    student_layers: int | None = field(default=None, metadata={"help": "layers of a teacher_layers or random student (default: half the teacher's)"})
    loss: Literal[tuple(losses.LOGIT_LOSSES)] = field(default="forward_kl", metadata={"help": "logit divergence from the loss menu"})
    alpha: float = field(default=0.5, metadata={"help": "weight of the cross-entropy; the divergence gets 1 - alpha"})
    temperature: float = field(default=2.0, metadata={"help": "softmax temperature of the divergence"})
    jsd_beta: float = field(default=0.5, metadata={"help": "beta of --loss jsd (0: forward KL, 1: reverse KL)"})
    hidden_weight: float = field(default=0.0, metadata={"help": "weight of the hidden-state term"})
    hidden_loss: Literal["mse", "cosine"] = field(default="mse", metadata={"help": "hidden-state term: MSE or cosine distance"})
    layer_map: str | None = field(default=None, metadata={
        "help": "student:teacher hidden-state pairs, e.g. 0:1,1:3 (0 = embeddings, i = output of layer i; default: last:last)"})
    attention_weight: float = field(default=0.0, metadata={"help": "weight of the MiniLM attention-distribution (query-key relation) KL"})
    value_weight: float = field(default=0.0, metadata={"help": "weight of the MiniLM value-relation KL"})
    relation_layers: str | None = field(default=None, metadata={
        "help": "student:teacher transformer layers of the relation terms, e.g. 1:3 (default: last:last)"})
    relation_heads: int | None = field(default=None, metadata={"help": "relation heads (default: the teacher's attention heads)"})
    packing: bool = field(default=False, metadata={"help": "concatenate the text and cut it into constant-length blocks"})
    loss_chunks: int = field(default=16, metadata={"help": "positions are cut into this many pieces for the logit losses (1: plain)"})
    eval_stride: int | None = field(default=None, metadata={"help": "sliding-window stride of the perplexity evaluation (default: half the window)"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (AdamW)"})
    dataset_config: str | None = field(default="wikitext-2-raw-v1", metadata={"help": "datasets config name"})
    preset: str | None = field(default=None, metadata={"help": f"fill unset flags from a preset: {', '.join(PRESETS)}"})


def parse_layer_map(text: str | None, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    if not text:
        return [(student_layers, teacher_layers)]
    try:
        pairs = [tuple(int(x) for x in item.split(":")) for item in text.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        raise UsageError(f"--layer_map {text}: write student:teacher pairs such as 0:1,2:6")
    for s, t in pairs:
        if not (0 <= s <= student_layers and 0 <= t <= teacher_layers):
            raise UsageError(f"--layer_map {text}: {s}:{t} is out of range (student 0-{student_layers}, "
                             f"teacher 0-{teacher_layers}; 0 is the embeddings)")
    return pairs


def check(args: DistillLMArgs):
    check_train_args(args)
    check_data_args(args)
    lowbit.check_lowbit(args)
    teacher_config = models.load_config(args.teacher)
    n_student = args.student_layers or max(1, teacher_config.num_hidden_layers // 2)
    student_config = copy.deepcopy(teacher_config)
    student_config.num_hidden_layers = n_student
    if args.student_init == "pretrained":
        if not args.student:
            raise UsageError("--student_init pretrained needs --student")
        student_config = models.load_config(args.student, "--student")
        n_student = student_config.num_hidden_layers
        t_vocab, s_vocab = teacher_config.vocab_size, student_config.vocab_size
        if t_vocab != s_vocab:
            raise UsageError(f"--student {args.student}: vocabulary of {s_vocab} tokens, the teacher's has {t_vocab}; "
                             "distillation needs the same vocabulary")
        if models.load_tokenizer(args.student, "--student").get_vocab() != models.load_tokenizer(args.teacher).get_vocab():
            raise UsageError(f"--student {args.student}: its tokenizer differs from --teacher {args.teacher}'s")
    elif not 1 <= n_student <= teacher_config.num_hidden_layers:
        raise UsageError(f"--student_layers {n_student}: allowed 1-{teacher_config.num_hidden_layers}")
    if not 0 <= args.alpha <= 1:
        raise UsageError(f"--alpha {args.alpha}: must be in [0, 1]")
    if not args.temperature > 0:
        raise UsageError(f"--temperature {args.temperature}: must be positive")
    if not 0 <= args.jsd_beta <= 1:
        raise UsageError(f"--jsd_beta {args.jsd_beta}: must be in [0, 1]")
    if args.loss_chunks < 1:
        raise UsageError(f"--loss_chunks {args.loss_chunks}: must be at least 1")
    lowbit.check_student_modules(student_config, args, AutoModelForCausalLM)
    layer_map = parse_layer_map(args.layer_map, n_student, teacher_config.num_hidden_layers)
    relation_map = parse_layer_map(args.relation_layers or f"{n_student - 1}:{teacher_config.num_hidden_layers - 1}",
                                   n_student - 1, teacher_config.num_hidden_layers - 1)
    heads = args.relation_heads or teacher_config.num_attention_heads
    if args.attention_weight or args.value_weight:
        if heads < 1 or teacher_config.hidden_size % heads:
            raise UsageError(f"--relation_heads {heads}: must divide the teacher's hidden size {teacher_config.hidden_size}")
    return teacher_config, n_student, layer_map, relation_map, heads


class Distillation(nn.Module):
    """What trains: the student and, where hidden widths differ, one projection per mapped layer."""

    def __init__(self, student, student_width: int, teacher_width: int, pairs: int):
        super().__init__()
        self.student = student
        self.projections = nn.ModuleList(
            nn.Linear(student_width, teacher_width) if student_width != teacher_width else nn.Identity()
            for _ in range(pairs))


def make_student(args: DistillLMArgs, teacher, n_student: int, device):
    if args.student_init == "pretrained":
        student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    elif args.student_init == "teacher_layers":
        student = student_from_teacher_layers(teacher, n_student)
    else:
        student = random_student(teacher, n_student, args.seed)
    return student.to(device).train()


def run(args: DistillLMArgs):
    args = apply_preset(args, PRESETS)
    teacher_config, n_student, layer_map, relation_map, relation_heads = check(args)
    tokenizer = models.load_tokenizer(args.teacher)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_lines, eval_lines = data.load_texts(args.dataset_name, args.dataset_config, args.train_file, args.eval_file)
    train_ids = data.causal_texts(data.take_fraction(train_lines, args.percentage_data), tokenizer, args.max_seq_length, args.packing)
    eval_ids = data.causal_texts(data.take_fraction(eval_lines, args.percentage_data), tokenizer, args.max_seq_length, True)
    if not train_ids or not eval_ids:
        raise UsageError("the training or held-out text is empty: give --train_file/--eval_file or more data")
    collate = data.CausalCollator(tokenizer.pad_token_id)
    train_batches = data.Batches(train_ids, args.batch_size, collate, seed=args.seed)
    eval_batches = data.Batches(eval_ids, args.batch_size, collate, seed=args.seed, shuffle=False)
    stream = [t for block in eval_ids for t in block]
    windows = sliding_windows(stream, args.max_seq_length, args.eval_stride or max(1, args.max_seq_length // 2))
    name = (f"{JOB}_{args.student_init}_{args.loss}_a{args.alpha:g}_T{args.temperature:g}" + ("_packed" if args.packing else "")
            + ("_ternary" if args.student_bits else "") + ("_teacher8bit" if args.teacher_bits else ""))
    run_ = results.open_run(args, name)
    device = models.pick_device(args.device)
    seed_everything(args.seed)
    # an 8-bit teacher is loaded on the CPU in full precision: a teacher_layers student copies its
    # weights first, then its linear layers go to `device` in 8 bits one at a time
    teacher = models.load_model(args.teacher, "cpu" if args.teacher_bits else device, auto=AutoModelForCausalLM)
    student = make_student(args, teacher, n_student, device)
    teacher_info = lowbit.quantize_teacher(teacher, device, args, eval_batches.epoch(0))
    base_metrics = evaluate_lm(student.eval(), windows, device, args.batch_size)
    ternary = lowbit.prepare_student(student, args)
    module = Distillation(student, student.config.hidden_size, teacher.config.hidden_size, len(layer_map)).to(device)
    divergence = losses.LOGIT_LOSSES[args.loss]
    extra = {"beta": args.jsd_beta} if args.loss == "jsd" else {}
    need_hidden = args.hidden_weight > 0

    def logit_loss(s_logits, t_logits, mask, targets):
        kd = divergence(s_logits, t_logits, mask, temperature=args.temperature, **extra)
        ce = F.cross_entropy(s_logits[mask].float(), targets[mask]) if mask.any() else kd * 0
        return (1 - args.alpha) * kd + args.alpha * ce

    relations = [(w, kind) for w, kind in ((args.attention_weight, "attention"), (args.value_weight, "value")) if w]
    t_qkv, s_qkv = {}, {}
    if relations:
        qkv_hooks(teacher, [t for _, t in relation_map], t_qkv)
        qkv_hooks(module.student, [s for s, _ in relation_map], s_qkv)

    def step_loss(batch):
        scored, next_tokens = data.shifted(batch)
        with torch.inference_mode():
            t = final_hidden(teacher, batch, need_hidden)
        s = final_hidden(module.student, batch, need_hidden)
        flat = scored.reshape(-1)
        loss = losses.chunked_logit_loss(
            logit_loss, s.last_hidden_state[:, :-1].reshape(flat.numel(), -1), lm_head(module.student),
            t.last_hidden_state[:, :-1].reshape(flat.numel(), -1).clone(), lm_head(teacher), flat,
            chunks=args.loss_chunks, targets=next_tokens.reshape(-1))
        parts = {}
        if need_hidden:
            token_mask = batch["attention_mask"].bool()
            terms = []
            for proj, (si, ti) in zip(module.projections, layer_map):
                hs, ht = proj(s.hidden_states[si]), t.hidden_states[ti].clone()
                terms.append(losses.mse(hs, ht, token_mask[..., None]) if args.hidden_loss == "mse"
                             else losses.cosine_distance(hs, ht, token_mask))
            hidden = sum(terms) / len(terms)
            loss = loss + args.hidden_weight * hidden
            parts["hidden"] = float(hidden.detach())
        for weight, kind in relations:
            token_mask = batch["attention_mask"].bool()
            terms = []
            for si, ti in relation_map:
                sq, tq = s_qkv[si], {k: v.clone() for k, v in t_qkv[ti].items()}
                if kind == "attention":
                    terms.append(losses.relation_kl(sq["q"], tq["q"], token_mask, relation_heads, sq["k"], tq["k"]))
                else:
                    terms.append(losses.relation_kl(sq["v"], tq["v"], token_mask, relation_heads))
            term = sum(terms) / len(terms)
            loss = loss + weight * term
            parts[f"{kind}_relation_kl"] = float(term.detach())
        return loss, parts

    with results.RunLog(run_.log_path, JOB, run_.name, run_.config) as log:
        log.note(**teacher_info)
        progress = train(module, train_batches, step_loss, args, run_, log,
                         lambda: held_out_mean(step_loss, eval_batches, device))
        module.load_state_dict(load_weights(run_.checkpoint_dir), strict=False)
        student.eval()
        output = run_.checkpoint_dir / "model"
        save_model_folder(student, tokenizer, output)
        table, final = results_table(args, teacher, student, base_metrics, windows, device)
        log.complete({f"{n}/{k}": v for n, m in table.items() for k, v in m.items()} | {"best_step": progress.best_step}
                     | {f"lowbit/{k}": v for k, v in teacher_info.items()})
        write_model_card(output, args, table, n_student, len(train_ids), ternary, teacher_info)
    print(format_table(table, gap=(final, "student base")))
    print(f"distilled student: {output} (model card: {output / 'README.md'})")
    return run_


def results_table(args: DistillLMArgs, teacher, student, base_metrics: dict, windows, device) -> tuple[dict, str]:
    """Held-out numbers side by side, and the name of the column that is the job's result.

    Full precision: teacher | student base | distilled. Ternary: teacher | student base |
    full-precision student (the trained latent weights run without quantisation: what the same
    weights give as a float model, not a separately distilled one) | ternary student (the
    quantised forward, which is what the export holds). An 8-bit teacher is named so."""
    table = {"teacher (8-bit)" if args.teacher_bits else "teacher": evaluate_lm(teacher, windows, device, args.batch_size),
             "student base": base_metrics}
    if args.student_bits:
        with lowbit.full_precision(student):
            table["full-precision student"] = evaluate_lm(student, windows, device, args.batch_size)
        final = "ternary student"
    else:
        final = "distilled"
    table[final] = evaluate_lm(student, windows, device, args.batch_size)
    n_teacher, n_student = (sum(p.numel() for p in m.parameters()) for m in (teacher, student))
    for name, metrics in table.items():
        metrics["parameters"] = n_teacher if name.startswith("teacher") else n_student
    return table, final


def write_model_card(folder: Path, args: DistillLMArgs, table: dict, n_student: int, n_examples: int,
                     ternary: list[str] = (), teacher_info: dict | None = None):
    """README.md in the model folder: method, loss, hyperparameters, data, metrics, command."""
    data_source = args.train_file or f"{args.dataset_name} ({args.dataset_config})"
    command = command_line(f"jobs/{JOB}.py", args)
    lines = [
        f"# Distilled student of {args.teacher}", "",
        f"Made with sitra's `{JOB}` job: knowledge distillation of the causal LM `{args.teacher}` into a "
        f"{n_student}-layer student ({args.student_init}" + (f" from `{args.student}`" if args.student_init == "pretrained" else "") + ").", "",
        "## Method", "",
        f"- Loss: (1 - alpha) * T^2 * {args.loss}(teacher_T, student_T) + alpha * cross-entropy, alpha = {args.alpha}, "
        f"T = {args.temperature}" + (f", JSD beta = {args.jsd_beta}" if args.loss == "jsd" else "")
        + (f"; plus {args.hidden_weight} x hidden-state {args.hidden_loss} on layers {args.layer_map or 'last:last'}" if args.hidden_weight else "")
        + (f"; plus {args.attention_weight} x attention-relation and {args.value_weight} x value-relation KL on layers "
           f"{args.relation_layers or 'last:last'}" if args.attention_weight or args.value_weight else ""),
        f"- Optimiser: AdamW, lr {args.lr}, weight decay {args.adam_weight_decay}, warm-up {args.warmup_steps} steps, "
        f"{args.lr_scheduler} schedule, batch {args.batch_size} x {args.gradient_accumulation_steps} accumulation, "
        f"{args.max_steps or args.epochs} {'steps' if args.max_steps else 'epochs'}, seed {args.seed}",
        f"- Data: {data_source}, {args.percentage_data:.0%} of it, {n_examples} training examples of up to "
        f"{args.max_seq_length} tokens, {'packed' if args.packing else 'padded/truncated'}",
        *low_bit_lines(folder, ternary, teacher_info or {}), "",
        "## Results (held-out text, sliding-window perplexity)", "",
        format_table(table), "",
        "## Reproduce", "", "```bash", command, "```", "",
    ]
    results.atomic_write(folder / "README.md", lambda tmp: tmp.write_text("\n".join(lines)))


def low_bit_lines(folder: Path, ternary: list[str], teacher_info: dict) -> list[str]:
    lines = []
    if ternary:
        lines.append(f"- Student: ternary (BitNet b1.58) in {len(ternary)} linear layers: weights in {{-1, 0, +1}} x one absmean "
                     "scale per tensor, activations 8-bit per token, trained through a straight-through estimator. "
                     "This folder holds the latent full-precision weights and `sitra_quantization` in config.json; "
                     "sitra's loaders (eval_lm, eval_merged) rebuild the ternary layers. 'full-precision student' below "
                     "is the same trained weights run without quantisation. Pack to 1.6 bits a weight with "
                     f"`python jobs/export_ternary.py {folder}`.")
    if teacher_info:
        line = (f"- Teacher: linear layers in 8 bits (bitsandbytes LLM.int8), weights {teacher_info['teacher_weights_mib_full']:,.1f} "
                f"-> {teacher_info['teacher_weights_mib_8bit']:,.1f} MiB")
        if "teacher_8bit_kl" in teacher_info:
            line += (f"; KL(full-precision teacher || 8-bit teacher) = {teacher_info['teacher_8bit_kl']:.3g} nats/token on "
                     f"{teacher_info['teacher_8bit_tokens']:,} held-out tokens")
        lines.append(line)
    return lines


ARGS = DistillLMArgs

"""Argument groups and checks that several jobs share."""
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from sitra import data, losses
from sitra.errors import UsageError
from sitra.data.text import BUILTIN


@dataclass(kw_only=True)
class TextDataArgs:
    """Where masked-language-model text comes from."""
    dataset_name: str = field(default="wikitext", metadata={
        "help": f"datasets hub name, or '{BUILTIN}' for the offline corpus every Python ships"})
    dataset_config: str | None = field(default="wikitext-2-raw-v1", metadata={"help": "datasets config name"})
    train_file: str | None = field(default=None, metadata={"help": "local text file, one example per line"})
    eval_file: str | None = field(default=None, metadata={"help": "local held-out text file, one example per line"})
    max_seq_length: int = field(default=128, metadata={"help": "tokens per example (longer lines are cut)"})
    percentage_data: float = field(default=1.0, metadata={"help": "fraction in (0, 1] of the data to use, taken evenly"})
    mlm_probability: float = field(default=0.15, metadata={"help": "fraction of tokens chosen for masking"})


def check_data_args(args: TextDataArgs):
    if not 0 < args.percentage_data <= 1:
        raise UsageError(f"--percentage_data {args.percentage_data}: must be in (0, 1]")
    if not 0 < args.mlm_probability < 1:
        raise UsageError(f"--mlm_probability {args.mlm_probability}: must be in (0, 1)")
    if args.max_seq_length < 8:
        raise UsageError(f"--max_seq_length {args.max_seq_length}: must be at least 8")
    for flag in ("train_file", "eval_file"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            raise UsageError(f"--{flag} {path}: no such file")


def text_batches(args: TextDataArgs, tokenizer, batch_size: int, seed: int, need_train: bool = True):
    """(train batches or None, held-out batches with fixed masks) of tokenised, masked text."""
    train_lines, eval_lines = data.load_texts(args.dataset_name, args.dataset_config, args.train_file, args.eval_file)
    collate = data.MLMCollator.for_tokenizer(tokenizer, args.mlm_probability)
    held_out = data.tokenize_lines(data.take_fraction(eval_lines, args.percentage_data), tokenizer, args.max_seq_length)
    if not held_out:
        raise UsageError("the held-out text is empty: give --eval_file or more data")
    eval_batches = data.Batches(held_out, batch_size, collate, seed=seed, shuffle=False)
    if not need_train:
        return None, eval_batches
    train = data.tokenize_lines(data.take_fraction(train_lines, args.percentage_data), tokenizer, args.max_seq_length)
    if not train:
        raise UsageError("the training text is empty: give --train_file or more data")
    return data.Batches(train, batch_size, collate, seed=seed), eval_batches


def check_block(block, num_layers: int, flag: str = "--block", needs_successor: bool = False):
    last = num_layers - 2 if needs_successor else num_layers - 1
    if block is None:
        raise UsageError(f"{flag} is required: a layer index 0-{last}")
    if not 0 <= block <= last:
        why = " (it needs a following layer)" if needs_successor else ""
        raise UsageError(f"{flag} {block}: the teacher has {num_layers} layers, allowed 0-{last}{why}")


def student_shape(hidden_size: int, heads: int, d_k: int | None) -> tuple[int, int]:
    """(heads, d_k) of a student block; d_k defaults to hidden_size / heads."""
    if heads < 1:
        raise UsageError(f"--block_heads {heads}: must be at least 1")
    if d_k is None:
        if hidden_size % heads:
            divisors = [h for h in range(1, hidden_size + 1) if hidden_size % h == 0 and h <= 64]
            raise UsageError(f"--block_heads {heads} does not divide the hidden size {hidden_size}: "
                             f"give --block_d_k or use one of {', '.join(map(str, divisors))}")
        d_k = hidden_size // heads
    if d_k < 1:
        raise UsageError(f"--block_d_k {d_k}: must be at least 1")
    return heads, d_k


@dataclass(kw_only=True)
class StudentBlockArgs:
    """The teacher and the shape of the student attention that replaces one of its blocks."""
    teacher: str = field(default="bert-base-uncased", metadata={"teacher_source": True, "help": "hub id or local model folder"})
    block: int | None = field(default=None, metadata={"help": "index of the layer whose attention is replaced"})
    block_heads: int = field(default=12, metadata={"help": "attention heads of the student block"})
    block_d_k: int | None = field(default=None, metadata={"help": "width of each head (default: hidden size / heads)"})
    block_dropout: float = field(default=0.1, metadata={"help": "attention dropout of the student block"})


def check_student_block(args: StudentBlockArgs, config, needs_successor: bool = False) -> tuple[int, int]:
    """(heads, d_k) after checking --block, --block_heads, --block_d_k and --block_dropout."""
    check_block(args.block, config.num_hidden_layers, needs_successor=needs_successor)
    if not 0 <= args.block_dropout < 1:
        raise UsageError(f"--block_dropout {args.block_dropout}: must be in [0, 1)")
    return student_shape(config.hidden_size, args.block_heads, args.block_d_k)


def compare(out, target, token_mask, criterion: str, on: str = "output", temperature: float = 1.0, head=None):
    """The --criterion between a student's hidden states and the teacher's, over real tokens.

    on="output" compares the hidden states; on="logits" the MLM distributions
    softmax(head(h) / T): soft-target cross-entropy (times T^2) for CrossEntropy, the
    probabilities for MSE and L1.
    """
    loss_fn = losses.LOSSES[criterion]
    if on == "output":
        return loss_fn(out, target, token_mask[..., None])
    s, t = head(out), head(target).detach()
    if criterion == "CrossEntropy":
        return loss_fn(s, t, token_mask, temperature)
    return loss_fn(F.softmax(s.float() / temperature, -1), F.softmax(t.float() / temperature, -1), token_mask[..., None])


@torch.no_grad()
def fidelity(out, target, token_mask) -> dict:
    return {"block_mse": float(losses.mse(out, target, token_mask[..., None])),
            "block_cosine": float(losses.cosine_similarity(out, target, token_mask))}


def held_out_mean(step_loss, batches, device) -> dict:
    """The mean over held-out batches of the loss and the numbers `step_loss` reports."""
    return held_out_means([step_loss], batches, device)[0]


def held_out_means(step_losses, batches, device, prepare=None) -> list[dict]:
    """held_out_mean of several step losses, with one `prepare` (teacher pass) per batch."""
    sums, n = [{} for _ in step_losses], 0
    for batch in batches.epoch(0):
        batch = {k: v.to(device) for k, v in batch.items()}
        if prepare is not None:
            batch = prepare(batch)
        for step_loss, total in zip(step_losses, sums):
            loss, parts = step_loss(batch)
            for k, v in {"eval_loss": float(loss), **parts}.items():
                total[k] = total.get(k, 0.0) + v
        n += 1
    return [{k: v / n for k, v in total.items()} for total in sums]


def masked_kd(student_logits, teacher_logits, labels, temperature: float, alpha: float) -> tuple:
    """KL(teacher_T || student_T) * T^2 + alpha * CE(labels) over the masked positions whose
    logits are given ([N, V] each, labels [N]); returns (loss, parts)."""
    everywhere = torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
    kl = losses.kl_div(student_logits, teacher_logits, everywhere, temperature)
    ce = F.cross_entropy(student_logits.float(), labels) if len(labels) else kl * 0
    parts = {"kl": float(kl.detach()), "mlm_ce": float(ce.detach()),
             "mlm_accuracy": float((student_logits.argmax(-1) == labels).float().mean()) if len(labels) else 0.0}
    return kl + alpha * ce, parts


def train_modules(modules, job: str, runs, args, train_batches, eval_batches, step_losses, device, prepare=None) -> list[dict]:
    """The shape of every module-level job, for one module or a fused group: train each module
    (its held-out mean of its step_loss selects its best checkpoint), load the best weights back,
    and log the final held-out numbers. `prepare(batch)` (the shared teacher pass) runs once per
    batch before every module's step_loss, in training and in evaluation."""
    from contextlib import ExitStack

    from sitra import results
    from sitra.train import Trainee, train_many

    def evaluate_all():
        return held_out_means(step_losses, eval_batches, device, prepare)

    finals = []
    with ExitStack() as stack:
        logs = [stack.enter_context(results.RunLog(r.log_path, job, r.name, r.config)) for r in runs]
        trainees = [Trainee(m, loss, r, log) for m, loss, r, log in zip(modules, step_losses, runs, logs)]
        progresses = train_many(trainees, train_batches, args, prepare, evaluate_all)
        for t in trainees:
            t.model.load_state_dict(load_weights(t.run.checkpoint_dir))
            t.model.eval()
        with torch.inference_mode():
            all_final = evaluate_all()
        for t, progress, final in zip(trainees, progresses, all_final):
            final["best_step"] = progress.best_step
            t.log.complete(final)
            finals.append(final)
            print(f"{t.run.name}: best step {progress.best_step}, held-out " +
                  ", ".join(f"{k} {v:.4g}" for k, v in final.items() if k != "best_step"))
            print(f"checkpoint: {t.run.checkpoint_dir / 'best.safetensors'}; log: {t.run.log_path}")
    return finals


def load_weights(checkpoint_dir: Path) -> dict:
    """The best weights a finished run folder holds (best.safetensors)."""
    from safetensors.torch import load_file

    path = Path(checkpoint_dir) / "best.safetensors"
    if not path.exists():
        raise UsageError(f"{checkpoint_dir}: no best.safetensors (the run did not finish)")
    return load_file(str(path))

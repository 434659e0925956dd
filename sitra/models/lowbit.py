"""Low-bit students and teachers.

Students: BitNet b1.58 ternary linear layers (weights in {-1, 0, +1} times one scale per tensor,
8-bit activations) trained through a straight-through estimator on full-precision latent
weights, for any architecture; saved with plain save_pretrained plus a marker in the config, and
exported to a real 1.6-bit file (five weights a byte). Teachers: linear layers held in 8 bits by
bitsandbytes (LLM.int8), which runs on the CPU and on CUDA alike.
"""
import contextlib
import importlib.util
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from sitra.errors import UsageError
from sitra.models import bert
from sitra.models.capture import transformer_layers

EPS = 1e-5
STUDENT_BITS = (1.58,)
TEACHER_BITS = (8,)
PACKED_FILE = "ternary.safetensors"
PACK_FORMAT = "sitra-ternary-base3-v1"
MIB = 2**20


# ---------------------------------------------------------------------------------------------
# arguments shared by every distillation job


@dataclass(kw_only=True)
class LowBitArgs:
    """Low-bit student and teacher flags; `check_lowbit` resolves the aliases."""
    student_bits: float | None = field(default=None, metadata={
        "help": "1.58: ternary (BitNet b1.58) student linear layers inside its transformer layers; leave out for full precision"})
    student_model_as_bitnet: bool = field(default=False, metadata={"help": "the same as --student_bits 1.58"})
    quantize_modules: list[str] = field(default_factory=list, metadata={
        "help": "regular expressions naming the student's nn.Linear layers to make ternary "
                "(default: every Linear inside its transformer layers, not embeddings or the output head)"})
    teacher_bits: int | None = field(default=None, metadata={
        "help": "8: hold the frozen teacher's linear layers in 8 bits (bitsandbytes LLM.int8); leave out for full precision"})
    teacher_load_in_8bit: bool = field(default=False, metadata={"help": "the same as --teacher_bits 8"})


def check_lowbit(args: LowBitArgs):
    """Resolve --student_model_as_bitnet and --teacher_load_in_8bit into the bit fields; one-line
    UsageErrors for anything else (before any compute)."""
    if args.student_model_as_bitnet:
        if args.student_bits not in (None, 1.58):
            raise UsageError(f"--student_model_as_bitnet means --student_bits 1.58, not {args.student_bits:g}: give one of them")
        args.student_bits = 1.58
    if args.student_bits is not None and args.student_bits not in STUDENT_BITS:
        raise UsageError(f"--student_bits {args.student_bits:g}: allowed 1.58 (ternary weights); leave it out for a full-precision student")
    if args.quantize_modules and args.student_bits is None:
        raise UsageError("--quantize_modules needs --student_bits 1.58")
    for pattern in args.quantize_modules:
        try:
            re.compile(pattern)
        except re.error as e:
            raise UsageError(f"--quantize_modules {pattern}: not a regular expression ({e})") from None
    if args.teacher_load_in_8bit:
        if args.teacher_bits not in (None, 8):
            raise UsageError(f"--teacher_load_in_8bit means --teacher_bits 8, not {args.teacher_bits}: give one of them")
        args.teacher_bits = 8
    if args.teacher_bits is not None and args.teacher_bits not in TEACHER_BITS:
        raise UsageError(f"--teacher_bits {args.teacher_bits}: allowed 8; leave it out for a full-precision teacher")
    if args.teacher_bits and importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("--teacher_bits 8 needs bitsandbytes: pip install bitsandbytes")


def check_student_modules(config, args: LowBitArgs, auto) -> list[str]:
    """The student Linear layers --quantize_modules selects, found on a weightless (meta-device)
    model built from `config`, so a pattern that matches nothing fails before any compute."""
    if args.student_bits is None:
        return []
    with torch.device("meta"):
        model = auto.from_config(config)
    return select_linear(model, args.quantize_modules or None)


# ---------------------------------------------------------------------------------------------
# the ternary quantiser


def ternary_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in {-1, 0, +1}, scale) of a weight tensor: scale = mean |w| (absmean, one per
    tensor, at least 1e-5), codes = clamp(round(w / scale), -1, 1). Computed in float32."""
    w = w.detach().float()
    scale = w.abs().mean().clamp(min=EPS)
    return (w / scale).round().clamp(-1, 1), scale


def activation_quant(x: torch.Tensor) -> torch.Tensor:
    """Per token (last dimension) 8-bit absmax fake quantisation: s = 127 / max(max_i |x_i|, 1e-5),
    x~ = clamp(round(s x), -128, 127) / s."""
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    return (x * s).round().clamp(-128, 127) / s


class _TernarySTE(torch.autograd.Function):
    """Forward: scale * codes of the latent weight; backward: the gradient passes unchanged."""

    @staticmethod
    def forward(ctx, w):
        codes, scale = ternary_weight(w)
        return (codes * scale).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ActivationSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return activation_quant(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class TernaryLinear(nn.Linear):
    """BitNet b1.58 linear layer over a full-precision latent weight W (names as nn.Linear's):

        gamma = mean_ij |W_ij|                         (per tensor, clamped at 1e-5)
        W~    = clamp(round(W / gamma), -1, 1)         (in {-1, 0, +1})
        s_t   = 127 / max_i |x_ti|                     (per token t, clamped at 1e-5 inside)
        x~_t  = clamp(round(s_t x_t), -128, 127) / s_t
        y     = x~ (gamma W~)^T + b                    (bias in full precision)

    Backward is straight-through: dL/dW := dL/d(gamma W~) and dL/dx := dL/dx~, so the latent
    weights and earlier layers get gradients. With `quantize` False it is a plain nn.Linear.
    """
    quantize = True

    def forward(self, x):
        if not self.quantize:
            return super().forward(x)
        return F.linear(_ActivationSTE.apply(x), _TernarySTE.apply(self.weight), self.bias)


class FrozenTernaryLinear(nn.Module):
    """An exported ternary layer: int8 codes and a float32 scale in memory (a quarter of float32),
    the same forward as TernaryLinear's, so outputs are bit-for-bit the trained model's."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.codes = nn.Parameter(codes.to(torch.int8), requires_grad=False)  # a parameter: counted as the weights
        self.register_buffer("scale", scale.float().reshape(()))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        weight = (self.codes.float() * self.scale).to(x.dtype)
        return F.linear(activation_quant(x), weight, self.bias)


@contextlib.contextmanager
def full_precision(model):
    """Run a ternary model on its latent weights, without quantisation, inside the block."""
    layers = [m for m in model.modules() if isinstance(m, TernaryLinear)]
    for m in layers:
        m.quantize = False
    try:
        yield model
    finally:
        for m in layers:
            m.quantize = True


# ---------------------------------------------------------------------------------------------
# choosing and swapping layers


def select_linear(model, patterns: list[str] | None = None, flag: str = "--quantize_modules") -> list[str]:
    """Names of the nn.Linear modules to make ternary: those whose name matches any regular
    expression in `patterns` (each must match one), else every Linear inside the transformer layers."""
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, FrozenTernaryLinear)]
    if patterns:
        chosen = set()
        for p in patterns:
            hits = [n for n in linear if re.search(p, n)]
            if not hits:
                raise UsageError(f"{flag} {p}: matches no nn.Linear of the student (they are named like {', '.join(linear[:3]) or 'nothing'})")
            chosen.update(hits)
        return [n for n in linear if n in chosen]
    try:
        inside = {id(m) for layer in transformer_layers(model) for m in layer.modules()}
    except ValueError as e:
        raise UsageError(f"{e}: name the layers to make ternary with {flag}") from None
    names = [n for n, m in model.named_modules() if n in linear and id(m) in inside]
    if not names:
        raise UsageError(f"{type(model).__name__}: no nn.Linear inside its transformer layers; name them with {flag}")
    return names


def _swap(model, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def ternarize(model, patterns: list[str] | None = None, names: list[str] | None = None) -> list[str]:
    """Make the chosen nn.Linear layers TernaryLinear in place (same parameters, same state_dict
    names) and mark the config so a reload knows: config.sitra_quantization."""
    names = names if names is not None else select_linear(model, patterns)
    for name in names:
        old = model.get_submodule(name)
        new = TernaryLinear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
        new.weight, new.bias = old.weight, old.bias
        new.train(old.training)
        _swap(model, name, new)
    model.config.sitra_quantization = {"student_bits": 1.58, "modules": list(names)}
    return list(names)


def quantization_marker(config) -> dict | None:
    return getattr(config, "sitra_quantization", None) or None


def apply_marker(model):
    """Rebuild the ternary layers of a model whose config carries the marker (after a plain
    from_pretrained, which loads the latent weights into nn.Linear layers)."""
    marker = quantization_marker(model.config)
    if marker and not marker.get("packed"):
        ternarize(model, names=marker["modules"])
    return model


def name_suffix(args: LowBitArgs) -> str:
    """What a distillation job adds to its run name, so low-bit runs never share a folder with full-precision ones."""
    return ("_ternary" if args.student_bits else "") + ("_teacher8bit" if args.teacher_bits else "")


def prepare_student(student, args: LowBitArgs) -> list[str]:
    """What a distillation job does to its student after building it: nothing, or ternarize."""
    if args.student_bits is None:
        return []
    names = ternarize(student, args.quantize_modules or None)
    n = sum(student.get_submodule(m).weight.numel() for m in names)
    total = sum(p.numel() for p in student.parameters())
    print(f"ternary student: {len(names)} linear layers, {n:,} of its {total:,} weights in {{-1, 0, +1}} x scale")
    return names


# ---------------------------------------------------------------------------------------------
# the packed 1.6-bit file: five ternary digits a byte (3^5 = 243 <= 256)

POWERS = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int16)


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [ceil(n / 5)]: digit d = code + 1 in {0, 1, 2}, byte = sum_k d_k 3^k over 5 codes."""
    d = codes.flatten().to(torch.int16) + 1
    d = torch.cat([d, d.new_zeros(-len(d) % 5)]).view(-1, 5)
    return (d * POWERS).sum(1).to(torch.uint8)


def unpack_ternary(packed: torch.Tensor, shape) -> torch.Tensor:
    """int8 codes in {-1, 0, +1} of the given shape, from pack_ternary's bytes."""
    v = packed.to(torch.int16)[:, None]
    digits = (v // POWERS) % 3
    n = torch.Size(shape).numel()
    return (digits.flatten()[:n] - 1).to(torch.int8).view(shape)


def export_packed(model, folder, dtype: torch.dtype = torch.float32, tokenizer=None) -> Path:
    """Write `folder` with config.json (marker: packed), the tokenizer and ternary.safetensors:
    every TernaryLinear as packed codes + scale, every other tensor in `dtype` (float32 keeps
    the outputs exact), tied tensors once."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ternary = {n: m for n, m in model.named_modules() if isinstance(m, TernaryLinear)}
    tensors, shapes, aliases, seen = {}, {}, {}, {}
    for name, m in ternary.items():
        codes, scale = ternary_weight(m.weight.detach())
        tensors[f"{name}.ternary"] = pack_ternary(codes)
        tensors[f"{name}.scale"] = scale.reshape(1)
        shapes[name] = list(m.weight.shape)
    skip = {f"{n}.weight" for n in ternary}
    for key, t in model.state_dict().items():
        if key in skip:
            continue
        ident = (t.data_ptr(), t.nbytes, tuple(t.shape))
        if ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = (t.to(dtype) if t.is_floating_point() else t).contiguous().clone()
    meta = {"format": PACK_FORMAT, "shapes": json.dumps(shapes), "aliases": json.dumps(aliases), "dtype": str(dtype).split(".")[-1]}
    save_file(tensors, str(folder / PACKED_FILE), metadata=meta)
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.sitra_quantization = {"student_bits": 1.58, "modules": list(ternary), "packed": PACK_FORMAT}
    config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder / PACKED_FILE


def model_class(config):
    """The model class named in config.architectures (transformers' or sitra's own)."""
    for arch in config.architectures or []:
        cls = getattr(transformers, arch, None) or getattr(bert, arch, None)
        if cls is not None:
            return cls
    raise UsageError(f"config.json names no model class this version knows ({config.architectures})")


def is_packed(config) -> bool:
    marker = quantization_marker(config)
    return bool(marker and marker.get("packed"))


def load_packed(folder, config=None, auto=None):
    """The model an export_packed folder holds, in eval mode, with FrozenTernaryLinear layers."""
    from safetensors import safe_open
    from transformers import AutoConfig

    folder = Path(folder)
    config = config or AutoConfig.from_pretrained(folder)
    path = folder / PACKED_FILE
    if not path.is_file():
        raise UsageError(f"{folder}: the config says packed ternary, but {PACKED_FILE} is missing")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != PACK_FORMAT:
        raise UsageError(f"{path}: format {meta.get('format')!r}, expected {PACK_FORMAT}")
    shapes, aliases = json.loads(meta["shapes"]), json.loads(meta["aliases"])
    dtype = getattr(torch, meta.get("dtype", "float32"))
    auto = auto or model_class(config)
    model = (auto.from_config(config) if hasattr(auto, "from_config") else auto(config)).to(dtype)
    for name, shape in shapes.items():
        codes = unpack_ternary(state.pop(f"{name}.ternary"), shape)
        bias = state.pop(f"{name}.bias", None)
        _swap(model, name, FrozenTernaryLinear(codes, state.pop(f"{name}.scale"), None if bias is None else bias.to(dtype)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    frozen = {f"{n}.{p}" for n in shapes for p in ("codes", "scale", "bias")}
    missing = [k for k in missing if k not in aliases and k not in frozen]
    if missing or unexpected:
        raise UsageError(f"{path}: does not fit its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


# ---------------------------------------------------------------------------------------------
# 8-bit teachers


def weight_bytes(model) -> int:
    """Bytes of the tensors a model holds (its state_dict), each shared tensor once."""
    seen = {}
    for t in model.state_dict().values():
        if isinstance(t, torch.Tensor):
            seen[(t.data_ptr(), t.nbytes)] = t.nbytes
    return sum(seen.values())


def _drop_cast_notice(record) -> bool:
    """LLM.int8 quantises float32 activations through float16 by design; bitsandbytes says so on every call."""
    return "inputs will be cast" not in record.getMessage()


def quantize_8bit(model, device, threshold: float = 6.0) -> list[str]:
    """Replace every nn.Linear (except one tied to the input embeddings) by a bitsandbytes
    Linear8bitLt, moving and quantising one layer at a time, so the full-precision model never
    sits on `device` whole. threshold: LLM.int8's outlier threshold (the transformers default)."""
    import bitsandbytes as bnb

    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop_cast_notice)
    embeddings = model.get_input_embeddings()
    tied = embeddings.weight if embeddings is not None else None
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight is not tied]
    for name in names:
        old = model.get_submodule(name)
        new = bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias=old.bias is not None,
                                  has_fp16_weights=False, threshold=threshold)
        new.load_state_dict(old.state_dict())
        _swap(model, name, new.to(device).eval())  # .to() quantises the weight
        new.weight.requires_grad_(False)
        if new.bias is not None:
            new.bias.requires_grad_(False)
    return names


@torch.inference_mode()
def _outputs(model, batch, device):
    """(rows, are they logits, are they per token): the logits (the last hidden state of an encoder
    without a head) at the real tokens, or one row a sequence where the model scores whole
    sequences (a sequence classifier)."""
    mask = batch["attention_mask"].to(device)
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=mask)
    logits = getattr(out, "logits", None)
    x = logits if logits is not None else out.last_hidden_state
    per_token = x.dim() == 3
    return (x[mask.bool()] if per_token else x).float(), logits is not None, per_token


def quantize_teacher(teacher, device, args: LowBitArgs, held_out=(), max_tokens: int = 1024) -> dict:
    """Put a frozen full-precision teacher on `device`, in 8 bits when --teacher_bits 8. Reports
    its weight memory before and after and how far its outputs move on up to `max_tokens`
    held-out tokens (examples, for a sequence classifier): KL(full precision || 8-bit) per token
    (per example) where it has logits, the relative error of the last hidden state for encoders.
    The full-precision reference runs where the teacher was loaded (the CPU), so it never has to
    fit on the GPU. Returns the numbers to log."""
    device = torch.device(device)
    if not args.teacher_bits:
        teacher.to(device)
        return {}
    before = weight_bytes(teacher)
    source = next(teacher.parameters()).device
    batches, references, tokens = [], [], 0
    for batch in held_out:
        if tokens >= max_tokens:
            break
        batches.append(batch)
        references.append(_outputs(teacher, batch, source)[0][: max_tokens - tokens].cpu())
        tokens += len(references[-1])
    names = quantize_8bit(teacher, device)
    teacher.to(device).eval()
    after = weight_bytes(teacher)
    info = {"teacher_bits": 8, "teacher_weights_mib_full": before / MIB, "teacher_weights_mib_8bit": after / MIB}
    text = f"8-bit teacher: {len(names)} linear layers via bitsandbytes, weights {before / MIB:,.1f} MiB -> {after / MIB:,.1f} MiB ({after / before:.2f}x)"
    if batches:
        kl = err = n = 0.0
        for batch, ref in zip(batches, references):
            (new, is_logits, per_token), ref = _outputs(teacher, batch, device), ref.to(device)
            new = new[: len(ref)]
            if is_logits:
                p = F.log_softmax(ref, -1)
                kl += float((p.exp() * (p - F.log_softmax(new, -1))).sum())
            else:
                err += float((new - ref).pow(2).sum()) / max(float(ref.pow(2).sum()), EPS) * len(ref)
            n += len(ref)
        unit = "token" if per_token else "example"
        if is_logits:
            info["teacher_8bit_kl"] = kl / n
            text += f"; KL(full precision || 8-bit) = {kl / n:.3g} nats/{unit} on {int(n):,} held-out {unit}s"
        else:
            info["teacher_8bit_hidden_rel_error"] = err / n
            text += f"; relative squared error of its last hidden state = {err / n:.3g} on {int(n):,} held-out {unit}s"
        info[f"teacher_8bit_{unit}s"] = int(n)
    print(text)
    return info


def card_lines(folder, ternary: list[str], teacher_info: dict) -> list[str]:
    """Model-card sentences on what is low-bit: the ternary student (and how to reload and pack it),
    the 8-bit teacher (its memory and how far 8 bits moved its outputs)."""
    lines = []
    if ternary:
        lines.append(f"Student: ternary (BitNet b1.58) in {len(ternary)} linear layers: weights in "
                     "{-1, 0, +1} x one absmean scale per tensor, activations 8-bit per token, trained through a "
                     "straight-through estimator. This folder holds the latent full-precision weights and "
                     "`sitra_quantization` in config.json; `sitra.models.load_model` (and so the eval jobs) rebuilds the "
                     "ternary layers, where a plain `from_pretrained` gives the latent weights. Pack to 1.6 bits "
                     f"a weight with `python jobs/export_ternary.py {folder}`.")
    if teacher_info:
        line = (f"Teacher: linear layers in 8 bits (bitsandbytes LLM.int8), weights {teacher_info['teacher_weights_mib_full']:,.1f} "
                f"-> {teacher_info['teacher_weights_mib_8bit']:,.1f} MiB")
        unit = "token" if "teacher_8bit_tokens" in teacher_info else "example"
        if "teacher_8bit_kl" in teacher_info:
            line += (f"; KL(full-precision teacher || 8-bit teacher) = {teacher_info['teacher_8bit_kl']:.3g} nats/{unit} on "
                     f"{teacher_info[f'teacher_8bit_{unit}s']:,} held-out {unit}s")
        lines.append(line)
    return lines

"""Pack a student trained with --student_bits 1.58 into a real low-bit file: five ternary weights
a byte (1.6 bits) plus one float32 scale per layer in safetensors, the other tensors as they were.
sitra's loaders (eval_lm, eval_merged, models.load_model) rebuild a model whose outputs equal the
trained model's quantised forward bit for bit (with --dtype float32); the job checks that."""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from sitra import models
from sitra.errors import UsageError
from sitra.models import lowbit
from sitra.outputs import check_output, write_folder

JOB = "export_ternary"


@dataclass(kw_only=True)
class ExportTernaryArgs:
    model_dir: str | None = field(default=None, metadata={"help": "folder of a model trained with --student_bits 1.58 (also positional)"})
    output: str | None = field(default=None, metadata={"help": "folder to write (default: MODEL_DIR_ternary beside it)"})
    dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={
        "help": "dtype of the tensors that stay unquantised (embeddings, norms, output head, biases); "
                "float32 keeps the outputs exact, bfloat16 halves them at a rounding error"})
    overwrite: bool = field(default=False, metadata={"help": "replace the --output folder an earlier run of this job wrote"})


def check(args: ExportTernaryArgs):
    if not args.model_dir:
        raise UsageError("MODEL_DIR: name the folder of a model trained with --student_bits 1.58")
    config = models.load_config(args.model_dir, "MODEL_DIR")
    marker = lowbit.quantization_marker(config)
    if not marker:
        raise UsageError(f"MODEL_DIR {args.model_dir}: not a ternary model (its config.json has no sitra_quantization; "
                         "train it with --student_bits 1.58)")
    if marker.get("packed"):
        raise UsageError(f"MODEL_DIR {args.model_dir}: already packed")
    source = Path(args.model_dir)
    output = Path(args.output) if args.output else source.with_name(source.name + "_ternary")
    if output.resolve() == source.resolve():
        raise UsageError(f"--output {output}: must differ from MODEL_DIR")
    check_output(output, JOB, args.overwrite)
    return config, source, output


def folder_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in Path(folder).glob(pattern))


@torch.inference_mode()
def max_difference(a, b, vocab_size: int, seed: int = 0) -> float:
    """Largest |a - b| of the two models' outputs on a random batch of token ids."""
    ids = torch.randint(vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    return float((a(input_ids=ids)[0].float() - b(input_ids=ids)[0].float()).abs().max())


def run(args: ExportTernaryArgs) -> Path:
    config, source, output = check(args)
    cls = lowbit.model_class(config)
    model = models.load_model(str(source), "cpu", flag="MODEL_DIR", auto=cls)
    try:
        tokenizer = models.load_tokenizer(str(source), "MODEL_DIR")
    except UsageError:
        tokenizer = None
    write_folder(output, JOB, lambda tmp: lowbit.export_packed(model, tmp, getattr(torch, args.dtype), tokenizer))
    packed = models.load_model(str(output), "cpu", flag="--output", auto=cls)
    diff = max_difference(model, packed, config.vocab_size)
    sizes = [model.get_submodule(m).weight.numel() for m in config.sitra_quantization["modules"]]
    n, ternary_bytes = sum(sizes), sum(-(-k // 5) for k in sizes)
    print(f"{len(config.sitra_quantization['modules'])} ternary layers, {n:,} weights in {ternary_bytes:,} bytes "
          f"({8 * ternary_bytes / n:.2f} bits a weight)")
    print(f"size on disk: {folder_bytes(source) / 2**20:,.2f} MiB ({source.name}, {next(model.parameters()).dtype}) -> "
          f"{folder_bytes(output) / 2**20:,.2f} MiB packed ({args.dtype} for the other tensors)")
    print(f"outputs of the reloaded packed model vs the trained model's quantised forward: max |difference| {diff:.3g}"
          + (" (exact)" if diff == 0 else f" ({args.dtype} rounding of the unquantised tensors)"))
    print(f"packed model: {output}")
    return output


ARGS = ExportTernaryArgs

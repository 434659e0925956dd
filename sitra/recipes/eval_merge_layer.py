"""Evaluate one merged layer: its held-out fidelity to the teacher's pair of layers, and the MLM
metrics of the teacher with that pair replaced."""
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sitra import models, results, runtime
from sitra.args import PlaceArgs, check_block
from sitra.data.mlm import text_batches
from sitra.data.text import TextDataArgs, check_data_args
from sitra.evaluate import evaluate_models, format_table
from sitra.models.assembly import find_merge_run, merge_run_start, read_merged
from sitra.models.merged import merge_step, merge_teacher_pass
from sitra.train import held_out_mean

JOB = "eval_merge_layer"


@dataclass(kw_only=True)
class EvalMergeLayerArgs(TextDataArgs, PlaceArgs):
    teacher: str = field(default="bert-base-uncased", metadata={"teacher_source": True, "help": "hub id or local model folder"})
    block: int | None = field(default=None, metadata={"help": "first layer of the merged pair"})
    block_heads: int | None = field(default=None, metadata={"help": "heads of the merge run to evaluate (where several exist)"})
    block_d_k: int | None = field(default=None, metadata={"help": "d_k of the merge run to evaluate (where several exist)"})
    checkpoint: str | None = field(default=None, metadata={"help": "the merge run folder (default: found from the flags above)"})
    batch_size: int = field(default=32, metadata={"help": "examples per batch"})
    seed: int = field(default=42, metadata={"help": "seed of the fixed masks"})


def run(args: EvalMergeLayerArgs) -> dict:
    check_data_args(args)
    results.check_results_place(args)
    config = models.load_config(args.teacher)
    check_block(args.block, config.num_hidden_layers, needs_successor=True)
    folder = Path(args.checkpoint) if args.checkpoint else find_merge_run(
        Path(args.storage_directory), args.teacher, args.block, args.block_heads, args.block_d_k, config.hidden_size)
    merge_run_start(folder, args.teacher, "--checkpoint")
    tokenizer = models.load_tokenizer(args.teacher)
    _, batches = text_batches(args, tokenizer, args.batch_size, args.seed, need_train=False)
    device = runtime.pick_device(args.device)
    teacher = models.load_model(args.teacher, device)
    block, layer = read_merged(folder, teacher, args.teacher, flag="--checkpoint")
    with torch.inference_mode():
        prepare = merge_teacher_pass(teacher, [block])
        layer_fit = held_out_mean(lambda b: merge_step(layer, teacher, block, prepare(b), "MSE", "output", 1.0), batches, device)
    merged = models.with_merged_layers(teacher, {block: layer})
    metrics = evaluate_models({"teacher": teacher, "merged": merged}, "teacher", batches, device)
    metrics["merged"].update(layer_mse=layer_fit["block_mse"], layer_cosine=layer_fit["block_cosine"])
    run_name = args.run_name or f"eval_{folder.name}"
    log_path = Path(args.storage_directory) / "eval_results" / f"{run_name}.h5"
    with results.RunLog(log_path, JOB, run_name, results.config_dict(args)) as log:
        log.complete({f"{n}/{k}": v for n, m in metrics.items() for k, v in m.items()})
    print(f"merged layers {block} and {block + 1} ({folder}):")
    print(format_table(metrics, gap=("merged", "teacher")))
    print(f"results: {log_path}")
    return metrics


ARGS = EvalMergeLayerArgs

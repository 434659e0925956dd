"""Conditioned fine-tuning of a merged model: its layers are trained in order, each fed by the
outputs of the already-trained layers below it (not by the teacher's hidden states) and trained
to produce the output of the last teacher layer it replaces, so errors do not pile up."""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from sitra import models, results, runtime
from sitra.data.mlm import text_batches
from sitra.data.text import TextDataArgs, check_data_args
from sitra.errors import UsageError
from sitra.evaluate import evaluate_models, format_table
from sitra.losses import compare, fidelity
from sitra.models.assembly import load_weights, save_model_folder
from sitra.train import TrainArgs, check_train_args, held_out_mean, train

JOB = "finetune_conditioned_fully_merged"


@dataclass(kw_only=True)
class ConditionedArgs(TrainArgs, TextDataArgs):
    teacher: str = field(default="bert-base-uncased", metadata={"teacher_source": True, "help": "hub id or local model folder"})
    model: str | None = field(default=None, metadata={"help": "the merged model folder (default: checkpoints/merged_model)"})
    passes: int = field(default=1, metadata={"help": "sweeps over the layers, bottom to top; --epochs/--max_steps count per layer"})
    criterion: Literal["MSE", "L1"] = field(default="MSE", metadata={"help": "loss between a layer's output and the teacher's"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (AdamW)"})


@torch.inference_mode()
def stage_input(model, layer: int, batch):
    """What layer `layer` is fed: the model's own embeddings and (already trained) lower layers."""
    embedded = model.base_model.embeddings(input_ids=batch["input_ids"])
    return models.run_layers(model, embedded, batch["attention_mask"], stop=layer)


def run(args: ConditionedArgs):
    check_train_args(args)
    check_data_args(args)
    if args.passes < 1:
        raise UsageError(f"--passes {args.passes}: must be at least 1")
    model_path = args.model or str(Path(args.storage_directory) / "checkpoints" / "merged_model")
    models.load_config(args.teacher)
    models.load_config(model_path, "--model")
    tokenizer = models.load_tokenizer(args.teacher)
    train_batches, eval_batches = text_batches(args, tokenizer, args.batch_size, args.seed)
    run_ = results.open_run(args, f"conditioned_{args.criterion}_p{args.passes}")
    device = runtime.pick_device(args.device)
    runtime.seed_everything(args.seed)
    teacher = models.load_model(args.teacher, device)
    model = models.load_model(model_path, device, flag="--model")
    targets = [src[-1] + 1 for src in models.layer_sources(model)]
    summary = {}
    with results.RunLog(run_.log_path, JOB, run_.name, run_.config) as job_log:
        job_log.start()
        for p in range(args.passes):
            for k, layer in enumerate(models.encoder_layers(model)):
                stage = f"pass{p}_layer{k}"
                stage_run = results.Run(f"{run_.name}/{stage}", run_.checkpoint_dir / stage,
                                        run_.log_path.with_suffix("") / f"{stage}.h5", run_.config)
                stage_run.checkpoint_dir.mkdir(parents=True, exist_ok=True)

                def step_loss(batch, k=k, layer=layer):
                    token_mask = batch["attention_mask"].bool()
                    x = stage_input(model, k, batch).clone()
                    with torch.inference_mode():
                        target = teacher.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                                    output_hidden_states=True).hidden_states[targets[k]]
                    target = target.clone()
                    out = models.apply_layers([layer], model.config, x, batch["attention_mask"])
                    return compare(out, target, token_mask, args.criterion), fidelity(out, target, token_mask)

                for q in layer.parameters():
                    q.requires_grad_(True)
                done = stage_run.log_path.exists() and results.read_log(stage_run.log_path)["attrs"]["status"] == "complete"
                if not done:
                    with results.RunLog(stage_run.log_path, JOB, stage_run.name, run_.config) as log:
                        train(layer, train_batches, step_loss, args, stage_run, log,
                              lambda: held_out_mean(step_loss, eval_batches, device))
                        layer.load_state_dict(load_weights(stage_run.checkpoint_dir))
                        log.complete({})
                layer.load_state_dict(load_weights(stage_run.checkpoint_dir))
                layer.eval()
                for q in layer.parameters():
                    q.requires_grad_(False)
                with torch.inference_mode():
                    fit = held_out_mean(step_loss, eval_batches, device)
                summary.update({f"{stage}/block_mse": fit["block_mse"], f"{stage}/block_cosine": fit["block_cosine"]})
                job_log.eval(p * len(targets) + k, **{"layer": k, "pass": p, **fit})
                print(f"{stage}: held-out MSE {fit['block_mse']:.4g}, cosine {fit['block_cosine']:.4f}")
        output = run_.checkpoint_dir / "model"
        save_model_folder(model, tokenizer, output, JOB, own=True)
        metrics = evaluate_models({"teacher": teacher, "before": models.load_model(model_path, device, flag="--model"),
                                   "conditioned": model}, "teacher", eval_batches, device)
        job_log.complete(summary | {f"{n}/{k}": v for n, m in metrics.items() for k, v in m.items()})
    print(format_table(metrics, gap=("conditioned", "teacher")))
    print(f"model: {output}; log: {run_.log_path}")
    return run_


ARGS = ConditionedArgs

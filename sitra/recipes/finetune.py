"""Fine-tune a smaller sitra model (merged layers, retrained blocks) end to end against its teacher:
KD on the MLM outputs over masked tokens, optional MLM cross-entropy, and optional hidden-state
MSE between each layer and the teacher layer it stands for (the only term for teachers without an
MLM head)."""
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sitra import losses, models, results, runtime
from sitra.args import KDArgs, check_kd
from sitra.data.mlm import text_batches
from sitra.data.text import TextDataArgs, check_data_args
from sitra.errors import UsageError
from sitra.evaluate import evaluate_models, format_table
from sitra.losses import masked_kd
from sitra.models.assembly import load_weights, save_model_folder
from sitra.train import TrainArgs, check_train_args, held_out_mean, train


@dataclass(kw_only=True)
class FinetuneArgs(TrainArgs, TextDataArgs, KDArgs):
    ALPHA_MEANING = "ce_added"
    KD_DEFAULTS = (1.0, 0.0)

    teacher: str = field(default="bert-base-uncased", metadata={"teacher_source": True, "help": "hub id or local model folder"})
    model: str | None = field(default=None, metadata={"help": "the model folder to fine-tune (default: the job's)"})
    hidden_weight: float = field(default=0.0, metadata={
        "help": "weight of the MSE between each layer's output and that of the last teacher layer it replaces"})
    trainable_layers: str = field(default="all", metadata={"help": "'all' (the whole model) or encoder layers to train, e.g. 0,2"})
    lr: float = field(default=5e-5, metadata={"help": "peak learning rate (AdamW)"})


def parse_layers(text: str, n: int) -> list[int] | None:
    if text == "all":
        return None
    try:
        layers = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        layers = []
    if not layers or not all(0 <= i < n for i in layers):
        raise UsageError(f"--trainable_layers {text}: 'all' or layer indices 0-{n - 1}, e.g. 0,2")
    return layers


def run_finetune(args: FinetuneArgs, job: str, default_model: str):
    check_train_args(args)
    check_data_args(args)
    check_kd(args)
    model_path = args.model or str(Path(args.storage_directory) / "checkpoints" / default_model)
    teacher_config, model_config = models.load_config(args.teacher), models.load_config(model_path, "--model")
    kd = models.has_mlm_head(teacher_config)
    if not kd and not args.hidden_weight > 0:
        raise UsageError(f"--teacher {args.teacher} has no MLM head to distil from: fine-tune on hidden states "
                         "with --hidden_weight 1")
    if kd and not models.has_mlm_head(model_config):
        raise UsageError(f"--model {model_path}: has no MLM head, but the teacher's MLM outputs are distilled")
    trainable = parse_layers(args.trainable_layers, model_config.num_hidden_layers)
    tokenizer = models.load_tokenizer(args.teacher)
    train_batches, eval_batches = text_batches(args, tokenizer, args.batch_size, args.seed)
    run_ = results.open_run(args, f"{job}_T{args.temperature:g}_{args.weights_name()}_h{args.hidden_weight:g}_{args.trainable_layers.replace(',', '-')}")
    device = runtime.pick_device(args.device)
    runtime.seed_everything(args.seed)
    teacher = models.load_model(args.teacher, device)
    model = models.load_model(model_path, device, flag="--model")
    params = model.parameters() if trainable is None else (p for i in trainable for p in models.encoder_layers(model)[i].parameters())
    for p in params:
        p.requires_grad_(True)
    targets = [src[-1] + 1 for src in models.layer_sources(model)]  # teacher hidden state each layer imitates

    def step_loss(batch):
        masked = batch["labels"] != -100
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        with torch.inference_mode():
            t = teacher.base_model(**inputs)
            teacher_logits = teacher.cls(t.last_hidden_state[masked]) if kd else None
        s = model.base_model(**inputs)
        loss, parts = masked_kd(model.cls(s.last_hidden_state[masked]), teacher_logits.clone(), batch["labels"][masked],
                                args.objective()) if kd else (0.0, {})
        if args.hidden_weight:
            token_mask = batch["attention_mask"].bool()[..., None]
            hidden = sum(losses.mse(s.hidden_states[k + 1], t.hidden_states[j].clone(), token_mask)
                         for k, j in enumerate(targets)) / len(targets)
            loss = loss + args.hidden_weight * hidden
            parts["hidden_mse"] = hidden.detach()
        return loss, parts

    with results.RunLog(run_.log_path, job, run_.name, run_.config) as log:
        progress = train(model, train_batches, step_loss, args, run_, log,
                         lambda: held_out_mean(step_loss, eval_batches, device))
        model.load_state_dict(load_weights(run_.checkpoint_dir), strict=False)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        output = run_.checkpoint_dir / "model"
        save_model_folder(model, tokenizer, output, job, own=True)
        metrics = evaluate_models({"teacher": teacher, "before": models.load_model(model_path, device, flag="--model"),
                                   "finetuned": model}, "teacher", eval_batches, device)
        log.complete({f"{n}/{k}": v for n, m in metrics.items() for k, v in m.items()} | {"best_step": progress.best_step})
    print(format_table(metrics, gap=("finetuned", "teacher")))
    print(f"fine-tuned model: {output}; log: {run_.log_path}")
    return run_

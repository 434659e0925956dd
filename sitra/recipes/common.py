"""The shape of the module-level jobs (a block, a merged layer, alone or fused): train, choose the
best checkpoint on held-out batches, log the final numbers."""
from contextlib import ExitStack

import torch

from sitra import results
from sitra.models.assembly import load_weights
from sitra.train import Trainee, train_many


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
            for k, v in {"eval_loss": loss, **parts}.items():  # summed as float64 tensors: no host sync per batch
                total[k] = total.get(k, 0.0) + torch.as_tensor(v).detach().double()
        n += 1
    return [{k: float(v) / n for k, v in total.items()} for total in sums]


def train_modules(modules, job: str, runs, args, train_batches, eval_batches, step_losses, device, prepare=None) -> list[dict]:
    """The shape of every module-level job, for one module or a fused group: train each module
    (its held-out mean of its step_loss selects its best checkpoint), load the best weights back,
    and log the final held-out numbers. `prepare(batch)` (the shared teacher pass) runs once per
    batch before every module's step_loss, in training and in evaluation."""

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



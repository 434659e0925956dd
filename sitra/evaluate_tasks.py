"""Task metrics: accuracy, macro-F1 and inference speed of classifiers; greedy summaries and ROUGE."""
import time

import torch

# The one ROUGE configuration every sitra table uses (written into model cards and logs).
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
ROUGE_STEMMER = True


def accuracy(predictions: list[int], labels: list[int]) -> float:
    return sum(p == y for p, y in zip(predictions, labels)) / max(len(labels), 1)


def macro_f1(predictions: list[int], labels: list[int]) -> float:
    """The unweighted mean of per-class F1 over the classes that occur in labels or predictions."""
    classes = sorted(set(labels) | set(predictions))
    scores = []
    for c in classes:
        tp = sum(p == c and y == c for p, y in zip(predictions, labels))
        predicted, actual = sum(p == c for p in predictions), sum(y == c for y in labels)
        scores.append(2 * tp / (predicted + actual) if predicted + actual else 0.0)
    return sum(scores) / max(len(scores), 1)


def _forward_logits(model, batch, prefix: str = ""):
    return model(input_ids=batch[f"{prefix}input_ids"], attention_mask=batch[f"{prefix}attention_mask"]).logits


@torch.inference_mode()
def classification_metrics(model, batches, device, prefix: str = "") -> dict:
    """Accuracy, macro-F1 and mean cross-entropy of one classifier over fixed batches."""
    predictions, labels, nll = [], [], 0.0
    for batch in batches.epoch(0):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = _forward_logits(model, batch, prefix).float()
        nll += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
        predictions += logits.argmax(-1).tolist()
        labels += batch["labels"].tolist()
    return {"accuracy": accuracy(predictions, labels), "macro_f1": macro_f1(predictions, labels),
            "ce": nll / max(len(labels), 1)}


@torch.inference_mode()
def compare_classifiers(models: dict, batches, device, desc: str = "evaluating") -> dict:
    """{name: accuracy, macro_f1, parameters, examples_per_s} on the same batches.

    models: {name: (model, prefix)} where prefix "" reads input_ids and "teacher_" reads
    teacher_input_ids. The models take turns on every batch, each forward timed on its own, so
    their speeds are measured under the same load; the first batch warms up and is not timed
    (unless it is the only one).
    """
    from sitra.train import progress_bar

    preds = {n: [] for n in models}
    seconds, timed = dict.fromkeys(models, 0.0), 0
    labels = []
    for b, batch in enumerate(progress_bar(iterable=batches.epoch(0), total=len(batches), desc=desc)):
        batch = {k: v.to(device) for k, v in batch.items()}
        labels += batch["labels"].tolist()
        count = b > 0 or len(batches) == 1
        timed += len(batch["labels"]) if count else 0
        for name, (model, prefix) in models.items():
            start = time.perf_counter()
            logits = _forward_logits(model, batch, prefix)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - start if count else 0.0
            preds[name] += logits.argmax(-1).tolist()
    return {n: {"accuracy": accuracy(preds[n], labels), "macro_f1": macro_f1(preds[n], labels),
                "parameters": sum(p.numel() for p in m.parameters()),
                "examples_per_s": timed / max(seconds[n], 1e-9)} for n, (m, _) in models.items()}


@torch.inference_mode()
def generate_summaries(model, prompts: list[list[int]], tokenizer, max_new_tokens: int, batch_size: int, device,
                       desc: str = "generating") -> tuple[list[str], float]:
    """(greedy summaries, examples/s): prompts are left-padded in batches; a summary is the text
    generated after its prompt up to the first EOS, special tokens dropped."""
    from sitra.train import progress_bar

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out, start = [], time.perf_counter()
    model.eval()
    starts = range(0, len(prompts), batch_size)
    for i in progress_bar(iterable=starts, total=len(starts), desc=desc):
        group = prompts[i:i + batch_size]
        T = max(len(p) for p in group)
        ids = torch.full((len(group), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), T), dtype=torch.long)
        for r, p in enumerate(group):
            ids[r, T - len(p):] = torch.tensor(p)
            mask[r, T - len(p):] = 1
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                   max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                   eos_token_id=tokenizer.eos_token_id)[:, T:].tolist()
        for g in generated:
            if tokenizer.eos_token_id in g:
                g = g[: g.index(tokenizer.eos_token_id)]
            out.append(tokenizer.decode(g, skip_special_tokens=True).strip())
    return out, len(prompts) / max(time.perf_counter() - start, 1e-9)


def rouge(predictions: list[str], references: list[str]) -> dict:
    """Mean ROUGE-1/2/L F-measure (rouge-score, Porter stemming on) over the pairs."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(list(ROUGE_TYPES), use_stemmer=ROUGE_STEMMER)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for p, r in zip(predictions, references):
        for k, s in scorer.score(r, p).items():
            totals[k] += s.fmeasure
    return {k: v / max(len(references), 1) for k, v in totals.items()}


def rouge_config() -> str:
    from importlib.metadata import version

    return (f"rouge-score {version('rouge-score')}, {', '.join(ROUGE_TYPES)} F-measure averaged over examples, "
            f"use_stemmer={ROUGE_STEMMER}")

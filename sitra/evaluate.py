"""Metrics (MLM, hidden-state fidelity, LM perplexity, classification, ROUGE) and the tables and plots users read."""
import math
import time

import torch

from sitra import runtime
from sitra.models.capture import last_hidden_state


class MLMMetrics:
    """Accumulates MLM accuracy, top-5 accuracy and perplexity over masked positions."""

    def __init__(self):
        self.nll = self.top1 = self.top5 = 0.0
        self.count = 0

    def update(self, logits, labels):
        chosen = labels != -100
        logits, labels = logits[chosen].float(), labels[chosen]
        self.nll += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        self.top1 += float((top5[:, 0] == labels).sum())
        self.top5 += float((top5 == labels[:, None]).any(-1).sum())
        self.count += int(chosen.sum())

    def result(self) -> dict:
        n = max(self.count, 1)
        return {"mlm_accuracy": self.top1 / n, "mlm_top5_accuracy": self.top5 / n,
                "perplexity": math.exp(self.nll / n), "masked_tokens": self.count}


class HiddenFidelity:
    """Mean cosine similarity and MSE of hidden states to the teacher's, over real tokens."""

    def __init__(self):
        self.cos = self.sq = self.tokens = self.elements = 0.0

    def update(self, hidden, teacher_hidden, token_mask):
        h, t = hidden[token_mask].float(), teacher_hidden[token_mask].float()
        self.cos += float(torch.nn.functional.cosine_similarity(h, t, dim=-1).sum())
        self.sq += float((h - t).square().sum())
        self.tokens += h.shape[0]
        self.elements += h.numel()

    def result(self) -> dict:
        return {"hidden_cosine": self.cos / max(self.tokens, 1), "hidden_mse": self.sq / max(self.elements, 1)}


@torch.inference_mode()
def evaluate_models(models: dict, teacher_name: str, batches, device, desc="evaluating") -> dict:
    """{name: metrics} for every model on the same batches (same masks for all).

    MLM metrics where a model has an MLM head; hidden-state fidelity to `models[teacher_name]`
    where the hidden sizes agree; forward time per real token (first batch untimed: warm-up).
    """

    mlm = {n: MLMMetrics() for n, m in models.items() if hasattr(m, "cls")}
    teacher = models[teacher_name]
    fidelity = {n: HiddenFidelity() for n, m in models.items()
                if m.config.hidden_size == teacher.config.hidden_size}
    seconds = {n: 0.0 for n in models}
    tokens = 0
    for b, batch in enumerate(runtime.progress_bar(iterable=batches.epoch(0), total=len(batches), desc=desc)):
        batch = {k: v.to(device) for k, v in batch.items()}
        token_mask = batch["attention_mask"].bool()
        tokens += int(token_mask.sum()) if b else 0  # the first batch warms up and is not timed
        hidden = {}
        for name, model in models.items():  # each model's forward is timed on its own
            start = time.perf_counter()
            hidden[name] = last_hidden_state(model, batch["input_ids"], batch["attention_mask"])
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name] += (time.perf_counter() - start) if b else 0.0
        for name, model in models.items():
            if name in mlm:
                mlm[name].update(model.cls(hidden[name]), batch["labels"])
            if name in fidelity:
                fidelity[name].update(hidden[name], hidden[teacher_name], token_mask)
    out = {}
    for name, model in models.items():
        out[name] = {"parameters": sum(p.numel() for p in model.parameters())}
        if tokens:
            out[name]["us_per_token"] = 1e6 * seconds[name] / tokens
        out[name].update(mlm[name].result() if name in mlm else {})
        out[name].update(fidelity[name].result() if name in fidelity else {})
    return out


def format_table(results: dict, gap: tuple[str, str] | None = None) -> str:
    """A Markdown table: one row per metric, one column per model, plus with gap=(a, b) a column
    of a's value minus b's, headed `Gap (a - b)` so the table says which difference it shows."""
    names = list(results)
    metrics = [m for m in dict.fromkeys(k for r in results.values() for k in r)]
    header = ["Metric", *names] + ([f"Gap ({gap[0]} - {gap[1]})"] if gap else [])
    rows = [header, ["---"] * len(header)]
    for m in metrics:
        row = [m] + [_fmt(results[n].get(m)) for n in names]
        if gap:
            a, b = results[gap[0]].get(m), results[gap[1]].get(m)
            row.append(_fmt(a - b) if a is not None and b is not None else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows)


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) >= 1000):
        return f"{int(v):,}"
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.1f}"


def heatmap(rows: list[dict], axes: list[str], metric: str, path):
    """PNG of `metric` over the first two sweep axes, one panel per value of the third
    (block x d_k per head count for a block sweep); a bar chart when there is one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    order = sorted(axes, key=lambda a: ["block", "block_d_k", "block_heads"].index(a)
                   if a in ("block", "block_d_k", "block_heads") else 3)
    if len(order) == 1:
        fig, ax = plt.subplots(figsize=(max(4, len(rows) * 0.6), 3))
        ax.bar([str(r[order[0]]) for r in rows], [r.get(metric, np.nan) for r in rows])
        ax.set_xlabel(order[0]), ax.set_ylabel(metric)
        fig.tight_layout(), fig.savefig(path, format="png", dpi=120), plt.close(fig)
        return

    def key(v):
        try:
            return (0, float(v))
        except (TypeError, ValueError):
            return (1, str(v))

    ra, ca, pa = order[0], order[1], order[2] if len(order) > 2 else None
    rv = sorted({str(r[ra]) for r in rows}, key=key)
    cv = sorted({str(r[ca]) for r in rows}, key=key)
    pv = sorted({str(r[pa]) for r in rows}, key=key) if pa else [None]
    fig, axs = plt.subplots(1, len(pv), figsize=(2 + 1.0 * len(cv) * len(pv), 1.5 + 0.45 * len(rv)), squeeze=False)
    for ax, p in zip(axs[0], pv):
        grid = np.full((len(rv), len(cv)), np.nan)
        for r in rows:
            if pa is None or str(r[pa]) == p:
                grid[rv.index(str(r[ra])), cv.index(str(r[ca]))] = r.get(metric, np.nan)
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(cv)), cv), ax.set_yticks(range(len(rv)), rv)
        ax.set_xlabel(ca), ax.set_ylabel(ra)
        ax.set_title(f"{pa} = {p}" if pa else metric)
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7, color="w")
        fig.colorbar(im, ax=ax, label=metric)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def bar_plot(results: dict, path, accuracy: str = "mlm_accuracy"):
    """PNG with one bar per model: its accuracy (or hidden cosine without an MLM head) and size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    metric = accuracy if all(accuracy in r for r in results.values()) else "hidden_cosine"
    fig, (a, b) = plt.subplots(1, 2, figsize=(4 + 1.2 * len(names), 3.6))
    a.bar(names, [results[n].get(metric, float("nan")) for n in names], color="tab:blue")
    a.set_ylabel(metric)
    b.bar(names, [results[n]["parameters"] / 1e6 for n in names], color="tab:gray")
    b.set_ylabel("parameters (millions)")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def sliding_windows(stream: list[int], window: int, stride: int) -> list[tuple[list[int], int]]:
    """(window tokens, number of leading tokens already scored by an earlier window): every
    token but the first is predicted exactly once, each with up to `window - stride` of context."""
    out, scored_until = [], 1
    for begin in range(0, max(len(stream) - 1, 1), stride):
        end = min(begin + window, len(stream))
        out.append((stream[begin:end], scored_until - begin))
        scored_until = end
        if end == len(stream):
            break
    return out


@torch.inference_mode()
def evaluate_lm(model, windows, device, batch_size: int = 8) -> dict:
    """Perplexity and next-token accuracy@1/@5 of a causal LM over sliding windows."""
    nll = top1 = top5 = count = 0
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        T = max(len(w) for w, _ in group)
        ids = torch.zeros((len(group), T), dtype=torch.long)
        scored = torch.zeros((len(group), T), dtype=torch.bool)
        for r, (w, skip) in enumerate(group):
            ids[r, : len(w)] = torch.tensor(w)
            scored[r, max(skip, 1): len(w)] = True
        am = (torch.arange(T)[None, :] < torch.tensor([len(w) for w, _ in group])[:, None]).long()
        logits = model(input_ids=ids.to(device), attention_mask=am.to(device)).logits[:, :-1].float()
        target, keep = ids[:, 1:].to(device), scored[:, 1:].to(device)
        logits, target = logits[keep], target[keep]
        nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        best5 = logits.topk(min(5, logits.shape[-1]), -1).indices
        top1 += int((best5[:, 0] == target).sum())
        top5 += int((best5 == target[:, None]).any(-1).sum())
        count += int(keep.sum())
    n = max(count, 1)
    return {"perplexity": math.exp(nll / n), "accuracy": top1 / n, "top5_accuracy": top5 / n, "tokens": count}


@torch.inference_mode()
def lambada_accuracy(model, tokenizer, passages: list[str], device) -> float:
    """Share of passages whose last word the model predicts exactly, greedily, token by token."""
    correct = 0
    for text in passages:
        context, _, word = text.strip().rpartition(" ")
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        full = tokenizer(context + " " + word, add_special_tokens=False)["input_ids"]
        target = full[len(ctx):]
        if not ctx or not target:
            continue
        logits = model(input_ids=torch.tensor([full], device=device)).logits[0]
        predicted = logits[len(ctx) - 1: len(full) - 1].argmax(-1).tolist()
        correct += predicted == target
    return correct / max(len(passages), 1)


def masked_logits(model, batch, encoder=None):
    """(MLM logits [N, V], labels [N]) at the N masked positions of a batch only: the head never
    runs over the unmasked 85% (at vocabulary 25,426 and 2,048 genes that is most of the memory).
    `encoder` replaces `model.base_model` in the forward (e.g. its torch.compile'd twin)."""
    chosen = batch["labels"] != -100
    hidden = (model.base_model if encoder is None else encoder)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return model.cls(hidden[chosen]), batch["labels"][chosen]


@torch.inference_mode()
def evaluate_mlm(models: dict, batches, device, desc="evaluating") -> dict:
    """{name: MLM accuracy, top-5 accuracy, perplexity, masked tokens, parameters} of every model
    on the same masked batches (the same cells with the same masks for all)."""

    metrics = {name: MLMMetrics() for name in models}
    for batch in runtime.progress_bar(iterable=batches.epoch(0), total=len(batches), desc=desc):
        batch = {k: v.to(device) for k, v in batch.items()}
        for name, model in models.items():
            metrics[name].update(*masked_logits(model, batch))
    return {name: {**metrics[name].result(), "parameters": sum(p.numel() for p in model.parameters())}
            for name, model in models.items()}


# log columns that are the loop's bookkeeping, not curves of the model (--report_to tensorboard draws them too)
NOT_CURVES = ("step", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_total", "selection_error", "distinct_shapes")


def training_curves(log: dict) -> dict:
    """{quantity: {"train": (steps, values), "validation": (steps, values)}} of a run's log
    (`results.read_log`): one entry per quantity, whatever its scale. A held-out column is the
    training column's quantity when its name is that name or `eval_` + it; the training batches'
    perplexity is exp(ce) where the held-out one is logged."""
    import numpy as np

    curves = {}
    for group, key in (("train", "train"), ("eval", "validation")):
        table = log[group]
        for name, values in table.items():
            if name not in NOT_CURVES and "step" in table and np.isfinite(values).any():
                curves.setdefault(name.removeprefix("eval_"), {})[key] = (table["step"], values)
    train = log["train"]
    if "perplexity" in curves and "ce" in train and "step" in train:
        curves["perplexity"]["train"] = (train["step"], np.exp(train["ce"]))
    return curves


def curve_kind(quantity: str) -> str:
    """loss, accuracy or perplexity: the order of the panels, and the job's one-line summary."""
    return ("perplexity" if "perplexity" in quantity else "accuracy" if "accuracy" in quantity or "f1" in quantity
            else "loss")


def training_figure(log: dict):
    """(matplotlib figure, quantities): one panel per quantity (a KL of 0.07 beside a CE of 9 is
    not a flat line), training steps as a line and held-out evaluations as markers, the legend
    above the panel so it covers no curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = training_curves(log)
    if not curves:
        return None, []
    kinds = ("loss", "accuracy", "perplexity")
    order = sorted(curves, key=lambda q: (q != "loss", kinds.index(curve_kind(q))))  # stable: log order within a kind
    cols = min(3, len(order))
    rows = -(-len(order) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax, quantity in zip(axes.flat, order):
        for key, style in (("train", dict(color="C0", linewidth=1, alpha=0.85)),
                           ("validation", dict(color="C1", marker="o", markersize=4, linestyle="--"))):
            if key in curves[quantity]:
                ax.plot(*curves[quantity][key], label=key, **style)
        if quantity == "perplexity":
            ax.set_yscale("log")
        ax.set_title(quantity, loc="left", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, fontsize=7, frameon=False, borderaxespad=0.2)
    for ax in list(axes.flat)[len(order):]:
        ax.remove()
    fig.suptitle(log["attrs"].get("run_name", ""), fontsize=9)
    fig.tight_layout()
    return fig, order


def plot_training(log: dict, path) -> list[str]:
    """PNG of a run's training curves (training_figure); returns the quantities drawn."""
    import matplotlib.pyplot as plt

    fig, quantities = training_figure(log)
    if fig is not None:
        fig.savefig(path, format="png", dpi=120)
        plt.close(fig)
    return quantities


# ---------------------------------------------------------------------------------------------
# Task metrics: accuracy, macro-F1 and inference speed of classifiers; greedy summaries and ROUGE.

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

    preds = {n: [] for n in models}
    seconds, timed = dict.fromkeys(models, 0.0), 0
    labels = []
    for b, batch in enumerate(runtime.progress_bar(iterable=batches.epoch(0), total=len(batches), desc=desc)):
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

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out, start = [], time.perf_counter()
    model.eval()
    starts = range(0, len(prompts), batch_size)
    for i in runtime.progress_bar(iterable=starts, total=len(starts), desc=desc):
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


def validation_scores(model, batches, device, select_on: str) -> dict:
    """The held-out numbers the training loop logs; `selection_error` (1 - the --select_on
    metric, lower is better) chooses the checkpoint."""
    m = classification_metrics(model, batches, device)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "ce": m["ce"], "selection_error": 1 - m[select_on]}


def classifier_table(models: dict, batches: dict, device) -> dict:
    """{model: {validation_accuracy, validation_macro_f1, [test_...], parameters, examples_per_s}};
    examples/s is timed on the validation split, every model on the same batches in turn."""
    table, speed = {n: {} for n in models}, {}
    for split in ("validation", "test"):
        if split in batches:
            for n, m in compare_classifiers(models, batches[split], device, desc=f"evaluating on {split}").items():
                table[n].update({f"{split}_accuracy": m["accuracy"], f"{split}_macro_f1": m["macro_f1"]})
                speed.setdefault(n, {"parameters": m["parameters"], "examples_per_s": m["examples_per_s"]})
    return {n: table[n] | speed[n] for n in models}


def flat(table: dict) -> dict:
    """{model/metric: value} for the HDF5 log's final numbers."""
    return {f"{n}/{k}": v for n, m in table.items() for k, v in m.items()}

"""Causal-LM students: cut from a teacher's layers, built from a config, or pretrained."""
import copy
import inspect
import re

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from sitra.errors import UsageError

LAYER_KEY = re.compile(r"\.(layers|layer|h|blocks)\.(\d+)\.")


def teacher_layer_indices(teacher_layers: int, student_layers: int) -> list[int]:
    """Every k-th teacher layer, first layer included: 12 -> 6 gives 0, 2, 4, 6, 8, 10."""
    return [i * teacher_layers // student_layers for i in range(student_layers)]


def student_from_teacher_layers(teacher, student_layers: int):
    """A model of the teacher's class with `student_layers` of its layers (every k-th, first
    included, as DistilBERT did), its embeddings, final norm or pooler and head: the copied
    tensors are exactly the teacher's. Works for causal LMs and encoders alike."""
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = student_layers
    student = type(teacher)(config)
    keep = teacher_layer_indices(teacher.config.num_hidden_layers, student_layers)
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in teacher.state_dict().items():
        m = LAYER_KEY.search(key)
        if m is None:
            state[key] = value
        elif int(m[2]) in new_index:
            state[key[: m.start()] + f".{m[1]}.{new_index[int(m[2])]}." + key[m.end():]] = value
    student.load_state_dict(state, strict=True)
    return student


def lm_head(model):
    return model.get_output_embeddings()


def final_hidden(model, batch, output_hidden_states=False):
    """The base model's output (last hidden state after the final norm, optionally all layers)."""
    return model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            output_hidden_states=output_hidden_states)


def shared_vocab(teacher_vocab: dict, student_vocab: dict, teacher_rows: int, student_rows: int,
                 student: str = "--student", teacher: str = "the teacher") -> tuple[int, str | None]:
    """(n, notice): the logit losses compare the first n logits of both models.

    Models that share a tokenizer may still differ in output rows: embedding matrices are padded
    to a round size (Pythia's 50,304 rows for 50,277 ids) and differently by different people.
    The ids the tokenizer can produce are the shared ones; rows past them are padding. n is the
    smaller of the tokenizer's id count and either model's rows; `notice` is one line saying so
    where any model has rows beyond n (None otherwise). Tokenizers that really differ (a token
    with another id, or missing) are a one-line UsageError naming `student`.
    """

    if teacher_vocab != student_vocab:
        differ = sorted(t for t in teacher_vocab.keys() | student_vocab.keys() if teacher_vocab.get(t) != student_vocab.get(t))
        token = min(differ, key=lambda t: (min(teacher_vocab.get(t, 2**62), student_vocab.get(t, 2**62)), t))
        raise UsageError(
            f"{student}: its tokenizer differs from {teacher}'s ({len(differ):,} tokens differ, e.g. {token!r} is "
            f"{student_vocab.get(token, 'absent')} there and {teacher_vocab.get(token, 'absent')} in {teacher}'s); "
            "logit distillation needs one tokenizer")
    ids = max(teacher_vocab.values()) + 1 if teacher_vocab else min(teacher_rows, student_rows)
    n = min(ids, teacher_rows, student_rows)
    notice = None
    if n < max(teacher_rows, student_rows):
        notice = (f"vocabulary: teacher {teacher_rows:,} and student {student_rows:,} output rows share the tokenizer's "
                  f"{ids:,} ids; the logit losses compare the first {n:,} (padding rows left out)")
    return n, notice


def on_policy_prompts(batch: dict, max_new_tokens: int) -> torch.Tensor:
    """The batch's prompts for on-policy sampling: the first P tokens of every example, with
    P = the shortest example's length minus `max_new_tokens` (at least 1): no prompt holds
    padding, and prompt plus continuation are no longer than the examples were."""
    shortest = int(batch["attention_mask"].sum(1).min())
    return batch["input_ids"][:, : max(1, shortest - max_new_tokens)]


@torch.no_grad()
def sample_continuations(model, prompts: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                         eos_id: int | None = None, vocab: int | None = None):
    """(ids [B, P + N], scored [B, P + N - 1]): each prompt followed by N tokens the model samples
    from softmax(logits[:vocab] / temperature) (the global torch RNG: a training step's own random
    stream), and which positions predict a sampled token (not the prompt, nothing after a row's
    first EOS). Runs in eval mode (no dropout) with the key-value cache; modes are restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    cache = DynamicCache(config=model.config)  # filled in place by every forward
    # transformers 5.24 renamed the forward's `past_key_values` to `cache`
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    try:
        logits = model(input_ids=prompts, use_cache=True, **{cache_kw: cache}).logits[:, -1]
        tokens, alive = [], torch.ones(len(prompts), dtype=torch.bool, device=prompts.device)
        real = []
        for i in range(max_new_tokens):
            probs = torch.softmax(logits[:, :vocab].float() / temperature, dim=-1)
            token = torch.multinomial(probs, 1)[:, 0]
            tokens.append(token)
            real.append(alive.clone())
            if eos_id is not None:
                alive &= token != eos_id
            if i + 1 < max_new_tokens:
                logits = model(input_ids=token[:, None], use_cache=True, **{cache_kw: cache}).logits[:, -1]
    finally:
        for m, mode in modes:
            m.train(mode)
    ids = torch.cat([prompts, torch.stack(tokens, 1)], 1)
    P = prompts.shape[1]
    scored = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool, device=ids.device)
    scored[:, P - 1:] = torch.stack(real, 1)
    return ids, scored


def student_config(config, student_layers: int, heads: int | None = None, intermediate_size: int | None = None):
    """A teacher's config with `student_layers` layers and, where given, `heads` attention heads
    of the teacher's head size (so a narrower hidden size; key-value heads keep the teacher's
    query heads per key-value head) and a feed-forward width of `intermediate_size`."""
    config = copy.deepcopy(config)
    for key in ("quantization_config", "_name_or_path"):  # a GGUF teacher's config names its file
        if hasattr(config, key):
            delattr(config, key)
    config.num_hidden_layers = student_layers
    if heads:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None)
        if kv:
            config.num_key_value_heads = heads // (config.num_attention_heads // kv)
        config.num_attention_heads = heads
        config.hidden_size = heads * head_dim
        if hasattr(config, "head_dim"):
            config.head_dim = head_dim
    if intermediate_size:
        config.intermediate_size = intermediate_size
    return config


def check_student_shape(config, heads: int | None, intermediate_size: int | None):
    """One-line errors for --student_heads / --student_intermediate_size against the teacher's config."""
    if heads:
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        group = config.num_attention_heads // kv
        if heads % group:
            raise UsageError(f"--student_heads {heads}: must be a multiple of {group} (the teacher's query heads "
                             "per key-value head)")
    if intermediate_size and not isinstance(getattr(config, "intermediate_size", None), int):
        raise UsageError(f"--student_intermediate_size {intermediate_size}: the teacher's config "
                         f"({config.model_type}) has no intermediate_size to change")


def random_student(config, seed: int):
    """A randomly initialised causal LM of `config` (student_config of a teacher's): no teacher
    weights needed, so it also serves students of recorded teachers."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)

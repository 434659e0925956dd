"""Causal-LM text: packing into constant-length blocks, and padding with labels."""
from sitra.data.mlm import pad
from sitra.data.text import load_texts, take_fraction


def pack(token_lists: list[list[int]], block_size: int, eos_id: int | None) -> list[list[int]]:
    """Documents joined into one stream (an EOS after each, where the tokenizer has one) and cut
    into blocks of `block_size`; the last block keeps the remainder, so no token is lost or repeated."""
    stream = []
    for ids in token_lists:
        stream.extend(ids)
        if eos_id is not None:
            stream.append(eos_id)
    return [stream[i:i + block_size] for i in range(0, len(stream), block_size)]


class CausalCollator:
    """Pads on the right; `labels` are the input ids with -100 at padding (the loss shifts them)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[list[int]], generators=None) -> dict:
        input_ids, attention_mask = pad(examples, self.pad_id)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def causal_texts(lines: list[str], tokenizer, max_seq_length: int, packing: bool) -> list[list[int]]:
    """Token ids of the examples: packed blocks, or each line cut to `max_seq_length`."""
    if packing:
        return pack(tokenizer(lines, add_special_tokens=False)["input_ids"], max_seq_length, tokenizer.eos_token_id)
    ids = tokenizer(lines, truncation=True, max_length=max_seq_length)["input_ids"]
    return [x for x in ids if len(x) >= 2]


def shifted(batch: dict):
    """(positions whose next token is scored [B, T-1] bool, next tokens [B, T-1])."""
    am = batch["attention_mask"].bool()
    return am[:, :-1] & am[:, 1:], batch["input_ids"][:, 1:]


def lm_corpus(tokenizer, dataset_name: str, dataset_config: str | None, train_file: str | None, eval_file: str | None,
              max_seq_length: int, packing: bool, percentage_data: float) -> tuple[list, list]:
    """(training examples, held-out examples) of causal-LM distillation, as distill_pythia cuts them
    (held-out text always packed): the recording and every student must see the same ids."""
    train_lines, eval_lines = load_texts(dataset_name, dataset_config, train_file, eval_file)
    train = causal_texts(take_fraction(train_lines, percentage_data), tokenizer, max_seq_length, packing)
    held_out = causal_texts(take_fraction(eval_lines, percentage_data), tokenizer, max_seq_length, True)
    return train, held_out

"""sitra.data: BERT masking statistics, reproducible masks and batches, corpora, fractions.

Masking is checked by counting over ~170k tokens with tolerances of a few binomial standard
deviations; what a batch held before masking is recovered from (input_ids, labels), which the
collator's contract makes exact: labels give the original id where chosen, and nothing else moves.
"""
import math
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from sitra.errors import UsageError
from sitra.data import (
    BUILTIN, Batches, MLMCollator, example_generator, load_texts, python_docs_paragraphs, take_fraction, tokenize_lines,
)
from sitra.data.text import TextDataArgs, check_data_args


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher):
    return AutoTokenizer.from_pretrained(tiny_teacher)


@pytest.fixture(scope="module")
def docs_examples(tokenizer):
    """The built-in corpus tokenised to at most 64 tokens (~1,100 examples and ~58k tokens on Python 3.11)."""
    return tokenize_lines(python_docs_paragraphs(), tokenizer, 64)


def originals(batch):
    """The padded token ids before masking: labels where chosen, input_ids elsewhere."""
    return torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])


def rows(batch):
    """The unmasked, unpadded examples of a batch, as tuples."""
    ids, lengths = originals(batch), batch["attention_mask"].sum(1)
    return [tuple(ids[i, :n].tolist()) for i, n in enumerate(lengths.tolist())]


def assert_same_batch(a, b):
    assert a.keys() == b.keys() == {"input_ids", "attention_mask", "labels"}
    for k in a:
        assert torch.equal(a[k], b[k]), k


def within(observed, n, p, sigmas=4.5):
    """|observed/n - p| within `sigmas` binomial standard deviations."""
    sd = math.sqrt(p * (1 - p) / n)
    return abs(observed / n - p) <= sigmas * sd


# ---------------------------------------------------------------------------------------------
# MLMCollator


def with_specials_inside(examples, tokenizer):
    """Every third example gets every special id (pad included) spliced into its middle:
    a collator that only skipped the first and last position would choose them."""
    specials = sorted(set(tokenizer.all_special_ids))
    out = []
    for i, x in enumerate(examples):
        if i % 3 == 0 and len(x) > 4:
            mid = len(x) // 2
            x = x[:mid] + specials + x[mid:]
        out.append(list(x))
    return out


@pytest.mark.parametrize("mlm_probability", [0.15, 0.4])
def test_masking_statistics(tokenizer, docs_examples, mlm_probability):
    examples = with_specials_inside(docs_examples, tokenizer)
    collate = MLMCollator.for_tokenizer(tokenizer, mlm_probability)
    batches = [collate(examples, gens(0, i, len(examples))) for i in range(3)]  # the corpus three times over
    for batch in batches:  # the recovered originals are the examples: nothing unchosen moved
        before = originals(batch).tolist()
        assert all(before[i][: len(x)] == x for i, x in enumerate(examples))
    ids, labels, attn = (torch.cat([b[k] for b in batches]) for k in ("input_ids", "labels", "attention_mask"))
    attn, original = attn.bool(), torch.cat([originals(b) for b in batches])
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    is_special = torch.isin(original, special)
    maskable = attn & ~is_special
    chosen = labels != -100
    n_maskable = int(maskable.sum())
    assert n_maskable > 100_000

    # labels: -100 exactly where not chosen, the original id where chosen
    assert torch.equal(labels[chosen], original[chosen])
    assert torch.equal(ids[~chosen], original[~chosen])
    # never chosen: [CLS], [SEP], [PAD], [UNK], [MASK] anywhere, and padding
    assert not (chosen & is_special).any()
    assert not (chosen & ~attn).any()
    for sid in (tokenizer.pad_token_id, tokenizer.mask_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id):
        assert ((original == sid) & attn & (torch.arange(original.shape[1]) > 0)).sum() >= len(examples) // 3  # spliced in

    n_chosen = int(chosen.sum())
    assert within(n_chosen, n_maskable, mlm_probability), n_chosen / n_maskable

    out = ids[chosen]
    orig = original[chosen]
    to_mask = int((out == tokenizer.mask_token_id).sum())
    unchanged = int((out == orig).sum())
    random = (out != tokenizer.mask_token_id) & (out != orig)
    n_random = int(random.sum())
    assert to_mask + unchanged + n_random == n_chosen
    V = len(tokenizer) - len(special)  # non-special ids a random token is drawn from
    assert within(to_mask, n_chosen, 0.8), to_mask / n_chosen
    assert within(n_random, n_chosen, 0.1 * (1 - 1 / V)), n_random / n_chosen  # a draw may hit the original
    assert within(unchanged, n_chosen, 0.1 * (1 + 1 / V)), unchanged / n_chosen

    # random replacements: never a special id, spread over the whole non-special vocabulary
    replaced = out[random]
    assert not torch.isin(replaced, special).any()
    assert ((replaced >= 0) & (replaced < len(tokenizer))).all()
    counts = torch.bincount(replaced, minlength=len(tokenizer))
    assert (counts > 0).sum() > 0.9 * V
    assert counts.max() < 5 * n_random / V


@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
def test_padding(tokenizer, pad_to_multiple_of):
    rng = torch.Generator().manual_seed(1)
    examples = []
    for n in [5, 12, 3, 9, 12, 4]:
        body = torch.randint(5, len(tokenizer), (n - 2,), generator=rng).tolist()
        examples.append([tokenizer.cls_token_id, *body, tokenizer.sep_token_id])
    batch = MLMCollator.for_tokenizer(tokenizer, 0.5, pad_to_multiple_of=pad_to_multiple_of)(examples, gens(3, 0, len(examples)))
    T = 12 if pad_to_multiple_of is None else 16
    for k in ("input_ids", "attention_mask", "labels"):
        assert batch[k].shape == (len(examples), T) and batch[k].dtype == torch.long
    for i, x in enumerate(examples):
        n = len(x)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
        assert batch["input_ids"][i, n:].tolist() == [tokenizer.pad_token_id] * (T - n)
        assert batch["labels"][i, n:].tolist() == [-100] * (T - n)
        assert originals(batch)[i, :n].tolist() == x
        assert batch["labels"][i, [0, n - 1]].tolist() == [-100, -100]  # [CLS] and [SEP]
    assert (batch["labels"] != -100).any()  # something was masked


def gens(seed, epoch, n, first=0):
    return [example_generator(seed, epoch, i) for i in range(first, first + n)]


def test_same_generator_same_masks_different_index_different_masks(tokenizer, docs_examples):
    collate = MLMCollator.for_tokenizer(tokenizer)
    examples = docs_examples[:32]
    torch.manual_seed(0)
    a = collate(examples, gens(5, 2, 32, 7))
    torch.manual_seed(1)  # the global RNG plays no part
    torch.rand(100)
    b = collate(examples, gens(5, 2, 32, 7))
    assert_same_batch(a, b)
    for seed, epoch, first in [(5, 2, 8), (5, 3, 7), (6, 2, 7), (7, 2, 5)]:
        c = collate(examples, gens(seed, epoch, 32, first))
        assert torch.equal(c["attention_mask"], a["attention_mask"])
        assert not torch.equal(c["labels"], a["labels"]), (seed, epoch, first)
        assert not torch.equal(c["input_ids"], a["input_ids"]), (seed, epoch, first)


def test_an_examples_masks_do_not_depend_on_its_batch(tokenizer, docs_examples):
    """The same example with the same generator seed gets the same masks alone, in a batch of 32
    padded to its longest member, or padded to a multiple of 64: batch size, padding and data
    sharding across processes leave masking unchanged."""
    collate = MLMCollator.for_tokenizer(tokenizer, 0.3)
    wide = MLMCollator.for_tokenizer(tokenizer, 0.3, pad_to_multiple_of=64)
    examples = docs_examples[:32]
    together = collate(examples, gens(1, 0, 32))
    padded = wide(examples, gens(1, 0, 32))
    for i, x in enumerate(examples):
        alone = collate([x], [example_generator(1, 0, i)])
        n = len(x)
        for k in ("input_ids", "labels"):
            assert torch.equal(alone[k][0, :n], together[k][i, :n])
            assert torch.equal(alone[k][0, :n], padded[k][i, :n])


def test_example_generator_streams():
    first = [example_generator(0, 0, i).initial_seed() for i in range(200)]
    assert len(set(first)) == 200
    assert torch.equal(torch.rand(5, generator=example_generator(1, 2, 3)), torch.rand(5, generator=example_generator(1, 2, 3)))
    assert not torch.equal(torch.rand(5, generator=example_generator(1, 2, 3)), torch.rand(5, generator=example_generator(1, 3, 2)))


# ---------------------------------------------------------------------------------------------
# Batches


N_EXAMPLES, BATCH = 53, 8  # 7 batches, the last one of 5


@pytest.fixture(scope="module")
def distinct_examples(tokenizer):
    """53 distinct examples of lengths 4-10, each [CLS] ... [SEP]."""
    out = []
    for i in range(N_EXAMPLES):
        body = [5 + i] + [5 + (i * 7 + j * 13) % (len(tokenizer) - 5) for j in range(1 + i % 7)]
        out.append([tokenizer.cls_token_id, *body, tokenizer.sep_token_id])
    assert len({tuple(x) for x in out}) == N_EXAMPLES
    return out


def make_batches(tokenizer, examples, **kw):
    return Batches(examples, BATCH, MLMCollator.for_tokenizer(tokenizer, 0.3), **kw)


def test_every_example_once_per_epoch(tokenizer, distinct_examples):
    batches = make_batches(tokenizer, distinct_examples, seed=3)
    assert len(batches) == 7
    for e in range(3):
        seen = [row for batch in batches.epoch(e) for row in rows(batch)]
        sizes = [len(batch["input_ids"]) for batch in batches.epoch(e)]
        assert sizes == [8] * 6 + [5]
        assert len(seen) == N_EXAMPLES
        assert sorted(seen) == sorted(tuple(x) for x in distinct_examples)


def test_epochs_are_reshuffled_and_reproducible(tokenizer, distinct_examples):
    batches = make_batches(tokenizer, distinct_examples, seed=3)
    orders = [[row for batch in batches.epoch(e) for row in rows(batch)] for e in range(3)]
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    assert orders[0] != [tuple(x) for x in distinct_examples]  # shuffled at all
    again = make_batches(tokenizer, distinct_examples, seed=3)
    for a, b in zip(batches.epoch(1), again.epoch(1)):
        assert_same_batch(a, b)
    other_seed = make_batches(tokenizer, distinct_examples, seed=4)
    assert [row for batch in other_seed.epoch(1) for row in rows(batch)] != orders[1]


@pytest.mark.parametrize("epoch", [0, 2])
def test_resume_at_a_batch_sees_the_rest_of_the_epoch(tokenizer, distinct_examples, epoch):
    full = list(make_batches(tokenizer, distinct_examples, seed=11).epoch(epoch))
    assert len(full) == 7
    for start in [0, 1, 4, 6, 7]:
        resumed = list(make_batches(tokenizer, distinct_examples, seed=11).epoch(epoch, start=start))  # a new process
        assert len(resumed) == len(full) - start
        for a, b in zip(resumed, full[start:]):
            assert_same_batch(a, b)


def test_unshuffled_batches_have_fixed_masks(tokenizer, distinct_examples):
    """Evaluation: every call, and every model's own Batches, sees the same batches and masks."""
    a = make_batches(tokenizer, distinct_examples, seed=2, shuffle=False)
    b = make_batches(tokenizer, distinct_examples, seed=2, shuffle=False)
    first = list(a.epoch(0))
    assert [row for batch in first for row in rows(batch)] == [tuple(x) for x in distinct_examples]
    assert all((batch["labels"] != -100).any() for batch in first)
    for again in (list(a.epoch(0)), list(b.epoch(0))):
        assert len(again) == len(first)
        for x, y in zip(again, first):
            assert_same_batch(x, y)
    # the masks differ from batch to batch (they are not one mask repeated)
    assert not torch.equal(first[0]["labels"] != -100, first[1]["labels"] != -100)


# ---------------------------------------------------------------------------------------------
# take_fraction


@pytest.mark.parametrize("n,fraction,size", [
    (100, 0.5, 50), (100, 0.1, 10), (100, 0.25, 25), (100, 0.333, 33), (100, 0.9, 90), (100, 0.01, 1),
    (100, 0.001, 1), (1000, 0.3, 300), (37, 0.2, 7), (3, 0.5, 2), (1, 0.01, 1),
])
def test_take_fraction_size_and_spread(n, fraction, size):
    items = [f"item {i}" for i in range(n)]
    taken = take_fraction(items, fraction)
    assert len(taken) == size
    assert taken == take_fraction(list(items), fraction)  # the same on every call
    idx = [items.index(t) for t in taken]
    assert idx[0] == 0 and idx == sorted(set(idx))  # in order, no repeats
    gaps = [b - a for a, b in zip(idx, idx[1:])] + [n - idx[-1]]  # including the wrap to the end
    assert max(gaps) - min(gaps) <= 1  # evenly spread over the whole list
    assert items == [f"item {i}" for i in range(n)]  # input untouched


@pytest.mark.parametrize("n", [1, 7, 100, 2501])
def test_take_fraction_one_is_everything(n):
    items = list(range(n))[::-1]
    assert take_fraction(items, 1.0) == items


def test_take_fraction_of_nothing():
    assert take_fraction([], 0.5) == []


# ---------------------------------------------------------------------------------------------
# load_texts


def write(path: Path, text: str, **kw) -> str:
    path.write_text(text, **kw)
    return str(path)


def test_local_train_file_holds_out_every_tenth_line(tmp_path):
    train_file = write(tmp_path / "train.txt", "\n".join(f"line {i}" for i in range(25)) + "\n")
    # a local file wins over --dataset_name, which offline could not load
    train, held_out = load_texts("wikitext", "wikitext-2-raw-v1", train_file, None)
    assert held_out == ["line 9", "line 19"]
    assert train == [f"line {i}" for i in range(25) if i not in (9, 19)]


def test_local_lines_are_stripped_and_blank_lines_dropped(tmp_path):
    text = "\n".join(["  alpha beta  ", "", "   ", "gamma\t", *[f"w{i}" for i in range(10)]]) + "\n\n"
    train, held_out = load_texts(BUILTIN, None, write(tmp_path / "t.txt", text), None)
    lines = ["alpha beta", "gamma", *[f"w{i}" for i in range(10)]]
    assert held_out == [lines[9]]
    assert train == lines[:9] + lines[10:]


def test_local_train_and_eval_files(tmp_path):
    train_file = write(tmp_path / "a.txt", "one\ntwo\nthree\n")
    eval_file = write(tmp_path / "b.txt", "four\n\nfive\n")
    assert load_texts(BUILTIN, None, train_file, eval_file) == (["one", "two", "three"], ["four", "five"])
    assert load_texts(BUILTIN, None, None, eval_file) == ([], ["four", "five"])


def bad_files(tmp_path):
    return {
        "missing": str(tmp_path / "no_such_file.txt"),
        "directory": str(tmp_path),
        "not utf-8": write(tmp_path / "latin1.txt", "caf\xe9 au lait\n", encoding="latin-1"),
        "empty": write(tmp_path / "empty.txt", ""),
        "only blank lines": write(tmp_path / "blank.txt", "\n   \n\t\n"),
    }


@pytest.mark.parametrize("case", ["missing", "directory", "not utf-8", "empty", "only blank lines"])
def test_bad_train_file_is_a_usage_error_naming_the_flag(tmp_path, case):
    path = bad_files(tmp_path)[case]
    with pytest.raises(UsageError) as info:
        load_texts(BUILTIN, None, path, None)
    message = str(info.value)
    assert message.startswith("--train_file ") and path in message
    assert "\n" not in message


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_bad_eval_file_is_a_usage_error_naming_the_flag(tmp_path, case):
    good = write(tmp_path / "good.txt", "some text\n")
    path = bad_files(tmp_path)[case]
    with pytest.raises(UsageError, match=r"^--eval_file "):
        load_texts(BUILTIN, None, good, path)


def test_builtin_corpus_is_english_text_for_both_splits():
    train, held_out = load_texts(BUILTIN, None, None, None)
    paragraphs = python_docs_paragraphs()
    assert len(train) > 500 and len(held_out) > 50  # ~1,100 paragraphs on Python 3.11
    assert len(train) + len(held_out) == len(paragraphs)
    assert held_out == paragraphs[9::10]
    for lines in (train, held_out):
        assert all(isinstance(t, str) and t == t.strip() and len(t.split()) >= 8 for t in lines)
        assert sum(" the " in f" {t.lower()} " for t in lines) > 0.6 * len(lines)
        letters = "".join(lines)
        assert sum(c.isascii() and (c.isalpha() or c == " ") for c in letters) > 0.85 * len(letters)


def test_hub_dataset_offline_is_a_usage_error_naming_the_flag(monkeypatch):
    if os.environ.get("HF_DATASETS_OFFLINE") != "1":
        pytest.skip("needs HF_DATASETS_OFFLINE=1 (conftest sets it unless the environment overrides it)")
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("offline, yet a connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)  # offline means no network attempt at all
    monkeypatch.setattr(socket, "create_connection", no_network)
    try:
        result = load_texts("wikitext", "wikitext-2-raw-v1", None, None)
    except UsageError as e:
        message = str(e)
    else:
        pytest.skip(f"wikitext loaded from a local datasets cache ({len(result[0])} lines): cannot test the failure")
    assert message.startswith("--dataset_name wikitext")
    assert BUILTIN in message and "--train_file" in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------
# tokenize_lines


def test_tokenize_lines_truncates_and_keeps_special_tokens(tokenizer):
    long_line = " ".join(["the object is printed in the list of all modules"] * 20)
    medium = "the value of x"
    lines = [long_line, "a", medium, long_line[:60]]
    out = tokenize_lines(lines, tokenizer, 16)
    own = tokenizer(medium)["input_ids"]
    assert 4 <= len(own) <= 16
    assert len(out) == 3  # "a" is [CLS] a [SEP]: shorter than 4 tokens, dropped
    assert out[0][0] == tokenizer.cls_token_id and out[0][-1] == tokenizer.sep_token_id
    assert len(out[0]) == 16
    assert out[0][1:15] == tokenizer(long_line, add_special_tokens=False)["input_ids"][:14]
    assert out[1] == own  # short lines unchanged
    assert len(out[2]) == 16 and out[2][-1] == tokenizer.sep_token_id
    for max_len in (8, 32):
        for x in tokenize_lines([long_line], tokenizer, max_len):
            assert len(x) == max_len and x[0] == tokenizer.cls_token_id and x[-1] == tokenizer.sep_token_id
    assert tokenize_lines(["a"], tokenizer, 16, min_tokens=3) == [[tokenizer.cls_token_id, *tokenizer("a", add_special_tokens=False)["input_ids"], tokenizer.sep_token_id]]


def test_wikitext_files_load_and_tokenize(wikitext, tokenizer):
    valid, test = wikitext / "valid.txt", wikitext / "test.txt"
    train, held_out = load_texts("wikitext", "wikitext-2-raw-v1", str(valid), str(test))
    expected_train = [t.strip() for t in valid.read_text(encoding="utf-8").splitlines() if t.strip()]
    assert train == expected_train and len(train) > 1000
    assert len(held_out) > 1000
    assert "lobster" in train[0]
    examples = tokenize_lines(train, tokenizer, 128)
    assert len(examples) > 0.9 * len(train)
    assert all(len(x) <= 128 and x[0] == tokenizer.cls_token_id and x[-1] == tokenizer.sep_token_id for x in examples)
    assert max(len(x) for x in examples) == 128  # some WikiText lines are longer and were cut
    batch = MLMCollator.for_tokenizer(tokenizer)(examples[:16], gens(0, 0, 16))
    assert batch["input_ids"].shape[0] == 16 and (batch["labels"] != -100).any()


# ---------------------------------------------------------------------------------------------
# check_data_args


@pytest.mark.parametrize("value", [0, 0.0, 1.5, -0.1, float("nan")])
def test_percentage_data_out_of_range(value):
    with pytest.raises(UsageError) as info:
        check_data_args(TextDataArgs(percentage_data=value))
    assert str(info.value).startswith("--percentage_data ")
    assert "(0, 1]" in str(info.value)


@pytest.mark.parametrize("value", [1.0, 0.5, 1e-3])
def test_percentage_data_in_range(value):
    check_data_args(TextDataArgs(percentage_data=value))

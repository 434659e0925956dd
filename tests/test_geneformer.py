"""Geneformer distillation: rank-value encoding of .h5ad files, the cell corpus, masking, length
grouping, buckets, the masked KD loss, the distillation job, eval_quick and plot_training.

Expected values come from plain Python written here (sorting per cell, loops over positions), never
from the code under test. The .h5ad files are written by anndata (tests/test_h5ad.py has scanpy-style
files in anndata's current and old layouts).
"""
import math
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from transformers import BertConfig, BertForMaskedLM

from sitra import losses
from sitra.cli import main
from sitra.errors import UsageError
from sitra.data.cells import (
    BucketedMLMCollator, CellExamples, bucket_sizes, load_corpus, split_cells,
)
from sitra.data.mlm import Batches, LengthGroupedBatches, MLMCollator, example_generator, padding_fraction
from sitra.recipes import distill_geneformer, eval_quick, plot_training, tokenize_cells
from sitra.results import read_log

ROOT = Path(__file__).resolve().parents[1]
GENEFORMER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "geneformer"
N_GENES = 200  # genes of the small test dictionaries: token ids 2..201, vocabulary 202


# ---------------------------------------------------------------------------------------------
# helpers: .h5ad files, dictionaries, a Geneformer-shaped teacher


def write_h5ad(path, X, gene_ids, layout="csr", index_name="_index", extra_var=None, categorical=False):
    """An .h5ad written by anndata: X dense or CSR or CSC, var indexed by the gene ids (index named
    `index_name`), or with categorical=True the ids as a categorical var column `index_name`."""
    import anndata
    import pandas as pd

    X = np.asarray(X, dtype=np.float32)
    matrix = {"dense": X, "csr": sp.csr_matrix(X), "csc": sp.csc_matrix(X)}[layout]
    if categorical:
        var = pd.DataFrame({index_name: pd.Categorical(gene_ids)}, index=[f"gene{k}" for k in range(len(gene_ids))])
    else:
        var = pd.DataFrame(index=pd.Index(gene_ids, name=None if index_name == "_index" else index_name))
    for name, values in dict(extra_var or {}).items():
        var[name] = values
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(X.shape[0])])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate gene ids are written on purpose
        anndata.AnnData(X=matrix, obs=obs, var=var).write_h5ad(path)
    return str(path)


def assert_one_line_error(out, message):
    """Exit code 2 and one error line (other stderr lines are import warnings of this machine's packages)."""
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if ": error:" in line or "Traceback" in line]
    assert len(errors) == 1 and message in errors[0] and out.stderr.strip().splitlines()[-1] == errors[0], out.stderr


def gene_id(k):
    return f"ENSG{k:011d}"


@pytest.fixture(scope="module")
def dictionaries(tmp_path_factory):
    """Small Geneformer-style dictionaries: <pad> 0, <mask> 1, genes 2..201 with medians 0.5-3."""
    d = tmp_path_factory.mktemp("dicts")
    rng = np.random.default_rng(0)
    tokens = {"<pad>": 0, "<mask>": 1} | {gene_id(k): k + 2 for k in range(N_GENES)}
    medians = {gene_id(k): float(rng.uniform(0.5, 3.0)) for k in range(N_GENES)}
    (d / "tokens.pkl").write_bytes(pickle.dumps(tokens))
    (d / "medians.pkl").write_bytes(pickle.dumps(medians))
    return {"tokens": str(d / "tokens.pkl"), "medians": str(d / "medians.pkl"), "token_dict": tokens, "median_dict": medians}


def plain_rank_value(X, gene_ids, token_dict, median_dict, max_length, target_sum=10_000):
    """Geneformer's encoding in plain Python: per cell, value = count / total * target_sum / median
    for each known expressed gene; tokens sorted by value, highest first, ties in file order."""
    cells = []
    for row in np.asarray(X, dtype=np.float64).tolist():
        total = sum(row)
        scored = [(-(c / total * target_sum / median_dict[g]), j, token_dict[g])
                  for j, (c, g) in enumerate(zip(row, gene_ids)) if c > 0 and g in median_dict and g in token_dict]
        cells.append([tok for _, _, tok in sorted(scored)][:max_length])
    return cells


def programme_counts(n_cells, n_genes, seed, zero_cells=0):
    """Counts from three expression programmes (cell types), so cells have structure to learn."""
    rng = np.random.default_rng(seed)
    programmes = rng.gamma(0.3, 4.0, size=(3, n_genes))
    kind = rng.integers(0, 3, n_cells)
    X = rng.poisson(programmes[kind] * rng.uniform(0.5, 2.0, (n_cells, 1))).astype(np.float32)
    X[:zero_cells] = 0
    return X


def tokenize(h5ad, out, dictionaries, **kw):
    values = dict(h5ad=h5ad, output=str(out), token_dictionary=dictionaries["tokens"],
                  gene_median_dictionary=dictionaries["medians"])
    values.update(kw)
    return tokenize_cells.run(tokenize_cells.TokenizeCellsArgs(**values))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, dictionaries):
    """A corpus of 240 cells (up to 64 genes each) tokenized from a synthetic .h5ad."""
    d = tmp_path_factory.mktemp("corpus")
    X = programme_counts(240, N_GENES, seed=1)
    h5ad = write_h5ad(d / "cells.h5ad", X, [gene_id(k) for k in range(N_GENES)])
    tokenize(h5ad, d / "corpus", dictionaries, max_length=64)
    return str(d / "corpus")


def save_teacher(folder, hidden=32, layers=2, heads=4, seed=0, max_length=64):
    """A random Geneformer-shaped BertForMaskedLM folder (config.json + safetensors, no tokenizer)."""
    config = BertConfig(vocab_size=N_GENES + 2, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, max_position_embeddings=max_length, pad_token_id=0,
                        hidden_act="relu", hidden_dropout_prob=0.02, attention_probs_dropout_prob=0.02,
                        initializer_range=0.2)
    torch.manual_seed(seed)
    BertForMaskedLM(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("geneformer_teacher"))


def distill_args(teacher, corpus, storage, **kw):
    values = dict(teacher=teacher, data=corpus, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                  batch_size=8, max_steps=24, eval_steps=12, warmup_steps=3, lr=3e-3, max_eval_cells=40,
                  validation_fraction=0.2, device="cpu", storage_directory=str(storage))
    values.update(kw)
    return distill_geneformer.DistillGeneformerArgs(**values)


# ---------------------------------------------------------------------------------------------
# rank-value encoding


def test_known_ranks_by_hand(tmp_path, dictionaries):
    """Cell 0: counts 10, 0, 4, 3, 8, 1 over genes with medians 2, 1, 0.5, 1, 4, 1 give values
    in proportion to 5, -, 8, 3, 2, 1: ranks gene 2, 0, 3, 4, 5. Gene 1 is not expressed, the
    unknown gene is dropped, cell 1 has only the unknown gene and is left out."""
    ids = [gene_id(k) for k in range(5)] + ["ENSGNOTKNOWN", gene_id(5)]
    tokens = {"<pad>": 0, "<mask>": 1} | {gene_id(k): 10 + k for k in range(6)}
    medians = {gene_id(k): m for k, m in enumerate([2, 1, 0.5, 1, 4, 1])}
    (tmp_path / "t.pkl").write_bytes(pickle.dumps(tokens))
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(medians))
    X = [[10, 0, 4, 3, 8, 50, 1], [0, 0, 0, 0, 0, 7, 0], [0, 2, 0, 0, 0, 0, 6]]
    h5ad = write_h5ad(tmp_path / "c.h5ad", X, ids)
    stats = tokenize(h5ad, tmp_path / "out", {"tokens": str(tmp_path / "t.pkl"), "medians": str(tmp_path / "m.pkl")})
    ds = load_corpus(str(tmp_path / "out"))
    assert ds["input_ids"][:] == [[12, 10, 13, 14, 15], [15, 11]]
    assert list(ds["length"]) == [5, 2] and list(ds["cell_index"]) == [0, 2]
    assert stats["cells_without_known_genes"] == 1 and stats["genes_known"] == 6
    # truncation keeps the highest ranked genes
    tokenize(h5ad, tmp_path / "short", {"tokens": str(tmp_path / "t.pkl"), "medians": str(tmp_path / "m.pkl")}, max_length=2)
    assert load_corpus(str(tmp_path / "short"))["input_ids"][:] == [[12, 10], [15, 11]]


@pytest.mark.parametrize("layout", ["csr", "dense", "csc"])
def test_real_v1_dictionaries_against_plain_python(tmp_path, layout):
    """300 genes of the real Geneformer V1 dictionaries (plus unknown and versioned ids), random
    sparse counts over 60 cells in 3 chunks, truncated to 40 genes: the corpus equals the plain
    Python encoding, however X is stored."""
    if not (GENEFORMER / "token_dictionary_gc30M.pkl").exists():
        pytest.skip("../shared/data/geneformer is absent (a fresh clone): the real V1 dictionaries are needed")
    tokens = pickle.loads((GENEFORMER / "token_dictionary_gc30M.pkl").read_bytes())
    medians = pickle.loads((GENEFORMER / "gene_median_dictionary_gc30M.pkl").read_bytes())
    known = sorted(medians)[::80][:300]
    ids = known[:150] + ["ENSG99999999999", "ACTB"] + [known[150] + ".7"] + known[151:]
    rng = np.random.default_rng(3)
    X = rng.poisson(rng.gamma(0.2, 3.0, size=(60, len(ids)))).astype(np.float32)
    X[5] = 0  # an empty cell
    h5ad = write_h5ad(tmp_path / "c.h5ad", X, ids, layout=layout)
    tokenize(h5ad, tmp_path / "out", {"tokens": str(GENEFORMER / "token_dictionary_gc30M.pkl"),
                                      "medians": str(GENEFORMER / "gene_median_dictionary_gc30M.pkl")},
             max_length=40, chunk_size=25)
    plain_ids = [g.split(".")[0] for g in ids]  # the versioned id counts as its plain id
    expected = plain_rank_value(X, plain_ids, tokens, medians, 40)
    ds = load_corpus(str(tmp_path / "out"))
    kept = [i for i, c in enumerate(expected) if c]
    assert list(ds["cell_index"]) == kept and 5 not in kept
    assert ds["input_ids"][:] == [expected[i] for i in kept]
    assert list(ds["length"]) == [len(expected[i]) for i in kept]
    assert max(ds["length"]) == 40  # some cells were cut


def test_gene_id_column_categorical_and_duplicates(tmp_path, dictionaries):
    """Ids from a named var column (the index holds symbols), stored as a categorical; a gene
    listed twice has its counts summed."""
    ids = [gene_id(k) for k in range(6)] + [gene_id(2)]
    symbols = [f"GENE{k}" for k in range(7)]
    X = [[1, 5, 2, 0, 9, 3, 4]]
    h5ad = write_h5ad(tmp_path / "c.h5ad", X, symbols, extra_var={"ensembl_id": ids})
    tokenize(h5ad, tmp_path / "a", dictionaries)
    summed = [[1, 5, 6, 0, 9, 3]]  # gene 2: 2 + 4
    want = plain_rank_value(summed, ids[:6], dictionaries["token_dict"], dictionaries["median_dict"], 2048)
    assert load_corpus(str(tmp_path / "a"))["input_ids"][:] == want  # ensembl_id is picked by default
    h5ad = write_h5ad(tmp_path / "d.h5ad", X, ids, categorical=True, index_name="gene_ids")
    tokenize(h5ad, tmp_path / "b", dictionaries, gene_id_column="gene_ids")
    assert load_corpus(str(tmp_path / "b"))["input_ids"][:] == want


def test_dictionary_without_the_files_id_format_is_a_one_line_error(tmp_path, dictionaries, capsys):
    """Mouse Ensembl ids while the dictionaries hold human ones: one line naming the flag; gene
    symbols: one line saying a symbol dictionary is needed."""
    X = programme_counts(5, 10, seed=0)
    h5ad = write_h5ad(tmp_path / "mouse.h5ad", X, [f"ENSMUSG{k:011d}" for k in range(10)])
    with pytest.raises(UsageError, match=r"--gene_id_column _index: none of the 10 gene ids .*ENSMUSG00000000000.*ENSG"):
        tokenize(h5ad, tmp_path / "out", dictionaries)
    with pytest.raises(SystemExit) as exit_:  # what jobs/tokenize_cells.py does
        main(tokenize_cells.TokenizeCellsArgs, tokenize_cells.run, argv=[
            "--h5ad", h5ad, "--output", str(tmp_path / "o"), "--token_dictionary", dictionaries["tokens"],
            "--gene_median_dictionary", dictionaries["medians"]])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "error: --gene_id_column _index: none of the 10" in err
    assert not (tmp_path / "o").exists()
    symbols = write_h5ad(tmp_path / "sym.h5ad", X, [f"GENE{k}" for k in range(10)])
    with pytest.raises(UsageError, match=r"--gene_name_dictionary is needed: the gene ids in var/_index look like symbols \(GENE0"):
        tokenize(symbols, tmp_path / "out", dictionaries)
    with pytest.raises(UsageError, match="--gene_id_column symbol: var of .* has no such column"):
        tokenize(h5ad, tmp_path / "out", dictionaries, gene_id_column="symbol")
    (tmp_path / "list.pkl").write_bytes(pickle.dumps(["ENSG1"]))
    with pytest.raises(UsageError, match="--token_dictionary .*holds a list"):
        tokenize(h5ad, tmp_path / "out", dict(dictionaries, tokens=str(tmp_path / "list.pkl")))
    with pytest.raises(UsageError, match="--matrix layers/counts: not in"):
        tokenize(h5ad, tmp_path / "out", dictionaries, matrix="layers/counts")


# ---------------------------------------------------------------------------------------------
# corpus, masking, length grouping, buckets


def test_corpus_is_memory_mapped_and_split_deterministically(corpus):
    ds = load_corpus(corpus)
    assert type(ds.data).__name__ == "MemoryMappedTable"
    train, val = split_cells(ds, 0.2, 0, 0, 64)
    train2, val2 = split_cells(ds, 0.2, 0, 0, 64)
    assert np.array_equal(train.indices, train2.indices) and np.array_equal(val.indices, val2.indices)
    assert sorted(set(train.indices) | set(val.indices)) == list(range(len(ds))) and not set(train.indices) & set(val.indices)
    assert len(val) == round(0.2 * len(ds))
    assert not np.array_equal(np.sort(split_cells(ds, 0.2, 1, 0, 64)[1].indices), np.sort(val.indices))
    assert list(val.lengths) == sorted(val.lengths)  # evaluation batches are length-sorted
    assert len(split_cells(ds, 0.2, 0, 10, 64)[1]) == 10
    cut = CellExamples(ds, [0, 1, 2], max_length=5)
    assert [list(cut[i]) for i in range(3)] == [x[:5] for x in ds["input_ids"][:3]]
    assert list(cut.lengths) == [min(5, n) for n in ds["length"][:3]]


def test_empty_corpus_is_a_one_line_error(tmp_path, teacher):
    from datasets import Dataset

    Dataset.from_dict({"input_ids": [], "length": []}).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(UsageError, match="--data .*empty: the corpus holds no cells"):
        distill_geneformer.run(distill_args(teacher, str(tmp_path / "empty"), tmp_path))
    Dataset.from_dict({"input_ids": [[], [5, 6]], "length": [0, 2]}).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(UsageError, match="--data: the corpus holds 1 non-empty cells"):
        distill_geneformer.run(distill_args(teacher, str(tmp_path / "one"), tmp_path))
    with pytest.raises(UsageError, match="--data .*nowhere: no such folder"):
        distill_geneformer.run(distill_args(teacher, str(tmp_path / "nowhere"), tmp_path))
    Dataset.from_dict({"genes": [[2, 3]]}).save_to_disk(str(tmp_path / "nocol"))
    with pytest.raises(UsageError, match="no input_ids column"):
        distill_geneformer.run(distill_args(teacher, str(tmp_path / "nocol"), tmp_path))
    assert not (tmp_path / "checkpoints").exists()  # refused before any run folder was made


def cells_with_specials(n, seed, vocab=N_GENES + 2):
    """Cells of 5-60 gene tokens, with <mask> (1) and <pad> (0) ids sprinkled inside."""
    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(n):
        x = rng.integers(2, vocab, rng.integers(5, 61))
        x[rng.random(len(x)) < 0.05] = 1
        x[rng.random(len(x)) < 0.03] = 0
        cells.append(x)
    return cells


def test_masking_statistics_and_specials(tmp_path):
    """15% of the non-special genes are chosen; of those 80% become <mask>, 10% a random gene,
    10% stay. Special ids and padding are never chosen, and no special id is ever inserted except
    <mask> at chosen positions."""
    cells = cells_with_specials(600, 0)
    collate = MLMCollator(0, 1, [0, 1], N_GENES + 2, 0.15)
    batch = collate(cells, [example_generator(0, 0, i) for i in range(len(cells))])
    ids, labels, am = batch["input_ids"], batch["labels"], batch["attention_mask"]
    original = torch.zeros_like(ids)
    for i, x in enumerate(cells):
        original[i, : len(x)] = torch.as_tensor(x)
    real = am.bool()
    special = (original == 0) | (original == 1)
    chosen = labels != -100
    assert not (chosen & (special | ~real)).any()
    assert torch.equal(labels[chosen], original[chosen])
    assert torch.equal(ids[~chosen & real], original[~chosen & real])
    assert (ids[~real] == 0).all() and (am[~real] == 0).all()
    n_maskable = int((real & ~special).sum())
    n = int(chosen.sum())
    sd = math.sqrt(0.15 * 0.85 / n_maskable)
    assert abs(n / n_maskable - 0.15) < 4 * sd
    to_mask = int((chosen & (ids == 1)).sum())
    kept = int((chosen & (ids == original)).sum())
    replaced = chosen & (ids != 1) & (ids != original)
    assert abs(to_mask / n - 0.8) < 4 * math.sqrt(0.16 / n)
    assert abs((kept + int(replaced.sum())) / n - 0.2) < 4 * math.sqrt(0.16 / n)
    assert abs(kept / n - 0.1) < 4 * math.sqrt(0.09 / n) + 1 / N_GENES  # a random gene may equal the original
    assert not ((ids == 0) & real & ~(original == 0)).any()  # <pad> never inserted
    assert ((ids[chosen] >= 2) | (ids[chosen] == 1)).all()  # replacements are genes, never specials


def test_length_grouped_batches_keep_every_cell_once_and_pad_little():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(40), 0.6, 203).astype(int), 1, 128)
    examples = list(range(len(lengths)))  # each example is its own index
    collate = lambda xs, gens: list(xs)  # noqa: E731
    for batch_size, group in [(8, 5), (7, 3), (16, 100), (1, 1)]:
        batches = LengthGroupedBatches(examples, batch_size, collate, lengths, seed=3, group_size=group)
        for epoch in range(3):
            order = batches.order(epoch).tolist()
            assert sorted(order) == examples
            seen = list(batches.epoch(epoch))
            assert sorted(i for b in seen for i in b) == examples  # every cell exactly once
            assert all(len(b) == batch_size for b in seen[:-1])
            assert max(lengths[seen[0]]) == lengths.max()  # the longest batch goes first
            assert batches.order(epoch).tolist() == order  # the same epoch gives the same order (resume)
        assert batches.order(0).tolist() != batches.order(1).tolist()
        # resuming mid-epoch sees the rest of the same batches
        assert list(batches.epoch(1, start=3)) == list(batches.epoch(1))[3:]
    # two data-parallel processes: together they read every cell once, each from a length-sorted batch
    batches = LengthGroupedBatches(examples, 8, collate, lengths, seed=3, group_size=5)
    ranks = [list(batches.shard(r, 2).epoch(0)) for r in range(2)]
    assert sorted(i for part in ranks for b in part for i in b) == examples
    both = [a + b for a, b in zip(*ranks)]
    assert all(list(lengths[b]) == sorted(lengths[b], reverse=True) for b in both)
    random_padding = padding_fraction(Batches(examples, 8, collate, seed=0).order(0), lengths, 8)
    grouped = LengthGroupedBatches(examples, 8, collate, lengths, seed=0, group_size=10)
    assert padding_fraction(grouped.order(0), lengths, 8) < random_padding / 3
    # one mega-batch holding every cell pads as little as sorting the whole corpus
    whole = LengthGroupedBatches(examples, 8, collate, lengths, seed=0, group_size=26)
    s = sorted(lengths, reverse=True)
    sorted_padding = 1 - sum(s) / sum(max(s[b:b + 8]) * len(s[b:b + 8]) for b in range(0, len(s), 8))
    assert padding_fraction(whole.order(0), lengths, 8) == pytest.approx(sorted_padding)


def test_buckets_bound_the_shapes_and_keep_the_masks():
    assert bucket_sizes(2048) == [256, 512, 768, 1024, 1280, 1536, 1792, 2048]
    assert bucket_sizes(64, [16, 32]) == [16, 32, 64] and bucket_sizes(100, n=3) == [40, 80, 100]
    cells = cells_with_specials(50, 1)
    plain = MLMCollator(0, 1, [0, 1], N_GENES + 2, 0.3)
    bucketed = BucketedMLMCollator(0, 1, [0, 1], N_GENES + 2, 0.3, buckets=[16, 32, 64])
    shapes = set()
    for start in range(0, 50, 4):
        part = cells[start:start + 4]
        gens = lambda: [example_generator(0, 0, start + i) for i in range(len(part))]  # noqa: E731
        a, b = plain(part, gens()), bucketed(part, gens())
        longest = max(len(x) for x in part)
        assert b["input_ids"].shape[1] == min(t for t in (16, 32, 64) if t >= longest)
        T = a["input_ids"].shape[1]
        for k in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(a[k], b[k][:, :T])
        assert (b["labels"][:, T:] == -100).all() and (b["attention_mask"][:, T:] == 0).all()
        shapes.add(tuple(b["input_ids"].shape))
    assert len({s[1] for s in shapes}) <= 3


# ---------------------------------------------------------------------------------------------
# the loss


def py_masked_kd(s, t, labels, mask, temperature, alpha):
    """alpha T^2 KL(p_T||p_S) + (1 - alpha) CE, averaged over masked positions, in plain Python."""
    def softmax(xs):
        top = max(xs)
        e = [math.exp(x - top) for x in xs]
        return [v / sum(e) for v in e]

    kls, ces = [], []
    for i, row in enumerate(mask):
        for j, m in enumerate(row):
            if not m:
                continue
            ps = softmax([x / temperature for x in s[i][j]])
            pt = softmax([x / temperature for x in t[i][j]])
            kls.append(sum(a * math.log(a / b) for a, b in zip(pt, ps)))
            ces.append(-math.log(softmax(s[i][j])[labels[i][j]]))
    kl = sum(kls) / len(kls) * temperature**2
    ce = sum(ces) / len(ces)
    return alpha * kl + (1 - alpha) * ce, kl, ce


@pytest.mark.parametrize("temperature,alpha", [(2.5, 0.65), (1.0, 0.0), (4.0, 1.0)])
def test_masked_kd_against_plain_python(temperature, alpha):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 7, generator=g) * 3, torch.randn(3, 5, 7, generator=g) * 3
    labels = torch.randint(0, 7, (3, 5), generator=g)
    mask = torch.rand(3, 5, generator=g) < 0.4
    mask[0, 0] = True
    labels[~mask] = -100
    objective = dict(temperature=temperature, kd_weight=alpha, ce_weight=1 - alpha)  # --alpha of distill_geneformer
    got = losses.distill_loss(s, t, mask, labels, **objective)
    want = py_masked_kd(s.tolist(), t.tolist(), labels.tolist(), mask.tolist(), temperature, alpha)
    for a, b in zip(got, want):
        assert abs(float(a) - b) < 1e-5 * max(1, abs(b))
    # unmasked positions never count: noise there leaves the value unchanged
    noisy_s, noisy_t = s.clone(), t.clone()
    noisy_s[~mask], noisy_t[~mask] = 1e4, float("nan")
    again = losses.distill_loss(noisy_s, noisy_t, mask, labels, **objective)
    assert torch.allclose(again[0], got[0])


# ---------------------------------------------------------------------------------------------
# the jobs


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, teacher, corpus):
    """One tiny distillation run (24 steps), shared by the tests that read its outputs."""
    args = distill_args(teacher, corpus, tmp_path_factory.mktemp("distilled"))
    return distill_geneformer.run(args), args


def test_distillation_loss_falls_and_the_student_is_saved(distilled):
    run, args = distilled
    log = read_log(run.log_path)
    assert log["attrs"]["status"] == "complete"
    ev = log["eval"]
    assert list(ev["step"]) == [0, 12, 24]
    assert ev["eval_loss"][0] > ev["eval_loss"][1] > ev["eval_loss"][2]  # the student's held-out loss falls
    assert ev["eval_kl"][-1] < 0.8 * ev["eval_kl"][0] and ev["perplexity"][-1] < ev["perplexity"][0]
    assert log["train"]["loss"][-4:].mean() < log["train"]["loss"][:4].mean()
    lr = log["train"]["lr"]
    assert list(lr[:4]) == pytest.approx([0, 1e-3, 2e-3, 3e-3])  # 3 warm-up steps (lr of each step as it ran)
    k = np.arange(3, 24)  # then cosine from the peak towards 0 at step 24
    assert list(lr[3:]) == pytest.approx(list(3e-3 * 0.5 * (1 + np.cos(np.pi * (k - 3) / 21))), abs=1e-9)
    for k in ("kl", "ce", "mlm_accuracy", "grad_norm", "tokens_per_s"):
        assert k in log["train"]
    final = log["final"]
    assert final["teacher/parameters"] > final["student/parameters"] > 0
    for k in ("mlm_accuracy", "mlm_top5_accuracy", "perplexity", "masked_tokens"):
        assert f"student/{k}" in final and f"teacher/{k}" in final
    model = run.checkpoint_dir / "model"
    student = BertForMaskedLM.from_pretrained(model)
    assert (student.config.hidden_size, student.config.num_hidden_layers, student.config.intermediate_size) == (16, 2, 64)
    assert student.config.vocab_size == N_GENES + 2 and student.config.max_position_embeddings == 64
    assert student.config.hidden_act == "relu"
    card = (model / "README.md").read_text()
    assert "| Metric" in card and "python jobs/distill_geneformer.py" in card


def test_eval_quick_table_and_hdf5(tmp_path, teacher, corpus, distilled, capsys):
    run, _ = distilled
    q = eval_quick.EvalQuickArgs(teacher=teacher, student=str(run.checkpoint_dir / "model"), data=corpus,
                                 validation_fraction=0.2, max_eval_cells=40, batch_size=5, device="cpu",
                                 storage_directory=str(tmp_path))
    table = eval_quick.run(q)
    out = capsys.readouterr().out
    assert "| Metric" in out and "| Teacher" in out and "| Student" in out and "| Gap" in out
    # the same cells and masks as the job's own final evaluation, whatever the batch size
    final = read_log(run.log_path)["final"]
    for k in ("mlm_accuracy", "perplexity", "masked_tokens"):
        assert table["Student"][k] == pytest.approx(final[f"student/{k}"], rel=1e-5)
        assert table["Teacher"][k] == pytest.approx(final[f"teacher/{k}"], rel=1e-5)
    log = read_log(tmp_path / "eval_results" / "eval_quick.h5")
    assert log["attrs"]["status"] == "complete" and log["final"]["student/parameters"] == table["Student"]["parameters"]
    # teacher against itself: the gap is exactly zero
    same = eval_quick.run(eval_quick.EvalQuickArgs(teacher=teacher, student=teacher, data=corpus, validation_fraction=0.2,
                                                   max_eval_cells=40, device="cpu", storage_directory=str(tmp_path)))
    assert same["Teacher"] == same["Student"]
    # against an independent count: the model's full HF forward over the same masked cells
    config = BertConfig.from_pretrained(teacher)
    _, cells, batches = distill_geneformer.eval_cell_batches(distill_geneformer.check_cell_data(q, config), q, 7, q.seed)
    assert len(cells) == 40
    student = BertForMaskedLM.from_pretrained(run.checkpoint_dir / "model").eval()
    hits = top5 = count = nll = 0
    with torch.no_grad():
        for batch in batches.epoch(0):
            logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            chosen = batch["labels"] != -100
            scored, labels = logits[chosen], batch["labels"][chosen]
            hits += int((scored.argmax(-1) == labels).sum())
            top5 += sum(int(label in row.topk(5).indices) for row, label in zip(scored, labels))
            nll += float(torch.nn.functional.cross_entropy(scored, labels, reduction="sum"))
            count += len(labels)
    assert table["Student"]["masked_tokens"] == count
    assert table["Student"]["mlm_accuracy"] == pytest.approx(hits / count)
    assert table["Student"]["mlm_top5_accuracy"] == pytest.approx(top5 / count)
    assert table["Student"]["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_plot_training_writes_a_png(tmp_path, distilled, capsys):
    run, _ = distilled
    main(plot_training.PlotTrainingArgs, plot_training.run, argv=[str(run.log_path), "--output", str(tmp_path / "c.png")],
         positional="log")  # python jobs/plot_training.py LOG.h5 --output c.png
    png = (tmp_path / "c.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "loss, accuracy, perplexity curves" in capsys.readouterr().out
    main(plot_training.PlotTrainingArgs, plot_training.run, argv=[str(run.log_path)], positional="log")
    assert run.log_path.with_suffix(".png").exists()  # default: beside the log
    with pytest.raises(UsageError, match="no such file"):
        plot_training.run(plot_training.PlotTrainingArgs(log=str(tmp_path / "none.h5")))


def test_resume_is_bit_identical(tmp_path, teacher, corpus):
    from safetensors.torch import load_file

    straight = distill_geneformer.run(distill_args(teacher, corpus, tmp_path / "a", max_steps=8, eval_steps=4))
    with pytest.raises(Exception, match="stopped at step 3"):
        distill_geneformer.run(distill_args(teacher, corpus, tmp_path / "b", max_steps=8, eval_steps=4, stop_after_steps=3))
    resumed = distill_geneformer.run(distill_args(teacher, corpus, tmp_path / "b", max_steps=8, eval_steps=4))
    a = load_file(straight.checkpoint_dir / "model" / "model.safetensors")
    b = load_file(resumed.checkpoint_dir / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_teacher_copies_every_kth_layer(tmp_path, corpus):
    from safetensors.torch import load_file

    wide = save_teacher(tmp_path / "t4", hidden=16, layers=4, heads=2)
    args = distill_args(wide, corpus, tmp_path, init_from_teacher=True, num_attention_heads=2, max_steps=1, eval_steps=0,
                        lr=1e-12, warmup_steps=0, adam_weight_decay=0.0)
    run = distill_geneformer.run(args)
    t = load_file(Path(wide) / "model.safetensors")
    s = load_file(run.checkpoint_dir / "model" / "model.safetensors")
    for new, old in [(0, 0), (1, 2)]:  # 4 teacher layers -> 2: layers 0 and 2
        key = "bert.encoder.layer.{}.attention.self.query.weight"
        assert torch.allclose(s[key.format(new)], t[key.format(old)], atol=1e-9)
    assert torch.allclose(s["bert.embeddings.word_embeddings.weight"], t["bert.embeddings.word_embeddings.weight"], atol=1e-9)
    ffn = "bert.encoder.layer.1.intermediate.dense.weight"  # 64 wide here, 32 in the teacher: left random
    assert s[ffn].shape != t[ffn.replace("1.", "2.", 1)].shape
    with pytest.raises(UsageError, match="--init_from_teacher needs --hidden_size 16"):
        distill_geneformer.run(distill_args(wide, corpus, tmp_path, init_from_teacher=True, hidden_size=32))


@pytest.mark.slow
@pytest.mark.subprocess
def test_bad_student_shape_is_a_one_line_error(tmp_path, teacher, corpus):
    with pytest.raises(UsageError, match="--hidden_size 18 is not a multiple of --num_attention_heads 4"):
        distill_geneformer.run(distill_args(teacher, corpus, tmp_path, hidden_size=18))
    with pytest.raises(UsageError, match="--bucket_sizes only applies with --compile"):
        distill_geneformer.run(distill_args(teacher, corpus, tmp_path, bucket_sizes=[32]))
    with pytest.raises(UsageError, match="--bucket_sizes 128: allowed 1-64"):
        distill_geneformer.run(distill_args(teacher, corpus, tmp_path, compile=True, bucket_sizes=[128]))
    out = subprocess.run([sys.executable, "jobs/distill_geneformer.py", "--teacher", teacher, "--data", corpus,
                          "--hidden_size", "130", "--num_hidden_layers", "4", "--num_attention_heads", "4",
                          "--storage_directory", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert_one_line_error(out, "--hidden_size 130 is not a multiple of --num_attention_heads 4")
    assert not (tmp_path / "checkpoints").exists()


def test_compile_buckets_bound_the_shapes_seen(tmp_path, teacher, corpus, monkeypatch):
    """With --compile, batches come in at most (buckets x 2 batch sizes) shapes, and the count is
    logged. torch.compile itself is replaced by the identity here (a real compile takes about a
    minute per shape on 2 CPU cores); test_compile_smoke runs the real one."""
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)
    run = distill_geneformer.run(distill_args(teacher, corpus, tmp_path, compile=True, bucket_sizes=[16, 32],
                                              max_steps=30, eval_steps=0, batch_size=7))
    log = read_log(run.log_path)
    shapes = log["train"]["distinct_shapes"]
    assert 1 <= shapes[-1] <= 6 and log["final"]["distinct_shapes"] == shapes[-1]
    assert (np.diff(shapes) >= 0).all()


@pytest.mark.skipif(os.environ.get("SITRA_COMPILE_TESTS") != "1",
                    reason="a real torch.compile takes about 2 minutes on 2 CPU cores; SITRA_COMPILE_TESTS=1 runs it")
def test_compile_smoke(tmp_path, teacher, corpus):
    """A real torch.compile run on one bucket: every batch has the same length, so one graph."""
    run = distill_geneformer.run(distill_args(teacher, corpus, tmp_path, compile=True, bucket_sizes=[64], max_steps=3,
                                              eval_steps=0, batch_size=8, hidden_size=8, num_hidden_layers=1,
                                              num_attention_heads=2))
    log = read_log(run.log_path)
    assert log["final"]["distinct_shapes"] == 1 and np.isfinite(log["train"]["loss"]).all()


@pytest.mark.parametrize("flags, kernel", [([], "_scaled_dot_product_flash_attention_for_cpu"), (["--attention_dropout", "0.3"], "_scaled_dot_product_attention_math")])
def test_student_attention_dropout_decides_the_attention_kernel(flags, kernel):
    """Without attention dropout (the default) the student's SDPA attention takes the flash kernel,
    which keeps no batch x heads x length^2 matrices for backward; with dropout it falls back to the
    math kernel (what held 62% of the job's peak memory at 2,048 genes)."""
    from torch.profiler import ProfilerActivity, profile

    from sitra.cli import parse

    teacher = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         attention_probs_dropout_prob=0.02, max_position_embeddings=64)
    args = parse(distill_geneformer.ARGS, ["--hidden_size", "16", "--num_hidden_layers", "1", "--num_attention_heads", "2", *flags])
    config = distill_geneformer.student_config(teacher, args)
    assert config.attention_probs_dropout_prob == (0.3 if flags else 0.0)
    assert config.hidden_dropout_prob == teacher.hidden_dropout_prob
    student = BertForMaskedLM(config).train()
    ids = torch.randint(2, 50, (2, 40))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        student(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.sum().backward()
    names = {e.key for e in prof.key_averages()}
    kernels = {n.removeprefix("aten::") for n in names if n.startswith("aten::_scaled_dot_product")}
    assert {k for k in kernels if not k.endswith("_backward")} == {kernel}

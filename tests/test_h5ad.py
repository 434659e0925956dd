""".h5ad files as scanpy users have them, through tokenize_cells: gene symbols as the var index,
scaled z-scores in X, log-normalised values in raw, counts in a layer; in anndata's current layout
(written by anndata) and in the layout of anndata < 0.7 (written here with h5py the way anndata
0.6 wrote it, and checked to read back through anndata). Then eval_quick's cell-type probe.

Expected corpora come from plain Python (test_geneformer.plain_rank_value) over the matrices the
test made, never from the code under test.
"""
import json
import pickle
import warnings

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from transformers import BertForMaskedLM

from sitra.cli import main
from sitra.data.cells import load_corpus, values_line
from sitra.errors import UsageError
from sitra.recipes import eval_quick, tokenize_cells
from sitra.results import read_log
from test_geneformer import GENEFORMER, N_GENES, plain_rank_value, save_teacher


# a blood-cell panel: markers of three cell types, two symbols the name dictionary lacks (unmapped),
# one it maps to an id the token dictionaries lack (unknown), and genes every cell expresses (the
# last two are not 'highly variable': X and the counts layer leave them out, raw keeps them)
MARKERS = {"T cell": ["CD3E", "CD3D", "IL7R", "LTB", "CCR7", "CD2"],
           "B cell": ["MS4A1", "CD79A", "CD79B", "CD19", "BANK1", "HLA-DQA1"],
           "monocyte": ["LYZ", "CD14", "S100A8", "S100A9", "FCN1", "CST3"]}
HOUSEKEEPING = ["ACTB", "GAPDH", "B2M", "TMSB4X", "FTL", "FTH1", "RPL13", "RPS27", "EEF1A1", "MALAT1"]
UNMAPPED = ["AL627309.1", "LINC01409"]  # not in the name dictionary
UNKNOWN = ["MT-ND1"]  # mapped, but not in the token / median dictionaries
SYMBOLS = [g for genes in MARKERS.values() for g in genes] + UNMAPPED + UNKNOWN + HOUSEKEEPING
TYPES = list(MARKERS)
# real Ensembl ids of some of the symbols, for the test with Geneformer's own dictionaries
REAL_IDS = {"ACTB": "ENSG00000075624", "GAPDH": "ENSG00000111640", "B2M": "ENSG00000166710", "MALAT1": "ENSG00000251562",
            "CD3E": "ENSG00000198851", "CD3D": "ENSG00000167286", "IL7R": "ENSG00000168685", "MS4A1": "ENSG00000156738",
            "CD79A": "ENSG00000105369", "LYZ": "ENSG00000090382", "CD14": "ENSG00000170458", "S100A8": "ENSG00000143546",
            "S100A9": "ENSG00000163220", "CST3": "ENSG00000101439"}


def fake_id(symbol):
    return f"ENSG{SYMBOLS.index(symbol) + 1:011d}"


@pytest.fixture(scope="module")
def dicts(tmp_path_factory):
    """Tiny Geneformer-style dictionaries over SYMBOLS' made-up Ensembl ids, and the name dictionary."""
    d = tmp_path_factory.mktemp("dicts")
    rng = np.random.default_rng(0)
    known = [fake_id(s) for s in SYMBOLS if s not in UNMAPPED + UNKNOWN]
    tokens = {"<pad>": 0, "<mask>": 1} | {g: k + 2 for k, g in enumerate(known)}
    medians = {g: float(rng.uniform(0.5, 3.0)) for g in known}
    names = {s: fake_id(s) for s in SYMBOLS if s not in UNMAPPED}
    for name, value in (("tokens", tokens), ("medians", medians), ("names", names)):
        (d / f"{name}.pkl").write_bytes(pickle.dumps(value))
    return {"tokens": str(d / "tokens.pkl"), "medians": str(d / "medians.pkl"), "names": str(d / "names.pkl"),
            "token_dict": tokens, "median_dict": medians, "name_dict": names}


def blood_cells(n_cells=90, seed=0):
    """(counts, cell types): three cell types with their markers; cell 3 and 50 have no counts at
    all, cells 7 and 60 only counts of the unmapped and unknown genes."""
    rng = np.random.default_rng(seed)
    kind = np.arange(n_cells) % 3
    rate = np.full((n_cells, len(SYMBOLS)), 0.3)
    rate[:, [SYMBOLS.index(g) for g in HOUSEKEEPING]] = rng.gamma(2.0, 3.0, len(HOUSEKEEPING))
    for k, t in enumerate(TYPES):
        rate[np.ix_(kind == k, [SYMBOLS.index(g) for g in MARKERS[t]])] = 8.0
    counts = rng.poisson(rate * rng.uniform(0.5, 2.0, (n_cells, 1))).astype(np.float32)
    counts[[3, 50]] = 0
    counts[[7, 60]] = 0
    counts[[7, 60], SYMBOLS.index("LINC01409")] = 3
    counts[60, SYMBOLS.index("MT-ND1")] = 5
    return counts, np.array(TYPES)[kind]


def scanpy_matrices(counts):
    """What a scanpy workflow leaves: log-normalised values of every gene (normalize_total to
    10,000 + log1p), and z-scores of the 'highly variable' genes (every gene but the last two)."""
    totals = counts.sum(1, keepdims=True)
    lognorm = np.log1p(np.divide(counts * 1e4, totals, out=np.zeros_like(counts), where=totals > 0)).astype(np.float32)
    hvg = np.arange(len(SYMBOLS) - 2)
    part = lognorm[:, hvg]
    scaled = ((part - part.mean(0)) / (part.std(0) + 1e-6)).clip(-10, 10).astype(np.float32)
    return lognorm, hvg, scaled


def write_new_layout(path, counts, cell_types):
    """Written by the installed anndata: X scaled (dense), layers/counts (CSR), raw log-normalised."""
    lognorm, hvg, scaled = scanpy_matrices(counts)
    obs = pd.DataFrame({"cell_type": pd.Categorical(cell_types), "n_counts": counts.sum(1)},
                       index=[f"AAACCTGAGC{i:06d}-1" for i in range(len(counts))])
    raw = anndata.AnnData(X=sp.csr_matrix(lognorm), obs=obs, var=pd.DataFrame(index=SYMBOLS))
    adata = anndata.AnnData(X=scaled, obs=obs, var=pd.DataFrame({"n_cells": (counts[:, hvg] > 0).sum(0)},
                                                                index=np.array(SYMBOLS)[hvg]))
    adata.layers["counts"] = sp.csr_matrix(counts[:, hvg])
    adata.raw = raw
    adata.write_h5ad(path)
    return str(path)


def _records(index, **columns):
    """A dataframe as anndata < 0.7 stored it: a compound dataset, strings as fixed-width bytes."""
    arrays = [np.array(index, dtype="S")] + [np.asarray(v) for v in columns.values()]
    return np.rec.fromarrays(arrays, names=["index", *columns])


def _h5sparse(f, key, m):
    """A CSR matrix as anndata < 0.7 stored it (h5sparse's group format)."""
    g = f.create_group(key)
    g.attrs["h5sparse_format"], g.attrs["h5sparse_shape"] = "csr", np.array(m.shape)
    g["data"], g["indices"], g["indptr"] = m.data, m.indices, m.indptr


def write_old_layout(path, counts, cell_types):
    """The same data in the layout of anndata < 0.7 (0.6.22's _write_h5ad): no encoding attributes,
    obs and var as compound datasets, categories in uns/<column>_categories, sparse matrices as
    h5sparse groups, raw as raw.X and raw.var."""
    lognorm, hvg, scaled = scanpy_matrices(counts)
    categories = sorted(set(cell_types))
    with h5py.File(path, "w") as f:
        f["X"] = scaled
        f["obs"] = _records([f"AAACCTGAGC{i:06d}-1" for i in range(len(counts))],
                            cell_type=np.array([categories.index(t) for t in cell_types], dtype=np.int8),
                            n_counts=counts.sum(1))
        f["uns/cell_type_categories"] = np.array(categories, dtype="S")
        f["var"] = _records(np.array(SYMBOLS)[hvg], n_cells=(counts[:, hvg] > 0).sum(0).astype(np.int64))
        f.create_group("layers")
        _h5sparse(f, "layers/counts", sp.csr_matrix(counts[:, hvg]))
        _h5sparse(f, "raw.X", sp.csr_matrix(lognorm))
        f["raw.var"] = _records(SYMBOLS, n_cells=(counts > 0).sum(0).astype(np.int64))
    return str(path)


LAYOUTS = {"new": write_new_layout, "old": write_old_layout}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def scanpy_file(request, tmp_path_factory):
    counts, cell_types = blood_cells()
    path = LAYOUTS[request.param](tmp_path_factory.mktemp(request.param) / "pbmc.h5ad", counts, cell_types)
    return {"path": path, "layout": request.param, "counts": counts, "cell_types": cell_types}


def tokenize(h5ad, out, dicts, **kw):
    values = dict(h5ad=h5ad, output=str(out), token_dictionary=dicts["tokens"], gene_median_dictionary=dicts["medians"])
    values.update(kw)
    return tokenize_cells.run(tokenize_cells.TokenizeCellsArgs(**values))


def expected_cells(counts, symbols, dicts, max_length=2048):
    ids = [dicts["name_dict"].get(s, "") for s in symbols]
    return plain_rank_value(counts, ids, dicts["token_dict"], dicts["median_dict"], max_length)


# ---------------------------------------------------------------------------------------------


def test_both_layouts_are_what_anndata_reads(scanpy_file):
    """The files are what they claim: anndata itself reads back the data the test put in."""
    counts, lognorm = scanpy_file["counts"], scanpy_matrices(scanpy_file["counts"])[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = anndata.read_h5ad(scanpy_file["path"])
    assert list(adata.var_names) == SYMBOLS[:-2] and list(adata.raw.var_names) == SYMBOLS
    assert np.array_equal(adata.layers["counts"].toarray(), counts[:, :-2])
    assert np.array_equal(adata.raw.X.toarray(), lognorm) and (adata.X < 0).any()
    assert list(adata.obs["cell_type"].astype(str)) == list(scanpy_file["cell_types"])
    with h5py.File(scanpy_file["path"]) as f:
        assert ("raw.X" in f and isinstance(f["var"], h5py.Dataset)) == (scanpy_file["layout"] == "old")


def test_counts_layer_with_symbols_and_cell_types(scanpy_file, dicts, tmp_path, capsys):
    """--matrix layers/counts, symbols mapped by --gene_name_dictionary, cell types carried: the
    corpus equals plain Python; each left-out cell is counted under its reason."""
    counts, types = scanpy_file["counts"], scanpy_file["cell_types"]
    stats = tokenize(scanpy_file["path"], tmp_path / "c", dicts, matrix="layers/counts",
                     gene_name_dictionary=dicts["names"], obs_columns="cell_type,n_counts", chunk_size=32)
    want = expected_cells(counts[:, :-2], SYMBOLS[:-2], dicts)
    kept = [i for i, c in enumerate(want) if c]
    ds = load_corpus(str(tmp_path / "c"))
    assert ds["input_ids"][:] == [want[i] for i in kept] and list(ds["cell_index"]) == kept
    assert list(ds["cell_type"]) == list(types[kept]) and list(ds["n_counts"]) == list(counts[kept].sum(1))
    assert len(kept) == 86 and stats["cells_zero_total"] == 2 and stats["cells_without_known_genes"] == 2
    # the layer spans every gene but the last two
    assert (stats["genes_in_file"], stats["genes_mapped"], stats["genes_unmapped"], stats["genes_known"]) == (29, 27, 2, 26)
    assert stats["unmapped_examples"] == UNMAPPED and stats["unknown_examples"] == UNKNOWN
    out = capsys.readouterr().out.splitlines()
    layout = ", anndata < 0.7 layout" if scanpy_file["layout"] == "old" else ""
    assert out[-2] == (f"86 of 90 cells written to {tmp_path / 'c'} from layers/counts (raw counts{layout}); left out: "
                       "2 with a zero total, 2 without an expressed known gene")
    index = "index" if scanpy_file["layout"] == "old" else "_index"
    assert out[-1] == (f"genes: 29 in var/{index} (symbols), 27 mapped to Ensembl ids by --gene_name_dictionary, "
                       "2 unmapped (e.g. AL627309.1, LINC01409); 26 known to the dictionaries, 1 not (e.g. MT-ND1)")
    meta = json.loads((tmp_path / "c" / "tokenize_cells.json").read_text())
    assert meta["values"] == "raw_counts" and meta["matrix"] == "layers/counts" and meta["obs_columns"] == ["cell_type", "n_counts"]
    assert values_line(str(tmp_path / "c")) is None  # raw counts: what Geneformer itself is trained on


@pytest.mark.parametrize("spelling", ["raw", "raw/X", "raw.X"])
def test_log_normalised_raw_is_undone_with_expm1(scanpy_file, dicts, tmp_path, spelling, capsys):
    """raw (any spelling) with --values log1p: ranked on expm1 of the stored values, over raw/var's
    genes; the same ranking as the normalised counts themselves (up to float32 ties)."""
    counts = scanpy_file["counts"]
    lognorm = scanpy_matrices(counts)[0]
    stats = tokenize(scanpy_file["path"], tmp_path / "r", dicts, matrix=spelling, values="log1p",
                     gene_name_dictionary=dicts["names"], chunk_size=40)
    want = expected_cells(np.expm1(lognorm.astype(np.float64)), SYMBOLS, dicts)
    ds = load_corpus(str(tmp_path / "r"))
    assert ds["input_ids"][:] == [c for c in want if c]
    assert stats["genes_in_file"] == len(SYMBOLS) and stats["genes_unmapped"] == 2 and stats["unknown_examples"] == ["MT-ND1"]
    assert "1 not (e.g. MT-ND1)" in capsys.readouterr().out
    assert json.loads((tmp_path / "r" / "tokenize_cells.json").read_text())["values"] == "log1p"
    assert values_line(str(tmp_path / "r")) == ("cell values: raw of " + scanpy_file["path"] + " held log(1 + x) of "
                                               "normalised counts, turned back with expm1 before ranking")
    from_counts = expected_cells(counts, SYMBOLS, dicts)
    same = [a == b for a, b in zip(want, from_counts) if b]
    assert np.mean(same) > 0.9  # log1p undone: the ranking of the counts, not of the logs
    if spelling == "raw":  # ranking the logs as if they were counts gives another corpus
        logs_ranked = expected_cells(lognorm, SYMBOLS, dicts)
        assert np.mean([a == b for a, b in zip(logs_ranked, from_counts) if b]) < 0.5


def test_wrong_values_are_one_line_errors(scanpy_file, dicts, tmp_path, capsys):
    """Scaled X (negative values) and log-normalised raw without --values: refused before any
    folder is made, naming the counts layer; --values counts accepts non-integer values as they are."""
    path = scanpy_file["path"]
    with pytest.raises(UsageError, match=r"^--matrix X: negative values \(e.g. -[0-9.]+ in cell \d+\): scaled data, "
                                         r"not counts; give --matrix layers/counts \(it holds counts\)$"):
        tokenize(path, tmp_path / "x", dicts, gene_name_dictionary=dicts["names"])
    with pytest.raises(UsageError, match="negative values"):
        tokenize(path, tmp_path / "x", dicts, gene_name_dictionary=dicts["names"], values="log1p")
    with pytest.raises(UsageError, match=r"^--matrix raw: non-integer values \(e.g. [0-9.]+ in cell 0\), not raw counts; "
                                         r"add --values log1p .*--values counts .* give --matrix layers/counts"):
        tokenize(path, tmp_path / "x", dicts, gene_name_dictionary=dicts["names"], matrix="raw.X")
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as exit_:
        main(tokenize_cells.TokenizeCellsArgs, tokenize_cells.run, argv=[
            "--h5ad", path, "--output", str(tmp_path / "o"), "--token_dictionary", dicts["tokens"],
            "--gene_median_dictionary", dicts["medians"], "--gene_name_dictionary", dicts["names"]])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "error: --matrix X: negative values" in err
    assert not (tmp_path / "o").exists()
    # normalised values (not logs) ranked as they are
    lognorm = scanpy_matrices(scanpy_file["counts"])[0]
    tokenize(path, tmp_path / "n", dicts, gene_name_dictionary=dicts["names"], matrix="raw", values="counts")
    assert load_corpus(str(tmp_path / "n"))["input_ids"][:] == [c for c in expected_cells(lognorm, SYMBOLS, dicts) if c]


def test_every_chunk_is_checked(dicts, tmp_path):
    """A negative value in the third chunk: refused naming its cell, and no corpus is left behind."""
    counts, _ = blood_cells()
    counts[70, 0] = -1
    anndata.AnnData(X=sp.csr_matrix(counts), var=pd.DataFrame(index=SYMBOLS)).write_h5ad(tmp_path / "c.h5ad")
    with pytest.raises(UsageError, match=r"^--matrix X: negative values \(e.g. -1 in cell 70\): scaled data, not counts; "
                                         r"give --matrix with raw counts \(this file has: X; none holds counts\)$"):
        tokenize(str(tmp_path / "c.h5ad"), tmp_path / "out", dicts, gene_name_dictionary=dicts["names"], chunk_size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5ad"]


def test_unknown_matrix_lists_every_matrix(scanpy_file, dicts, tmp_path):
    with pytest.raises(UsageError, match=r"^--matrix layers/spliced: not in .*pbmc.h5ad \(it has: X, raw, layers/counts\)$"):
        tokenize(scanpy_file["path"], tmp_path / "x", dicts, matrix="layers/spliced")
    with pytest.raises(UsageError, match=r"^--obs_columns donor: obs of .* has no such column \(it has: cell_type, n_counts\)$"):
        tokenize(scanpy_file["path"], tmp_path / "x", dicts, matrix="layers/counts", gene_name_dictionary=dicts["names"],
                 obs_columns="cell_type,donor")


def test_symbols_without_a_name_dictionary_say_what_is_needed(scanpy_file, dicts, tmp_path):
    index = "index" if scanpy_file["layout"] == "old" else "_index"
    with pytest.raises(UsageError, match=rf"^--gene_name_dictionary is needed: the gene ids in var/{index} look like "
                                         r"symbols \(CD3E, CD3D, IL7R, ...\) .*gene_name_id_dict.pkl"):
        tokenize(scanpy_file["path"], tmp_path / "x", dicts, matrix="layers/counts")
    (tmp_path / "names.pkl").write_bytes(pickle.dumps({"ACTB": 7}))
    with pytest.raises(UsageError, match="--gene_name_dictionary .*entry 'ACTB' -> 7; expected gene symbol"):
        tokenize(scanpy_file["path"], tmp_path / "x", dicts, matrix="layers/counts", gene_name_dictionary=str(tmp_path / "names.pkl"))


def test_a_var_column_of_ensembl_ids_is_found(dicts, tmp_path, capsys):
    """A cellranger-style var: symbols as the index, Ensembl ids in gene_ids; the ids are used
    without a name dictionary (and a versioned id counts as its plain id)."""
    counts, _ = blood_cells(seed=1)
    ids = [dicts["name_dict"].get(s, f"ENSG{90000000000 + k}") for k, s in enumerate(SYMBOLS)]
    ids[0] += ".14"
    adata = anndata.AnnData(X=sp.csr_matrix(counts), var=pd.DataFrame({"gene_ids": ids, "feature_types": "Gene Expression"},
                                                                       index=SYMBOLS))
    adata.write_h5ad(tmp_path / "tenx.h5ad")
    stats = tokenize(str(tmp_path / "tenx.h5ad"), tmp_path / "c", dicts)
    assert load_corpus(str(tmp_path / "c"))["input_ids"][:] == [c for c in expected_cells(counts, SYMBOLS, dicts) if c]
    assert stats["gene_source"] == "var/gene_ids" and stats["gene_ids"] == "ids"
    assert capsys.readouterr().out.splitlines()[-1] == ("genes: 31 in var/gene_ids; 28 known to the dictionaries, "
                                                        "3 not (e.g. ENSG90000000018, ENSG90000000019, ENSG00000000021)")


def test_geneformer_dictionaries_with_real_symbols(tmp_path, capsys):
    """Real Geneformer V1 dictionaries and real symbol -> Ensembl pairs: the corpus equals plain
    Python over the mapped ids."""
    if not (GENEFORMER / "token_dictionary_gc30M.pkl").exists():
        pytest.skip("../shared/data/geneformer is absent (a fresh clone): the real V1 dictionaries are needed")
    tokens = pickle.loads((GENEFORMER / "token_dictionary_gc30M.pkl").read_bytes())
    medians = pickle.loads((GENEFORMER / "gene_median_dictionary_gc30M.pkl").read_bytes())
    (tmp_path / "names.pkl").write_bytes(pickle.dumps(REAL_IDS))
    counts, types = blood_cells(seed=2)
    path = write_new_layout(tmp_path / "pbmc.h5ad", counts, types)
    stats = tokenize_cells.run(tokenize_cells.TokenizeCellsArgs(
        h5ad=path, output=str(tmp_path / "c"), token_dictionary=str(GENEFORMER / "token_dictionary_gc30M.pkl"),
        gene_median_dictionary=str(GENEFORMER / "gene_median_dictionary_gc30M.pkl"), gene_name_dictionary=str(tmp_path / "names.pkl"),
        matrix="layers/counts"))
    ids = [REAL_IDS.get(s, "") for s in SYMBOLS[:-2]]
    want = plain_rank_value(counts[:, :-2], ids, tokens, medians, 2048)
    assert load_corpus(str(tmp_path / "c"))["input_ids"][:] == [c for c in want if c]
    assert stats["genes_mapped"] == sum(s in REAL_IDS for s in SYMBOLS[:-2]) == 13
    assert stats["genes_known"] == sum(i in tokens and i in medians for i in ids) == 13


# ---------------------------------------------------------------------------------------------
# eval_quick's cell-type probe


@pytest.fixture(scope="module")
def typed_corpus(tmp_path_factory, dicts):
    """300 cells of three types over N_GENES genes with Ensembl ids, cell_type carried along."""
    d = tmp_path_factory.mktemp("typed")
    rng = np.random.default_rng(4)
    programmes = rng.gamma(0.3, 4.0, size=(3, N_GENES))
    kind = rng.integers(0, 3, 300)
    counts = rng.poisson(programmes[kind] * rng.uniform(0.5, 2.0, (300, 1))).astype(np.float32)
    ids = [f"ENSG{k:011d}" for k in range(N_GENES)]
    obs = pd.DataFrame({"cell_type": pd.Categorical(np.array(["T cell", "B cell", "NK cell"])[kind])},
                       index=[f"c{i}" for i in range(300)])
    anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=ids)).write_h5ad(d / "typed.h5ad")
    tokens = {"<pad>": 0, "<mask>": 1} | {g: k + 2 for k, g in enumerate(ids)}
    medians = {g: 1.0 for g in ids}
    (d / "t.pkl").write_bytes(pickle.dumps(tokens))
    (d / "m.pkl").write_bytes(pickle.dumps(medians))
    tokenize_cells.run(tokenize_cells.TokenizeCellsArgs(h5ad=str(d / "typed.h5ad"), output=str(d / "corpus"),
                                                        token_dictionary=str(d / "t.pkl"), gene_median_dictionary=str(d / "m.pkl"),
                                                        obs_columns="cell_type", max_length=64))
    return str(d / "corpus")


def mean_pooled(folder, cells):
    """Mean of the last hidden layer over each cell's genes, by the model's plain HF forward, one cell at a time."""
    model = BertForMaskedLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return np.stack([model.bert(input_ids=torch.tensor([list(c)])).last_hidden_state[0].mean(0).numpy() for c in cells])


def test_eval_quick_cell_type_probe(tmp_path, typed_corpus, capsys):
    """Teacher and student side by side: accuracy of a logistic regression on mean-pooled
    embeddings of held-out cells, equal to one fitted here on embeddings from the plain forward;
    cell types are far above chance for a model that sees which genes a cell expresses."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from sitra.data.cells import split_cells

    teacher = save_teacher(tmp_path / "t", seed=0)
    student = save_teacher(tmp_path / "s", hidden=16, layers=1, seed=1)
    args = eval_quick.EvalQuickArgs(teacher=teacher, student=student, data=typed_corpus, validation_fraction=0.5,
                                    max_eval_cells=0, probe_column="cell_type", device="cpu", storage_directory=str(tmp_path))
    table = eval_quick.run(args)
    out = capsys.readouterr().out
    assert "| probe_accuracy" in out and "predicts cell_type of 45 validation cells, fitted on 105 others (3 values;" in out
    ds = load_corpus(typed_corpus)
    _, val = split_cells(ds, 0.5, 0, 0, 64)
    labels = np.array(ds["cell_type"])[val.indices]
    cells = [val[i] for i in range(len(val))]
    train, test = train_test_split(np.arange(len(val)), test_size=45, random_state=0, stratify=labels)
    for name, folder in (("Teacher", teacher), ("Student", student)):
        x = mean_pooled(folder, cells)
        padded = eval_quick.mean_pooled(BertForMaskedLM.from_pretrained(folder).eval(), val, np.arange(len(val)), 0, 7, "cpu")
        assert np.allclose(padded, x, atol=1e-5)  # batches of 7 padded cells pool only each cell's genes
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x[train], labels[train])
        assert table[name]["probe_accuracy"] == pytest.approx(probe.score(x[test], labels[test]), abs=1e-9)
        assert table[name]["probe_accuracy"] > 0.8
    majority = max(np.mean(labels[test] == t) for t in set(labels))
    assert read_log(tmp_path / "eval_results" / "eval_quick.h5")["final"]["probe_majority"] == pytest.approx(majority)
    assert majority < 0.5
    with pytest.raises(UsageError, match=r"^--probe_column donor: not a column of cell annotations in the corpus \(it has: input_ids, length, cell_index, cell_type;"):
        eval_quick.run(eval_quick.EvalQuickArgs(teacher=teacher, student=student, data=typed_corpus, probe_column="donor",
                                                device="cpu", storage_directory=str(tmp_path)))

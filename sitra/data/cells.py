"""Single-cell corpora for Geneformer: rank-value encoding of `.h5ad` files into the pretokenized
corpus Geneformer users have (a `datasets` folder with `input_ids` and `length`), read back
memory-mapped, and batched with little padding (length grouping) or in a few fixed shapes (buckets).

Rank-value encoding (Theodoris et al. 2023, Geneformer's `TranscriptomeTokenizer`): a cell's counts
are divided by its total count (x 10,000) and each gene's by its non-zero median over the pretraining
corpus; genes are ranked by that value, highest first; genes not expressed in the cell or missing from
the dictionaries are dropped, and the list is cut to the model's input size. Ties keep the gene order
of the file (a stable sort), so a file always gives the same corpus.
"""
import contextlib
import json
import pickle
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp

from sitra import runtime
from sitra.data.mlm import Batches, MLMCollator, pad
from sitra.errors import UsageError

GENEFORMER_PAD_ID, GENEFORMER_MASK_ID = 0, 1  # Geneformer V1: <pad> = 0, <mask> = 1
TARGET_SUM = 10_000
ENSEMBL_ID = re.compile(r"ENS[A-Z]*G\d{6,}(\.\d+)?")
# what --values says the matrix holds: raw_counts are checked to be integers, counts are ranked as
# they are (e.g. normalised counts), log1p (scanpy's normalize_total + log1p) is undone with expm1
VALUES = ("raw_counts", "counts", "log1p")
RAW_SPELLINGS = ("raw", "raw/X", "raw.X")  # raw.X: how anndata < 0.7 stored it
CORPUS_COLUMNS = ("input_ids", "length", "cell_index")


# ---------------------------------------------------------------------------------------------
# dictionaries


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain data only: builtins, and numpy scalars with their dtypes. Anything else (a
    class, a function: what lets a pickle run code) is refused, so a dictionary handed to a user
    cannot execute anything when it is read."""
    ALLOWED = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype"),
               ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: only plain data is read")


def read_plain_pickle(path):
    with open(path, "rb") as f:
        return _PlainUnpickler(f).load()


def _read_dictionary(flag: str, path: str) -> dict:
    try:
        d = read_plain_pickle(path)
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such file") from None
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as e:
        raise UsageError(f"{flag} {path}: not a readable pickle ({type(e).__name__})") from None
    if not isinstance(d, dict) or not d:
        raise UsageError(f"{flag} {path}: holds a {type(d).__name__}, not a non-empty dict")
    return d


def load_gene_dictionaries(token_path: str, median_path: str) -> tuple[dict, dict]:
    """(gene id -> token id, gene id -> non-zero median) from Geneformer's pickled dictionaries."""
    out = []
    for flag, path in (("--token_dictionary", token_path), ("--gene_median_dictionary", median_path)):
        if not path:
            raise UsageError(f"{flag} is required: a pickled dictionary (Geneformer's {flag[2:]}.pkl)")
        d = _read_dictionary(flag, path)
        odd = next((k for k, v in d.items() if not isinstance(k, str) or isinstance(v, bool)
                    or not isinstance(v, (int, float, np.number))), None)
        if odd is not None:
            raise UsageError(f"{flag} {path}: entry {odd!r} -> {d[odd]!r}; expected gene id (str) -> number")
        out.append(d)
    tokens, medians = out
    bad = next((g for g, m in medians.items() if not (isinstance(m, (int, float, np.number)) and m > 0)), None)
    if bad is not None:
        raise UsageError(f"--gene_median_dictionary {median_path}: median of {bad} is {medians[bad]!r}; medians must be positive numbers")
    return tokens, medians


def load_gene_name_dictionary(path: str) -> dict:
    """Gene symbol -> Ensembl id (Geneformer's gene_name_id_dict.pkl)."""
    d = _read_dictionary("--gene_name_dictionary", path)
    odd = next((k for k, v in d.items() if not isinstance(k, str) or not isinstance(v, str)), None)
    if odd is not None:
        raise UsageError(f"--gene_name_dictionary {path}: entry {odd!r} -> {d[odd]!r}; expected gene symbol (str) -> Ensembl id (str)")
    return d


def _ensembl_share(ids) -> float:
    ids = list(ids)
    return sum(bool(ENSEMBL_ID.fullmatch(str(g))) for g in ids) / max(len(ids), 1)


def _examples(names, n=3) -> str:
    names = list(names)
    return ", ".join(map(str, names[:n])) + (", ..." if len(names) > n else "")


# ---------------------------------------------------------------------------------------------
# .h5ad files


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _decoded(values: np.ndarray) -> np.ndarray:
    return np.char.decode(values, "utf-8") if values.dtype.kind == "S" else values


@contextlib.contextmanager
def _quietly():
    """anndata warns about every element of an old-layout file; the summary says the layout once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", ".*(encoding metadata|old version of AnnData)")
        yield


def read_dataframe(element, uns):
    """An obs or var dataframe (pandas) through anndata. anndata < 0.7 stored it as one compound
    dataset (read here: the first field is the index, a categorical column holds codes into
    uns/<column>_categories), which anndata's element reader does not turn into a dataframe."""
    import anndata
    import pandas as pd

    if isinstance(element, h5py.Group):
        return anndata.io.read_elem(element)
    table = element[()]
    frame = pd.DataFrame({name: _decoded(table[name]) for name in table.dtype.names})
    for column in frame.columns[1:]:
        categories = uns.get(f"{column}_categories") if uns is not None else None
        if isinstance(categories, h5py.Dataset):
            frame[column] = pd.Categorical.from_codes(frame[column], [_text(c) for c in categories[()]])
    return frame.set_index(frame.columns[0])


def matrices(f: h5py.File) -> dict:
    """The cells x genes matrices of an .h5ad file: X, raw (raw/X, or raw.X in the old layout) and layers/NAME."""
    found = {"X": f["X"]} if "X" in f else {}
    for key in ("raw/X", "raw.X"):
        if key in f:
            found["raw"] = f[key]
    found.update({f"layers/{name}": element for name, element in f.get("layers", {}).items()})
    return found


class H5ad:
    """An AnnData `.h5ad` file read through anndata: one matrix in row chunks, its gene ids, obs columns.

    `matrix` is X, raw (also spelt raw/X or raw.X) or layers/NAME; the file stays on disk (backed)
    and each chunk of rows is read when asked for, so the file may be larger than memory. A dense
    matrix is an HDF5 dataset read by rows; a sparse one is anndata's backed CSR dataset. CSC is read
    whole and turned into CSR (row chunks of CSC would read the whole file each time). Both layouts
    anndata has written work: the current one and the one before anndata 0.7 (obs/var as compound
    datasets, raw.X, sparse groups marked h5sparse_format). Gene ids are the var column
    `gene_id_column` (raw/var for raw); by default `ensembl_id` if var has it, else another var column
    of Ensembl ids when the index holds none, else the var index.
    """

    def __init__(self, path: str, matrix: str = "X", gene_id_column: str | None = None):
        if not Path(path).is_file():
            raise UsageError(f"--h5ad {path}: no such file")
        try:
            self.file = h5py.File(path, "r")
        except OSError:
            raise UsageError(f"--h5ad {path}: not an HDF5 (.h5ad) file") from None
        self.path = path
        try:
            with _quietly():
                self._open(matrix, gene_id_column)
        except BaseException:
            self.file.close()
            raise

    def _open(self, matrix, gene_id_column):
        f = self.file
        self.matrices = matrices(f)
        self.matrix = "raw" if matrix in RAW_SPELLINGS else matrix
        if self.matrix not in self.matrices:
            raise UsageError(f"--matrix {matrix}: not in {self.path} (it has: {', '.join(self.matrices) or 'no matrix'})")
        self.old_layout = "encoding-type" not in f.attrs
        var_key = next((k for k in ("raw/var", "raw.var") if k in f), "var") if self.matrix == "raw" else "var"
        if var_key not in f:
            raise UsageError(f"--h5ad {self.path}: no {var_key}, so no gene ids")
        self.gene_ids, self.gene_id_column = self._gene_ids(var_key, gene_id_column)
        self.gene_source = f"{var_key}/{self.gene_id_column}"
        self._read, self.shape = self._reader(self.matrix)
        if self.shape[1] != len(self.gene_ids):
            raise UsageError(f"--matrix {matrix}: {self.shape[1]} genes, but {var_key} lists {len(self.gene_ids)}")
        self.n_cells = self.shape[0]

    def _frame(self, key):
        try:
            return read_dataframe(self.file[key], self.file.get("uns"))
        except Exception as e:  # anndata's errors for an element it cannot read have no common type
            raise UsageError(f"--h5ad {self.path}: anndata cannot read {key} ({str(e).splitlines()[0]})") from None

    def _gene_ids(self, var_key, column):
        import pandas as pd

        var = self._frame(var_key)
        if column is None and "ensembl_id" in var.columns:
            column = "ensembl_id"
        elif column is None and _ensembl_share(var.index) < 0.5:  # symbols as the index: a column of Ensembl ids?
            column = next((c for c in var.columns if not pd.api.types.is_numeric_dtype(var[c])
                           and _ensembl_share(var[c].astype(str)) >= 0.5), None)
        if column is None or column == var.index.name or (column in ("_index", "index") and column not in var.columns):
            return np.asarray(var.index.astype(str)), var.index.name or "_index"
        if column not in var.columns:
            raise UsageError(f"--gene_id_column {column}: {var_key} of {self.path} has no such column "
                             f"(it has: {', '.join(map(str, var.columns)) or 'only the index'} and the index {var.index.name})")
        return np.asarray(var[column].astype(str)), column

    def _reader(self, name):
        """(rows(start, stop) -> scipy matrix, shape) of one matrix."""
        import anndata

        element = self.matrices[name]
        if isinstance(element, h5py.Dataset):
            if element.ndim != 2:
                raise UsageError(f"--matrix {name}: a {element.ndim}-D array, not a cells x genes matrix")
            return (lambda a, b: sp.csr_matrix(element[a:b])), tuple(element.shape)
        try:
            backed = anndata.io.sparse_dataset(element)
        except (ValueError, KeyError, TypeError):
            raise UsageError(f"--matrix {name}: neither a dense nor a sparse (CSR or CSC) matrix") from None
        if backed.format == "csc":
            print(f"{name} is stored by column (CSC): reading it whole to turn it into rows")
            whole = backed.to_memory().tocsr()
            return (lambda a, b: whole[a:b]), whole.shape
        return (lambda a, b: backed[a:b]), tuple(backed.shape)

    def rows(self, start: int, stop: int):
        """Cells start..stop-1 as a float64 scipy CSR matrix with sorted indices."""

        m = sp.csr_matrix(self._read(start, stop), dtype=np.float64)
        m.sort_indices()
        return m

    def counts_matrices(self, cells: int = 200) -> list[str]:
        """The file's other matrices whose first `cells` rows hold non-negative integers (CSC ones
        are not looked at: reading them is reading them whole)."""
        found = []
        for name, element in self.matrices.items():
            if name == self.matrix or (isinstance(element, h5py.Group) and "csc" in _text(
                    element.attrs.get("encoding-type", element.attrs.get("h5sparse_format", "")))):
                continue
            try:
                with _quietly():
                    read, shape = self._reader(name)
                    data = np.asarray(read(0, min(cells, shape[0])).data)
            except UsageError:
                continue
            if data.size and (data >= 0).all() and (data == np.round(data)).all():
                found.append(name)
        return found

    def obs_values(self, names: list[str]) -> dict:
        """obs columns by name, one value per cell: numbers stay numbers, anything else becomes a
        string (missing values: None)."""
        import pandas as pd

        with _quietly():
            obs = self._frame("obs")
        out = {}
        for name in names:
            if name not in obs.columns:
                raise UsageError(f"--obs_columns {name}: obs of {self.path} has no such column "
                                 f"(it has: {', '.join(map(str, obs.columns)) or 'none'})")
            values = obs[name].to_numpy()
            if values.dtype.kind not in "biuf":  # strings, categories, numbers with missing values
                values = np.array([None if pd.isna(v) else str(v) for v in values], dtype=object)
            out[name] = values
        return out

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_values(m, values: str, h5ad: H5ad, first_cell: int = 0):
    """Refuses a chunk of the matrix whose values are not what --values says: negative values
    (scaled data) always, non-integer ones for raw_counts. One line, naming the file's matrices that
    hold counts."""
    data = m.data
    if not np.isfinite(data).all():
        raise UsageError(f"--matrix {h5ad.matrix}: holds NaN or infinite values; rank-value encoding needs counts")
    negative = np.flatnonzero(data < 0)
    fractional = np.flatnonzero(data != np.round(data)) if values == "raw_counts" else []
    if len(negative):
        bad, problem, also = negative[0], "negative values", ": scaled data, not counts;"
    elif len(fractional):
        bad, problem = fractional[0], "non-integer values"
        also = (", not raw counts; add --values log1p if they are log(1 + x) of counts (scanpy's log1p), "
                "--values counts to rank them as they are (e.g. normalised counts), or")
    else:
        return
    cell = first_cell + int(np.searchsorted(m.indptr, bad, side="right") - 1)
    counts = h5ad.counts_matrices()
    hint = (f"give --matrix {' or '.join(counts)} (it holds counts)" if counts
            else f"give --matrix with raw counts (this file has: {', '.join(h5ad.matrices)}; none holds counts)")
    raise UsageError(f"--matrix {h5ad.matrix}: {problem} (e.g. {data[bad]:.4g} in cell {cell}){also} {hint}")


def dictionary_ids(ids, source: str, median_dict: dict, names: dict | None) -> tuple[np.ndarray, dict]:
    """The file's gene ids as ids of the dictionaries, and what was mapped. Gene symbols (ids that
    mostly do not look like Ensembl ids while the dictionaries' do) are mapped through `names`
    (symbol -> Ensembl id); ids that look like Ensembl ids are kept."""
    ids = np.asarray(ids, dtype=str)
    if _ensembl_share(ids) >= 0.5 or _ensembl_share(list(median_dict)[:1000]) < 0.5:
        return ids, {"gene_ids": "ids"}
    if names is None:
        raise UsageError(f"--gene_name_dictionary is needed: the gene ids in {source} look like symbols ({_examples(ids)}) "
                         "and the dictionaries hold Ensembl ids; give a pickle of symbol -> Ensembl id "
                         "(Geneformer's gene_name_id_dict.pkl), or --gene_id_column naming a var column of Ensembl ids")
    mapped = np.array([g if ENSEMBL_ID.fullmatch(g) else names.get(g, "") for g in ids], dtype=object)
    unmapped = ids[mapped == ""]
    return mapped.astype(str), {"gene_ids": "symbols", "genes_mapped": len(ids) - len(unmapped),
                                "genes_unmapped": len(unmapped), "unmapped_examples": unmapped[:5].tolist()}


def gene_map(gene_ids, token_dict: dict, median_dict: dict, flag: str = "--gene_id_column", names=None):
    """(matrix M [genes in file, known genes] of 0/1, tokens [known], medians [known], genes known,
    examples of genes not known).

    X @ M keeps the genes both dictionaries know and sums columns that name the same gene
    (duplicate ids); Ensembl version suffixes (ENSG00000141510.17) are ignored when the plain id
    is known. Known genes are ordered by first appearance in the file. `names`: the names shown for
    unknown genes (default the ids).
    """

    column_of, rows, cols, unknown = {}, [], [], []
    for j, g in enumerate(gene_ids):
        key = g if g in median_dict else g.split(".")[0] if g.startswith("ENS") else g
        if key in median_dict and key in token_dict:
            rows.append(j)
            cols.append(column_of.setdefault(key, len(column_of)))
        elif g:
            unknown.append(names[j] if names is not None else g)
    if not column_of:
        known = ", ".join(str(k) for k in list(median_dict)[:2])
        raise UsageError(f"{flag}: none of the {len(gene_ids)} gene ids in the file ({_examples(gene_ids)}) is in the "
                         f"dictionaries (which hold ids like {known}); name the var column with such ids")
    genes = list(column_of)
    M = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(gene_ids), len(genes)))
    tokens = np.array([int(token_dict[g]) for g in genes], dtype=np.int64)
    medians = np.array([float(median_dict[g]) for g in genes], dtype=np.float64)
    return M, tokens, medians, len(rows), unknown[:5]


def rank_value_encode(counts, M, tokens, medians, max_length: int, target_sum: float = TARGET_SUM) -> list[np.ndarray]:
    """Token ids per cell, highest normalised expression first (see the module docstring).

    counts: CSR [cells, genes in file] of counts; M, tokens, medians from `gene_map`.
    """
    totals = np.asarray(counts.sum(axis=1)).ravel()
    known = (counts @ M).tocsr()
    known.sort_indices()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    out = []
    for r in range(known.shape[0]):
        lo, hi = known.indptr[r], known.indptr[r + 1]
        genes = known.indices[lo:hi]
        values = known.data[lo:hi] * scale[r] / medians[genes]
        keep = values > 0
        genes, values = genes[keep], values[keep]
        order = np.argsort(-values, kind="stable")[:max_length]
        out.append(tokens[genes[order]])
    return out


def tokenize_h5ad(h5ad: H5ad, token_dict: dict, median_dict: dict, output: Path, max_length: int,
                  chunk_size: int = 1000, target_sum: float = TARGET_SUM, values: str = "raw_counts",
                  names: dict | None = None, obs: dict | None = None) -> dict:
    """Write the rank-value encoded cells of `h5ad` as a new `datasets` folder at `output`: columns
    input_ids, length, cell_index (the row in the file) and one per entry of `obs` (name -> a value
    per cell of the file, from H5ad.obs_values). `names`: symbol -> Ensembl id, for a file whose
    gene ids are symbols. Every chunk's values are checked against `values` (log1p ones are turned
    back into counts with expm1). Cells with a zero total or with no expressed known gene are left
    out and counted. Returns counts for the report."""
    import pyarrow as pa
    from datasets import Dataset

    ids, genes = dictionary_ids(h5ad.gene_ids, h5ad.gene_source, median_dict, names)
    M, tokens, medians, genes["genes_known"], genes["unknown_examples"] = gene_map(
        ids, token_dict, median_dict, f"--gene_id_column {h5ad.gene_id_column}", h5ad.gene_ids)
    obs = obs or {}
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("length", pa.int32()), ("cell_index", pa.int64())]
                       + [(n, pa.string() if v.dtype == object else pa.from_numpy_dtype(v.dtype)) for n, v in obs.items()])
    kept = zero_total = 0
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as tmp:
        stream = Path(tmp) / "cells.arrow"
        with pa.OSFile(str(stream), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            bar = runtime.progress_bar(total=h5ad.n_cells, desc="tokenizing cells", unit="cell")
            for start in range(0, h5ad.n_cells, chunk_size):
                stop = min(start + chunk_size, h5ad.n_cells)
                counts = h5ad.rows(start, stop)
                check_values(counts, values, h5ad, start)
                if values == "log1p":
                    counts.data = np.expm1(counts.data)
                zero_total += int((np.asarray(counts.sum(axis=1)).ravel() == 0).sum())
                cells = rank_value_encode(counts, M, tokens, medians, max_length, target_sum)
                index = [i for i, c in enumerate(cells) if len(c)]
                lengths = np.array([len(cells[i]) for i in index], dtype=np.int32)
                offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
                ids_ = np.concatenate([cells[i] for i in index]).astype(np.int32) if index else np.zeros(0, np.int32)
                rows = np.asarray(index, dtype=np.int64) + start
                writer.write_batch(pa.record_batch([
                    pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids_)), pa.array(lengths), pa.array(rows),
                    *(pa.array(v[rows], type=schema.field(n).type) for n, v in obs.items())], schema=schema))
                kept += len(index)
                bar.update(stop - start)
            bar.close()
        if not kept:
            raise UsageError(f"--h5ad: none of the {h5ad.n_cells} cells expresses a gene the dictionaries know; nothing to write")
        Dataset.from_file(str(stream)).save_to_disk(str(output))
    return {"cells": h5ad.n_cells, "cells_written": kept, "cells_zero_total": zero_total,
            "cells_without_known_genes": h5ad.n_cells - kept - zero_total,
            "genes_in_file": len(h5ad.gene_ids), **genes}


def values_line(corpus: str) -> str | None:
    """What the corpus's cells were ranked on, for a model card: None for raw counts (Geneformer's
    own input) or a corpus tokenize_cells did not write."""

    meta = Path(corpus) / "tokenize_cells.json"
    if not meta.is_file():
        return None
    made = json.loads(meta.read_text())
    values, matrix, h5ad = made.get("values"), made.get("matrix"), made.get("args", {}).get("h5ad")
    if values == "log1p":
        return f"cell values: {matrix} of {h5ad} held log(1 + x) of normalised counts, turned back with expm1 before ranking"
    if values == "counts":
        return f"cell values: {matrix} of {h5ad} held non-integer counts (e.g. normalised), ranked as they were"
    return None


# ---------------------------------------------------------------------------------------------
# the corpus: memory-mapped cells, split, batches


def load_corpus(path: str, flag: str = "--data"):
    """The pretokenized corpus (`save_to_disk` folder with an `input_ids` column), memory-mapped."""
    from datasets import Dataset, load_from_disk

    if not path or not Path(path).is_dir():
        raise UsageError(f"{flag} {path}: no such folder (a corpus saved with datasets' save_to_disk)")
    try:
        ds = load_from_disk(str(path))
    except IndexError:  # datasets cannot load a dataset saved with no rows
        raise UsageError(f"{flag} {path}: the corpus holds no cells") from None
    except (FileNotFoundError, OSError, ValueError) as e:
        raise UsageError(f"{flag} {path}: not a datasets folder ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(ds, Dataset):
        raise UsageError(f"{flag} {path}: holds splits {', '.join(ds)}; give the folder of one split")
    if "input_ids" not in ds.column_names:
        raise UsageError(f"{flag} {path}: no input_ids column (it has: {', '.join(ds.column_names)})")
    if getattr(ds, "_indices", None) is not None:
        ds = ds.flatten_indices()
    return ds


class CellExamples:
    """Token ids of selected cells (`indices` into the corpus), read from the memory-mapped Arrow
    table when asked for and cut to `max_length`; `lengths` (numpy) are known without reading them."""

    def __init__(self, dataset, indices, max_length: int):
        import pyarrow.compute as pc

        self.column = dataset.data.column("input_ids")
        self.indices = np.asarray(indices, dtype=np.int64)
        all_lengths = pc.list_value_length(self.column).to_numpy(zero_copy_only=False)
        self.lengths = np.minimum(all_lengths[self.indices], max_length)
        self.max_length = max_length

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i) -> np.ndarray:
        return self.column[int(self.indices[i])].values.to_numpy(zero_copy_only=False)[: self.max_length].astype(np.int64)


def split_cells(dataset, validation_fraction: float, split_seed: int, max_eval_cells: int, max_length: int,
                flag: str = "--data"):
    """(train, validation) CellExamples: a fixed permutation from `split_seed` puts the first
    `validation_fraction` of the non-empty cells in validation (the first `max_eval_cells` of those
    are evaluated; 0: all), sorted by length so evaluation batches carry little padding."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(dataset.data.column("input_ids")).to_numpy(zero_copy_only=False)
    cells = np.flatnonzero(np.nan_to_num(lengths, nan=0) > 0)
    if len(cells) < 2:
        raise UsageError(f"{flag}: the corpus holds {len(cells)} non-empty cells; training and validation need at least 2")
    order = cells[np.random.default_rng(split_seed).permutation(len(cells))]
    n_val = min(max(1, round(validation_fraction * len(cells))), len(cells) - 1)
    val, train = order[:n_val], np.sort(order[n_val:])
    if max_eval_cells:
        val = val[:max_eval_cells]
    val = val[np.argsort(lengths[val], kind="stable")]
    return CellExamples(dataset, train, max_length), CellExamples(dataset, val, max_length)


# ---------------------------------------------------------------------------------------------
# fixed shapes for torch.compile


def bucket_sizes(max_length: int, buckets: list[int] | None = None, n: int = 8) -> list[int]:
    """Sorted padded lengths: the given ones plus `max_length`, or n evenly spaced multiples of 8."""
    if buckets:
        return sorted(set(buckets) | {max_length})
    step = -(-max_length // n)
    step = -(-step // 8) * 8
    return sorted({min(step * k, max_length) for k in range(1, n + 1)} | {max_length})


class BucketedMLMCollator(MLMCollator):
    """MLMCollator that pads each batch to the next of a few fixed lengths (`buckets`, the largest at
    least the longest cell), so a compiled model sees a bounded number of shapes. Masks are the same
    as unbucketed: they are drawn per example, not per padded batch."""

    def __init__(self, *args, buckets: list[int], **kwargs):
        super().__init__(*args, **kwargs)
        self.buckets = sorted(buckets)

    def bucket(self, longest: int) -> int:
        return next((b for b in self.buckets if b >= longest), self.buckets[-1])

    def pad(self, examples):
        return pad(examples, self.pad_id, pad_to_multiple_of=self.bucket(max(len(x) for x in examples)))


@dataclass(kw_only=True)
class CellDataArgs:
    """The pretokenized cell corpus, its fixed train/validation split and the masking."""
    data: str | None = field(default=None, metadata={
        "help": "corpus folder (datasets save_to_disk) with an input_ids column, e.g. from tokenize_cells"})
    validation_fraction: float = field(default=0.05, metadata={"help": "share of the cells held out for validation"})
    split_seed: int = field(default=0, metadata={"help": "seed of the train/validation split (fixed apart from --seed)"})
    max_eval_cells: int = field(default=1000, metadata={"help": "validation cells evaluated (0: all held-out cells)"})
    mlm_probability: float = field(default=0.15, metadata={"help": "share of the genes of a cell chosen for masking"})
    mask_token_id: int = field(default=GENEFORMER_MASK_ID, metadata={"help": "id of <mask> (Geneformer V1: 1)"})
    special_token_ids: list[int] = field(default_factory=list, metadata={
        "help": "ids never masked nor inserted (default: the pad and mask ids; V2 adds <cls> and <eos>)"})


def check_cell_data(args: CellDataArgs, config) -> dict:
    """The corpus and masking settings for a teacher config, checked before any compute:
    {dataset, pad_id, mask_id, special_ids, vocab_size, max_length}."""
    if not args.data:
        raise UsageError("--data is required: a pretokenized corpus folder (see tokenize_cells)")
    if not 0 < args.validation_fraction < 1:
        raise UsageError(f"--validation_fraction {args.validation_fraction}: must be in (0, 1)")
    if not 0 < args.mlm_probability < 1:
        raise UsageError(f"--mlm_probability {args.mlm_probability}: must be in (0, 1)")
    if args.max_eval_cells < 0:
        raise UsageError(f"--max_eval_cells {args.max_eval_cells}: must be 0 (all) or more")
    vocab = config.vocab_size
    pad_id = GENEFORMER_PAD_ID if config.pad_token_id is None else config.pad_token_id
    special = sorted(set(args.special_token_ids or [pad_id, args.mask_token_id]) | {pad_id, args.mask_token_id})
    bad = [i for i in special if not 0 <= i < vocab]
    if bad:
        flag = "--mask_token_id" if args.mask_token_id in bad else "--special_token_ids"
        raise UsageError(f"{flag}: id {bad[0]} is outside the teacher's vocabulary 0-{vocab - 1}")
    dataset = load_corpus(args.data)
    return {"dataset": dataset, "pad_id": pad_id, "mask_id": args.mask_token_id, "special_ids": special,
            "vocab_size": vocab, "max_length": config.max_position_embeddings}


def masking(cells: dict, args: CellDataArgs) -> tuple:
    """MLMCollator's arguments: (pad id, mask id, special ids, vocabulary, masking share)."""
    return cells["pad_id"], cells["mask_id"], cells["special_ids"], cells["vocab_size"], args.mlm_probability


def eval_cell_batches(cells: dict, args: CellDataArgs, batch_size: int, seed: int):
    """(train cells, validation cells, validation batches with fixed masks)."""
    train_cells, eval_cells = split_cells(cells["dataset"], args.validation_fraction, args.split_seed,
                                          args.max_eval_cells, cells["max_length"])
    return train_cells, eval_cells, Batches(eval_cells, batch_size, MLMCollator(*masking(cells, args)), seed=seed, shuffle=False)

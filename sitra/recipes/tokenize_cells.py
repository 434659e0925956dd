"""Build a Geneformer corpus from an AnnData `.h5ad` file: rank-value encode each cell's counts
(Geneformer's tokenizer) and save the cells as a `datasets` folder with input_ids and length."""
import json
from dataclasses import dataclass, field
from typing import Literal

from sitra.data.cells import (
    CORPUS_COLUMNS, TARGET_SUM, VALUES, H5ad, check_values, load_gene_dictionaries, load_gene_name_dictionary, tokenize_h5ad,
)
from sitra.errors import UsageError
from sitra.outputs import check_output, write_folder

JOB = "tokenize_cells"


@dataclass(kw_only=True)
class TokenizeCellsArgs:
    h5ad: str | None = field(default=None, metadata={"help": "AnnData .h5ad file (cells x genes), read in chunks through anndata"})
    output: str | None = field(default=None, metadata={"help": "corpus folder to write (datasets save_to_disk)"})
    token_dictionary: str | None = field(default=None, metadata={"help": "pickle of gene id -> token id (token_dictionary_gc30M.pkl)"})
    gene_median_dictionary: str | None = field(default=None, metadata={
        "help": "pickle of gene id -> non-zero median expression (gene_median_dictionary_gc30M.pkl)"})
    gene_name_dictionary: str | None = field(default=None, metadata={
        "help": "pickle of gene symbol -> Ensembl id (gene_name_id_dict.pkl), needed when the gene ids are symbols"})
    max_length: int = field(default=2048, metadata={"help": "genes kept per cell, the highest ranked (the model's input size)"})
    gene_id_column: str | None = field(default=None, metadata={
        "help": "var column with the gene ids (default: ensembl_id if present, else a column of Ensembl ids when "
                "the index has none, else the var index)"})
    matrix: str = field(default="X", metadata={"help": "matrix of counts in the file: X, raw (raw.X) or layers/NAME"})
    values: Literal[VALUES] = field(default="raw_counts", metadata={
        "help": "what the matrix holds: raw_counts (non-negative integers, checked), counts (non-negative, ranked as "
                "they are, e.g. normalised) or log1p (log(1 + x) of counts, as after scanpy's log1p: undone with expm1)"})
    obs_columns: str | None = field(default=None, metadata={
        "help": "obs columns to carry into the corpus as columns, comma-separated, e.g. cell_type,donor"})
    target_sum: float = field(default=TARGET_SUM, metadata={"help": "counts are scaled to this total per cell"})
    chunk_size: int = field(default=1000, metadata={"help": "cells read and encoded at a time"})
    overwrite: bool = field(default=False, metadata={"help": "replace the --output folder an earlier tokenize_cells wrote"})


def obs_column_names(args: TokenizeCellsArgs) -> list[str]:
    names = [n.strip() for n in (args.obs_columns or "").split(",") if n.strip()]
    clash = next((n for n in names if n in CORPUS_COLUMNS), None)
    if clash or len(set(names)) != len(names):
        raise UsageError(f"--obs_columns {args.obs_columns}: distinct obs column names other than {', '.join(CORPUS_COLUMNS)}")
    return names


def check(args: TokenizeCellsArgs):
    if not args.h5ad:
        raise UsageError("--h5ad is required: an AnnData .h5ad file")
    if not args.output:
        raise UsageError("--output is required: the corpus folder to write")
    if args.max_length < 1:
        raise UsageError(f"--max_length {args.max_length}: must be at least 1")
    if args.chunk_size < 1:
        raise UsageError(f"--chunk_size {args.chunk_size}: must be at least 1")
    if not args.target_sum > 0:
        raise UsageError(f"--target_sum {args.target_sum}: must be positive")
    if args.values not in VALUES:
        raise UsageError(f"--values {args.values}: one of {', '.join(VALUES)}")
    obs_column_names(args)
    check_output(args.output, JOB, args.overwrite)
    names = load_gene_name_dictionary(args.gene_name_dictionary) if args.gene_name_dictionary else None
    return (*load_gene_dictionaries(args.token_dictionary, args.gene_median_dictionary), names)


def summary(stats: dict, args: TokenizeCellsArgs) -> str:
    """Two lines: cells written and dropped (by reason), genes mapped, known and not."""
    dropped = [f"{stats[k]:,} {why}" for k, why in (("cells_zero_total", "with a zero total"),
                                                     ("cells_without_known_genes", "without an expressed known gene"))
               if stats[k]]
    values = {"raw_counts": "raw counts", "counts": "counts as they are", "log1p": "log1p undone with expm1"}[stats["values"]]
    cells = (f"{stats['cells_written']:,} of {stats['cells']:,} cells written to {args.output} from {stats['matrix']} "
             f"({values}{', anndata < 0.7 layout' if stats['old_layout'] else ''}); "
             + (f"left out: {', '.join(dropped)}" if dropped else "none left out"))
    genes = f"genes: {stats['genes_in_file']:,} in {stats['gene_source']}"
    if stats["gene_ids"] == "symbols":
        genes += (f" (symbols), {stats['genes_mapped']:,} mapped to Ensembl ids by --gene_name_dictionary, "
                  f"{stats['genes_unmapped']:,} unmapped" + (f" (e.g. {', '.join(stats['unmapped_examples'][:3])})"
                                                             if stats["genes_unmapped"] else ""))
    unknown = stats["genes_in_file"] - stats["genes_known"] - stats.get("genes_unmapped", 0)
    genes += f"; {stats['genes_known']:,} known to the dictionaries" + (
        f", {unknown:,} not (e.g. {', '.join(stats['unknown_examples'][:3])})" if unknown else "")
    return cells + "\n" + genes


def run(args: TokenizeCellsArgs) -> dict:
    token_dict, median_dict, names = check(args)
    obs_columns = obs_column_names(args)
    with H5ad(args.h5ad, args.matrix, args.gene_id_column) as h5ad:
        if h5ad.n_cells == 0:
            raise UsageError(f"--h5ad {args.h5ad}: the matrix holds no cells")
        check_values(h5ad.rows(0, min(h5ad.n_cells, args.chunk_size)), args.values, h5ad)  # before any folder is made
        obs = h5ad.obs_values(obs_columns) if obs_columns else {}
        stats = {"matrix": h5ad.matrix, "values": args.values, "gene_source": h5ad.gene_source,
                 "old_layout": h5ad.old_layout, "obs_columns": obs_columns}

        def fill(folder):
            stats.update(tokenize_h5ad(h5ad, token_dict, median_dict, folder, args.max_length, args.chunk_size,
                                       args.target_sum, args.values, names, obs))
            (folder / "tokenize_cells.json").write_text(json.dumps({"args": vars(args), **stats}, indent=1))

        write_folder(args.output, JOB, fill)
    print(summary(stats, args))
    return stats


ARGS = TokenizeCellsArgs

"""Build a Geneformer corpus from an AnnData `.h5ad` file: rank-value encode each cell's raw counts
(Geneformer's tokenizer) and save the cells as a `datasets` folder with input_ids and length."""
import json
from dataclasses import dataclass, field

import numpy as np

from sitra.data.cells import TARGET_SUM, H5ad, load_gene_dictionaries, tokenize_h5ad
from sitra.errors import UsageError
from sitra.outputs import check_output, write_folder

JOB = "tokenize_cells"


@dataclass(kw_only=True)
class TokenizeCellsArgs:
    h5ad: str | None = field(default=None, metadata={"help": "AnnData .h5ad file of raw counts (cells x genes)"})
    output: str | None = field(default=None, metadata={"help": "corpus folder to write (datasets save_to_disk)"})
    token_dictionary: str | None = field(default=None, metadata={"help": "pickle of gene id -> token id (token_dictionary_gc30M.pkl)"})
    gene_median_dictionary: str | None = field(default=None, metadata={
        "help": "pickle of gene id -> non-zero median expression (gene_median_dictionary_gc30M.pkl)"})
    max_length: int = field(default=2048, metadata={"help": "genes kept per cell, the highest ranked (the model's input size)"})
    gene_id_column: str | None = field(default=None, metadata={
        "help": "var column with the gene ids (default: ensembl_id if present, else the var index)"})
    matrix: str = field(default="X", metadata={"help": "matrix of raw counts in the file: X, layers/NAME or raw/X"})
    target_sum: float = field(default=TARGET_SUM, metadata={"help": "counts are scaled to this total per cell"})
    chunk_size: int = field(default=1000, metadata={"help": "cells read and encoded at a time"})
    overwrite: bool = field(default=False, metadata={"help": "replace the --output folder an earlier tokenize_cells wrote"})


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
    check_output(args.output, JOB, args.overwrite)
    return load_gene_dictionaries(args.token_dictionary, args.gene_median_dictionary)


def run(args: TokenizeCellsArgs) -> dict:
    token_dict, median_dict = check(args)
    with H5ad(args.h5ad, args.matrix, args.gene_id_column) as h5ad:
        if h5ad.n_cells == 0:
            raise UsageError(f"--h5ad {args.h5ad}: the matrix holds no cells")
        first = h5ad.rows(0, min(h5ad.n_cells, args.chunk_size)).data
        if first.size and not np.allclose(first, np.round(first)):
            print(f"warning: {args.matrix} holds non-integer values; rank-value encoding expects raw counts "
                  "(see --matrix for a layer of counts)")
        stats = {"gene_id_column": h5ad.gene_id_column}

        def fill(folder):
            stats.update(tokenize_h5ad(h5ad, token_dict, median_dict, folder, args.max_length, args.chunk_size, args.target_sum))
            (folder / "tokenize_cells.json").write_text(json.dumps({"args": vars(args), **stats}, indent=1))

        write_folder(args.output, JOB, fill)
    print(f"{stats['cells_written']:,} of {stats['cells']:,} cells written to {args.output} "
          f"({stats['genes_known']:,} of {stats['genes_in_file']:,} genes known, ids from var/{stats['gene_id_column']}"
          + (f"; {stats['cells_without_known_genes']:,} cells without an expressed known gene left out)"
             if stats["cells_without_known_genes"] else ")"))
    return stats


ARGS = TokenizeCellsArgs

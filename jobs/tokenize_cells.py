"""Rank-value encode an .h5ad file into a Geneformer corpus. Flags: TokenizeCellsArgs."""
from sitra.cli import main
from sitra.recipes.tokenize_cells import TokenizeCellsArgs, run

if __name__ == "__main__":
    main(TokenizeCellsArgs, run)

"""Retrain one attention block of a BERT teacher. Flags: sitra.recipes.retrain_single_block.BlockArgs."""
from sitra.cli import main
from sitra.recipes.retrain_single_block import BlockArgs, run

if __name__ == "__main__":
    main(BlockArgs, run)

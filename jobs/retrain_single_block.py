"""Retrain one attention block of a BERT teacher. Flags: sitra.recipes.retrain_single_block.BlockArgs."""
from sitra.cli import main
from sitra.recipes.retrain_single_block import FUSABLE, BlockArgs, run, run_fused

if __name__ == "__main__":
    main(BlockArgs, run, fused=(FUSABLE, run_fused))  # comma lists: one fused task

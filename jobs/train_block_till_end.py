"""Train one attention block against the model's output distribution. Flags: BlockToEndArgs."""
from sitra.cli import main
from sitra.recipes.train_block_till_end import FUSABLE, BlockToEndArgs, run, run_fused

if __name__ == "__main__":
    main(BlockToEndArgs, run, fused=(FUSABLE, run_fused))  # comma lists: one fused task

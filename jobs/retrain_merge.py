"""Replace layers i and i+1 of a BERT teacher by one trained layer. Flags: MergeArgs."""
from sitra.cli import main
from sitra.recipes.retrain_merge import FUSABLE, MergeArgs, run, run_fused

if __name__ == "__main__":
    main(MergeArgs, run, fused=(FUSABLE, run_fused))  # comma lists: one fused task

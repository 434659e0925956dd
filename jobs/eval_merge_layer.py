"""Evaluate one merged layer against the teacher pair it replaces. Flags: EvalMergeLayerArgs."""
from sitra.cli import main
from sitra.recipes.eval_merge_layer import EvalMergeLayerArgs, run

if __name__ == "__main__":
    main(EvalMergeLayerArgs, run)

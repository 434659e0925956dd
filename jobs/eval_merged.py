"""Evaluate model folders side by side on the same fixed masks. Flags: EvalMergedArgs."""
from sitra.cli import main
from sitra.recipes.eval_merged import EvalMergedArgs, run

if __name__ == "__main__":
    main(EvalMergedArgs, run)

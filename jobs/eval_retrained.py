"""Evaluate teacher, retrained model and an optional reference. Flags: sitra.recipes.eval_retrained.EvalArgs."""
from sitra.cli import main
from sitra.recipes.eval_retrained import EvalArgs, run

if __name__ == "__main__":
    main(EvalArgs, run)

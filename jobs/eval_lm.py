"""Evaluate causal LMs on held-out text: python jobs/eval_lm.py MODEL... Flags: EvalLMArgs."""
from sitra.cli import main
from sitra.recipes.eval_lm import EvalLMArgs, run

if __name__ == "__main__":
    main(EvalLMArgs, run, positional="models")

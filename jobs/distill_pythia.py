"""Distil a causal LM into a smaller one. Flags: DistillLMArgs."""
from sitra.cli import main
from sitra.recipes.distill_pythia import DistillLMArgs, run

if __name__ == "__main__":
    main(DistillLMArgs, run)

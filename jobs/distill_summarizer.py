"""Distil a causal LM summarizer into a smaller one. Flags: DistillSummarizerArgs."""
from sitra.cli import main
from sitra.recipes.distill_summarizer import DistillSummarizerArgs, run

if __name__ == "__main__":
    main(DistillSummarizerArgs, run)

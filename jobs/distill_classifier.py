"""Distil a sentence classifier into a smaller student. Flags: DistillClassifierArgs."""
from sitra.cli import main
from sitra.recipes.distill_classifier import DistillClassifierArgs, run

if __name__ == "__main__":
    main(DistillClassifierArgs, run)

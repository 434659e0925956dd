"""Distil a Geneformer teacher into a narrower student. Flags: DistillGeneformerArgs."""
from sitra.cli import main
from sitra.recipes.distill_geneformer import DistillGeneformerArgs, run

if __name__ == "__main__":
    main(DistillGeneformerArgs, run)

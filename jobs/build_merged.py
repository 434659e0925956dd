"""Assemble merged layers for pairs (0,1), (2,3), ... into a model with half the layers. Flags: BuildMergedArgs."""
from sitra.cli import main
from sitra.recipes.build_merged import BuildMergedArgs, run

if __name__ == "__main__":
    main(BuildMergedArgs, run)

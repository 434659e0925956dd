"""Assemble retrained attention blocks into a model folder. Flags: sitra.recipes.build_retrained.BuildArgs."""
from sitra.cli import main
from sitra.recipes.build_retrained import BuildArgs, run

if __name__ == "__main__":
    main(BuildArgs, run)

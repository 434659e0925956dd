"""Pack a ternary student into a 1.6-bit file: python jobs/export_ternary.py MODEL_DIR --output DIR. Flags: ExportTernaryArgs."""
from sitra.cli import main
from sitra.recipes.export_ternary import ExportTernaryArgs, run

if __name__ == "__main__":
    main(ExportTernaryArgs, run, positional="model_dir")

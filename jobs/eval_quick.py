"""Teacher versus student MLM metrics on fixed masked validation cells. Flags: EvalQuickArgs."""
from sitra.cli import main
from sitra.recipes.eval_quick import EvalQuickArgs, run

if __name__ == "__main__":
    main(EvalQuickArgs, run)

"""Fine-tune the fully merged model (build_merged) end to end against the teacher. Flags: FinetuneMergedArgs."""
from sitra.cli import main
from sitra.recipes.finetune_fully_merged import FinetuneMergedArgs, run

if __name__ == "__main__":
    main(FinetuneMergedArgs, run)

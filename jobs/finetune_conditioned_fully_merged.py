"""Conditioned fine-tuning of a merged model, layer by layer on its own outputs. Flags: ConditionedArgs."""
from sitra.cli import main
from sitra.recipes.finetune_conditioned_fully_merged import ConditionedArgs, run

if __name__ == "__main__":
    main(ConditionedArgs, run)

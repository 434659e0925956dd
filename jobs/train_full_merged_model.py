"""Fine-tune a model whose attention blocks were all retrained (build_retrained) end to end. Flags: FinetuneRetrainedArgs."""
from sitra.cli import main
from sitra.recipes.train_full_merged_model import FinetuneRetrainedArgs, run

if __name__ == "__main__":
    main(FinetuneRetrainedArgs, run)

"""Fine-tune a sentence classifier from a pretrained encoder. Flags: FinetuneClassifierArgs."""
from sitra.cli import main
from sitra.recipes.finetune_classifier import FinetuneClassifierArgs, run

if __name__ == "__main__":
    main(FinetuneClassifierArgs, run)

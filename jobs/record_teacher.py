"""Record a causal-LM teacher's top-k logits (or sampled tokens) once, for many students. Flags: RecordArgs."""
from sitra.cli import main
from sitra.recipes.record_teacher import RecordArgs, run

if __name__ == "__main__":
    main(RecordArgs, run)

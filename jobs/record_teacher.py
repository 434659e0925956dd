"""Record a distillation job's teacher once (top-k logits or sampled tokens), for many students. Flags: --job JOB, RecordFields and JOB's own."""
from sitra.recipes.record_teacher import main

if __name__ == "__main__":
    main()

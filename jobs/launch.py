"""Launch a sitra job locally or as one SLURM array: python jobs/launch.py JOB [job flags] [--sweep ...]."""
from sitra.launch import main

if __name__ == "__main__":
    main()

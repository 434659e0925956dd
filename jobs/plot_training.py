"""Loss / accuracy / perplexity curves of a run log: python jobs/plot_training.py LOG.h5. Flags: PlotTrainingArgs."""
from sitra.cli import main
from sitra.recipes.plot_training import PlotTrainingArgs, run

if __name__ == "__main__":
    main(PlotTrainingArgs, run, positional="log")

"""One module per job: its argument dataclass and its `run(args)`."""

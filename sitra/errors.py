"""The two ways a job ends early on purpose; a leaf module every other one may import."""


class UsageError(ValueError):
    """Bad input from the user: the message names the flag and what is allowed (exit code 2)."""


class StorageError(Exception):
    """A file could not be written (disk full, no permission): the message names it; what was
    saved before is intact."""


class Interrupted(Exception):
    """Training saved a checkpoint and stopped early; rerunning the job resumes it."""

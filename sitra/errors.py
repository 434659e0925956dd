"""The two ways a job ends early on purpose; a leaf module every other one may import."""


class UsageError(ValueError):
    """Bad input from the user: the message names the flag and what is allowed (exit code 2)."""


class Interrupted(Exception):
    """Training saved a checkpoint and stopped early; rerunning the job resumes it."""

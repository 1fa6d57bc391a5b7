"""Errors a user can fix. The CLI prints them as one line and exits with status 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: names the file, key path or tensor and what was expected."""


class CheckpointError(UserError):
    """A model folder that is missing, unsafe to load, corrupt, or does not match the base."""


class StudyIncomplete(Exception):
    """A study that stopped before its trials were done (no worker left, for one). The CLI prints the
    cause and the command that resumes it, and exits with status 3: never 0 for an incomplete study."""

    def __init__(self, cause: str, done: int, total: int, *, interrupted: bool = False, status: int | None = None):
        super().__init__(cause)
        self.cause, self.done, self.total, self.interrupted = cause, done, total, interrupted
        self.status = status  # the exit status when a signal stopped it (128 + the signal)

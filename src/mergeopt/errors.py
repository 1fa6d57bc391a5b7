"""Errors a user can fix. The CLI prints them as one line and exits with status 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: names the file, key path or tensor and what was expected."""


class CheckpointError(UserError):
    """A model folder that is missing, unsafe to load, corrupt, or does not match the base."""

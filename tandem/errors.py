"""What the library raises when the user can fix it; the entry points (jobs/, serving/__main__.py) turn these into
a one-line message and an exit code, and tests catch them like any exception."""

from __future__ import annotations


class TandemError(Exception):
    """A problem the user can fix, described in one line."""

    exit_code = 1


class ConfigError(TandemError, ValueError):
    """A config key that is unknown, missing or has a value the job cannot use."""

    exit_code = 2


class NotInstalledError(TandemError):
    """A packaged model or data set that is not installed, with the command that installs it."""


class UnknownVersionError(TandemError, LookupError):
    """A registry reference (NAME@ALIAS or NAME@VERSION) that names nothing registered, with what is there."""


class RejectedDataError(TandemError):
    """Input refused as a whole (too many bad rows); the per-row reasons are written next to it."""

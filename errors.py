"""The base of every error the scripts report as one ``error:`` line (see cli.run_cli)."""
from __future__ import annotations


class ScriptError(RuntimeError):
    """Bad input or a run that cannot go on; the message names the file, flag or value.

    The scripts' own error types derive from it; :func:`run_cli` prints it as one line."""


class DataError(ValueError):
    """The data directory cannot be used (missing, empty, unreadable...); ``data.DataError``."""

"""The base of every error caused by bad user input.

Each room defines its own named subclasses (``CheckpointError``, ``StatsError``, ``TopologyError``, ...)
whose messages name the file, key, language code or flag, with the expected and actual value. The CLI
prints a ``UserError``'s message and exits with status 2; anything else is a bug and shows a traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user; the message names the culprit."""

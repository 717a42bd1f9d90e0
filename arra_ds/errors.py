"""The one base class of errors a user can fix: a config value, a file, a data set, a checkpoint.

Launchers go through ``arra_ds.cli.run_launcher``, which prints a ``UserError`` as one line
``error: <message>`` and exits with code 2; any other exception is a bug in arra_ds (or in a
library it calls) and keeps its traceback. So a ``UserError`` message must say what is wrong and how
to fix it (which key, which file, what was expected), and code must not raise one for an internal
inconsistency.

Each module owns the subclasses of its domain (``VocabError`` in ``tokens/vocab.py``,
``CheckpointError`` in ``checkpoints.py``, ...). Most also subclass the built-in exception the
caller would otherwise expect (``ValueError``, ``FileNotFoundError``), so ``except ValueError``
keeps working where it is the natural thing to catch.
"""

from __future__ import annotations


class UserError(Exception):
    """An error in what the user gave (config, files, data, checkpoints); the message says how to fix it."""


class ConfigError(UserError, ValueError):
    """A config value that cannot be used; the message names the key and the valid choices."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist (or is not what it should be)."""


class MissingDependencyError(UserError, ImportError):
    """An optional dependency a chosen feature needs is not installed; the message names the pip command."""

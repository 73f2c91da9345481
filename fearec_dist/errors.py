"""The error types shared across rooms; a leaf module (imports nothing of the project).

``ConfigError``: a config problem, naming the dotted key and the source file.
``DataError``: bad or unreachable input, naming the file, and the row or column where known.
Both are ``ValueError``s; the CLI turns them into a non-zero exit with their message.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config problem; the message names the key (dotted path) and the source file."""


class DataError(ValueError):
    """Bad or unreachable input; the CLI turns it into a non-zero exit with this message."""

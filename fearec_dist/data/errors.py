"""The data layer's error type: messages name the file, and the row or column where known."""

from __future__ import annotations


class DataError(ValueError):
    """Bad or unreachable input; the CLI turns it into a non-zero exit with this message."""

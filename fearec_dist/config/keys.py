"""``option``: how a config key is declared, so that its description lives on the dataclass.

Every key of every section is one line, ``name: type = option(default, "one-line description")``;
the description is the field's ``metadata["help"]``, the single source of ``docs/config.md`` and
``fearec-dist config --list`` (``config/reference.py``). A list or dict default is copied per
instance; ``factory=`` builds a nested section.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import MISSING, Field, field
from typing import Any


def option(
    default: Any = MISSING, help: str = "", *, factory: Callable[[], Any] | None = None
) -> Any:
    """A dataclass field with its one-line description (``metadata["help"]``).

    Raises:
        TypeError: no description (every key is documented, or the module does not import).
    """
    if not help.strip():
        raise TypeError("a config key needs its one-line description: option(default, help=...)")
    meta = {"help": help}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    if isinstance(default, (list, dict)):  # a mutable default: each instance gets its own copy
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def help_of(f: Field) -> str:
    """A field's description ("" for a dataclass declared without ``option``)."""
    return str(f.metadata.get("help", ""))

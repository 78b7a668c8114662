"""An immutable table of rows by name: the base of the task and model-family registries (no global state: a
table is never changed; its ``with_...`` methods return a new one)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TypeVar

V = TypeVar("V")


class FrozenTable(Mapping[str, V]):
    """Rows by name, read-only (a ``Mapping``); a subclass fills ``_rows`` once, in its ``__init__``."""

    _rows: dict[str, V]

    def __getitem__(self, name: str) -> V:
        return self._rows[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self._rows)})"

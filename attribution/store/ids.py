"""The store's errors, and the checks every variant, graph id, failure id and table name passes before any
path is built from it."""

from __future__ import annotations

import re
from collections.abc import Iterable

from attribution.replacement import AttributionError
from attribution.schema import TABLES

VARIANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")  # graph and failure ids


class StoreError(AttributionError):
    """A store, file or graph that cannot be read or written; the message says which and why."""


class GraphNotFoundError(StoreError, KeyError):
    """No committed graph with this id in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def check_variant(variant: str) -> str:
    if not isinstance(variant, str) or not VARIANT.match(variant):
        raise StoreError(f"variant {variant!r} must be 1-128 letters, digits, '_', '.', '-', starting with a "
                         "letter or digit (it names a directory)")
    return variant


def check_id(graph_id: str, what: str = "graph id") -> str:
    """A graph or failure id as the store accepts it (it names a file), else StoreError."""
    if not isinstance(graph_id, str) or not ID.match(graph_id):
        raise StoreError(f"{what} {graph_id!r} must be 1-128 letters, digits, '_' or '-', starting with a "
                         "letter or digit (it names a file)")
    return graph_id


def check_table(name: str, tables: Iterable[str] = TABLES) -> str:
    if name not in tables:
        raise StoreError(f"unknown table {name!r}; tables are {list(tables)}")
    return name

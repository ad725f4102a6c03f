"""The command line's errors and how each becomes one line on stderr."""

from __future__ import annotations

from pydantic import ValidationError


class UsageError(ValueError):
    """A bad option value or missing input file; the message names it (exit status 2)."""


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def validation_message(error: ValidationError, names: dict[tuple, str] | None = None) -> str:
    """`where: what (got value)` per pydantic error, `; `-joined; `names` maps a field's location to the
    option that sets it (e.g. ("graph", "max_n_logits") -> "--max-n-logits")."""
    parts = []
    for item in error.errors():
        loc = tuple(str(part) for part in item["loc"])
        where = (names or {}).get(loc) or ".".join(loc) or "(top level)"
        got = f" (got {item['input']!r})" if "input" in item and not isinstance(item["input"], dict) else ""
        parts.append(f"{where}: {item['msg']}{got}")
    return one_line("; ".join(parts))


def describe_error(error: BaseException) -> str:
    """`Type: message` on one line."""
    if isinstance(error, ValidationError):
        return validation_message(error)
    return f"{type(error).__name__}: {one_line(error)}"

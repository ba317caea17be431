"""The one parser of integers that arrive as text: query parameters, headers, path parts.

`str.isdigit()` is true for '²' or an Arabic-Indic digit, which `int()` refuses or reads
as a number a client never meant, and `int()` refuses more than 4,300 digits: each of those
used to end in a 500. Here a number is ASCII digits only, at most `MAX_DIGITS` of them,
checked before `int()` ever sees it.
"""

from __future__ import annotations

from diffusiond.errors import InvalidRequest

MAX_DIGITS = 18  # below 2**63; no parameter of the API is near it
_ASCII_DIGITS = frozenset("0123456789")


def read_uint(raw: str) -> int | None:
    """The whole number `raw` spells in 1..MAX_DIGITS ASCII digits; None for anything else
    (signs, spaces, other scripts' digits, underscores, longer runs)."""
    if not 1 <= len(raw) <= MAX_DIGITS or not _ASCII_DIGITS.issuperset(raw):
        return None
    return int(raw)


def shown(raw: str, limit: int = 40) -> str:
    """`raw` quoted for a message, cut to `limit` characters (a 5,000-digit value is not
    echoed whole)."""
    return repr(raw if len(raw) <= limit else raw[:limit] + "...")


def int_param(raw: str, *, name: str, low: int, high: int) -> int:
    """`raw` as an integer from `low` to `high`, or a 400 naming `name` and the rule."""
    rule = f"an integer from {low} to {high}"
    value = read_uint(raw.strip())
    if value is None or not low <= value <= high:
        raise InvalidRequest(f"{name} must be {rule}, got {shown(raw)}", field=name, rule=rule)
    return value

"""Generation ids: time-ordered for humans, random enough that nobody can enumerate them."""

from __future__ import annotations

import secrets
import string

_ALPHABET = string.digits + string.ascii_lowercase
_RANDOM_CHARS = 20  # 36**20 is about 2**103: counting or guessing ids is hopeless


def new_generation_id(now_ms: int) -> str:
    """`gen_<ms>_<20 random base-36 chars>`, URL-safe and unique in practice."""
    suffix = "".join(secrets.choice(_ALPHABET) for _ in range(_RANDOM_CHARS))
    return f"gen_{now_ms}_{suffix}"

"""Sizes and lengths as people write them: `--context 32k`, `--cpu-mem 128G`.

Token counts: k = 1,024 and m = 1,048,576 tokens, the way context lengths are named ("32k" is
Mixtral's 32,768; "128k" is Llama 3.1's 131,072); write the digits for anything else. Byte sizes: GB
and G are 10^9 bytes, GiB 2^30 (TB/T 10^12, TiB 2^40), as every moeplan label states.
"""

from __future__ import annotations

import math
import re

from moeplan.errors import MoeplanError

# Compiled on first use (re keeps them): a plain `fit` parses only --context's default, an int.
_TOKENS = r"(?i)(\d+(?:\.\d+)?)\s*([km]?)"
_BYTES = r"(?i)(\d+(?:\.\d+)?)\s*(gb|gib|g|tb|tib|t|mb|mib|m)?"
_TOKEN_UNIT = {"": 1, "k": 1024, "m": 1024**2}
_BYTE_UNIT = {"gb": 1e9, "g": 1e9, "gib": 2**30, "tb": 1e12, "t": 1e12, "tib": 2**40, "mb": 1e6, "m": 1e6,
              "mib": 2**20}
MAX_TOKENS_TEXT = 2**40  # far above any --context bound the commands check; keeps the arithmetic finite
MAX_BYTES = 10**16  # 10 PB of host memory: no machine has it


def parse_tokens(text: str, flag: str = "--context") -> int:
    """'32768', '32k' (32,768), '1m' (1,048,576) -> tokens."""
    if type(text) is int and 0 <= text <= MAX_TOKENS_TEXT:  # a default (typer passes 4096 itself)
        return text
    m = re.fullmatch(_TOKENS, str(text).strip())
    if not m or len(m.group(1)) > 15:
        raise MoeplanError(f"{flag} {text!r} is not a token count; write e.g. 4096, 32k (32,768) or 1m")
    value = float(m.group(1)) * _TOKEN_UNIT[m.group(2).lower()]
    if not value.is_integer():
        raise MoeplanError(f"{flag} {text!r} is not a whole number of tokens")
    if value > MAX_TOKENS_TEXT:
        raise MoeplanError(f"{flag} {text!r} is beyond any context moeplan plans")
    return int(value)


def parse_bytes(text: str, flag: str = "--cpu-mem") -> int:
    """'768GB', '128G' (10^9 bytes each), '512GiB', '2TB' -> bytes; a bare number is GB."""
    m = re.fullmatch(_BYTES, str(text).strip())
    if not m or len(m.group(1)) > 15:
        raise MoeplanError(f"{flag} {text!r} is not a size; write e.g. 768GB, 128G (GB = 1e9 bytes) or 512GiB")
    value = float(m.group(1)) * _BYTE_UNIT[(m.group(2) or "gb").lower()]
    if not math.isfinite(value) or value <= 0 or value > MAX_BYTES:
        raise MoeplanError(f"{flag} {text!r} must be above 0 and at most 10 PB")
    return int(value)

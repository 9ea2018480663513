"""What a plan costs: `--price USD_PER_GPU_HOUR` or `--price H100=2.49,A100-80GB=1.29`, and dollars
per million tokens at the planned load.

    USD per million output tokens = price per hour of the deployment / (3600 x output tok/s) x 1e6
    USD per million input tokens  = price per hour / (3600 x prefill tok/s) x 1e6

The price per hour is the sum over the plan's GPUs (every node's). No price is ever assumed: without
one, cost is absent and the output says how to add it.
"""

from __future__ import annotations

import math
import re

from moeplan.errors import MoeplanError
from moeplan.record import Record
from moeplan.hardware import Gpu, find_gpu

NO_PRICE_NOTE = "no cost shown: add --price USD_PER_GPU_HOUR (e.g. --price 2.49, or --price H100=2.49,A100-80GB=1.29)"
MAX_PRICE = 10_000.0  # USD per GPU-hour; anything above is a typo


class Price(Record):
    """USD per GPU-hour: one figure for every GPU, or one per catalog name."""

    every: float | None = None
    by_gpu: dict[str, float] = {}
    text: str = ""

    def per_hour(self, gpus: tuple[Gpu, ...]) -> float:
        """The deployment's USD per hour; MoeplanError when a GPU has no price or a price names no GPU."""
        if self.every is not None:
            return self.every * len(gpus)
        names = {g.name for g in gpus}
        unused = sorted(set(self.by_gpu) - names)
        if unused:
            raise MoeplanError(f"--price names {', '.join(unused)}, which the plan does not use "
                               f"(its GPUs: {', '.join(sorted(names))})")
        missing = sorted(names - set(self.by_gpu))
        if missing:
            raise MoeplanError(f"--price gives no price for {', '.join(missing)}; add e.g. {missing[0]}=2.00")
        return sum(self.by_gpu[g.name] for g in gpus)


def _amount(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise MoeplanError(f"--price {where!r}: {text!r} is not a number of USD per GPU-hour") from None
    if not math.isfinite(value) or value <= 0 or value > MAX_PRICE:
        raise MoeplanError(f"--price {where!r}: a price must be above 0 and at most {MAX_PRICE:,.0f} USD per "
                           f"GPU-hour, got {text}")
    return value


def parse_price(text: str | None) -> Price | None:
    """'2.49' -> every GPU; 'H100=2.49,A100-80GB=1.29' -> per catalog GPU (names as `moeplan gpus`)."""
    if text is None:
        return None
    raw = text.strip().removeprefix("$")
    if not raw:
        raise MoeplanError("--price is empty; write e.g. --price 2.49 or --price H100=2.49")
    if "=" not in raw:
        return Price(every=_amount(raw, text), text=text)
    by_gpu: dict[str, float] = {}
    for part in raw.split(","):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise MoeplanError(f"--price {text!r}: write GPU=USD pairs, e.g. H100=2.49,A100-80GB=1.29")
        gpu = find_gpu(name.strip())
        if gpu is None:
            raise MoeplanError(f"--price {text!r}: unknown GPU {name.strip()!r} (see `moeplan gpus`)")
        if gpu.name in by_gpu:  # H100=1,H100=2: which one was meant is not for moeplan to guess
            raise MoeplanError(f"--price {text!r}: {gpu.name} is priced twice; give each GPU one price")
        by_gpu[gpu.name] = _amount(re.sub(r"^\$", "", value.strip()), text)
    return Price(by_gpu=by_gpu, text=text)


def per_million(usd_per_hour: float, tok_per_s: float) -> float:
    """USD per million tokens when a deployment costing `usd_per_hour` produces `tok_per_s`."""
    if tok_per_s <= 0:
        return math.inf
    return usd_per_hour / (3600 * tok_per_s) * 1e6

"""The expert-offload figures of docs/offload.md, each from the `moeplan fit` command printed beside it.

    python benchmarks/offload_report.py

Blocks, separated by blank lines: (1) Mixtral-8x7B Q4_K_M on one RTX 4090 with 64 GB of RAM as the
GPU expert cache shrinks, (2) as routing locality drops, (3) the same plan read from DDR4, DDR5 and
disk, (4) moeplan against published llama.cpp offload measurements, fitting and validation rows
apart. tests/test_offload_doc.py checks docs/offload.md holds this output verbatim.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BASE = ("mixtral-8x7b", "--gpus", "1xRTX4090", "--quant", "q4_k_m", "--cpu-mem", "64GB", "--context", "8192")
CACHE_SLOTS = (5, 4, 3, 2, 1)
LOCALITIES = (0.6, 0.34, 0.25, 0.1)


@cache
def fit_json(args: tuple[str, ...]) -> dict[str, Any]:
    from typer.testing import CliRunner

    from moeplan.cli import app

    result = CliRunner().invoke(app, ["fit", *args, "--json"])
    if result.exit_code != 0:
        raise SystemExit(f"`moeplan fit {' '.join(args)}` exited {result.exit_code}: {result.output[-400:]}")
    data: dict[str, Any] = json.loads(result.output)
    return data


def command(args: tuple[str, ...]) -> str:
    return "`moeplan fit " + " ".join(shlex.quote(a) for a in args) + "`"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"


def best(args: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    plan = fit_json(args)["best"]
    return plan, plan["offload"], plan["speed"]


def _cache_rows(header: str, cases: list[tuple[str, tuple[str, ...]]]) -> str:
    """One row per case: the cached engine's hit rate, mean and p99 per token, and the command."""
    rows = [f"| {header} | mean ms/token | p99 ms/token | command |", "|---|---|---|---|---|"]
    for label, args in cases:
        _, _, sp = best(args)
        rows.append(f"| {label} | {sp['cache_hit_rate']:.0%} | {_ms(sp['cache_tpot_s'])} | "
                    f"{_ms(sp['cache_p99_tpot_s'])} | {command(args)} |")
    return "\n".join(rows)


def cache_table() -> str:
    return _cache_rows("GPU cache slots per layer | hit rate",
                       [(str(n), (*BASE, "--expert-cache", str(n))) for n in CACHE_SLOTS])


def locality_table() -> str:
    return _cache_rows("routing locality | hit rate (2 slots)",
                       [(f"{x:g}", (*BASE, "--expert-cache", "2", "--locality", f"{x:g}")) for x in LOCALITIES])


def tier_table() -> str:
    rows = ["| host memory | experts in RAM | llama.cpp mean ms/token | p99 ms/token | command |", "|---|---|---|---|---|"]
    gpu = ("mixtral-8x7b", "--gpus", "1xRTX4090", "--context", "8192")
    cases = (("DDR4 (40 GB/s)", (*BASE, "--cpu-bw", "ddr4")),
             ("DDR5 (62 GB/s)", BASE),
             ("16 GB of RAM (Q8_0), the rest from NVMe", (*gpu, "--quant", "q8_0", "--cpu-mem", "16GB")))
    for label, args in cases:
        _, off, sp = best(args)
        rows.append(f"| {label} | {off['ram_share']:.0%} ({off['tier']}) | {_ms(sp['tpot_s'])} | "
                    f"{_ms(sp['offload_p99_tpot_s'])} | {command(args)} |")
    return "\n".join(rows)


@dataclass(frozen=True)
class Published:
    id: str
    role: str  # "fitting" (llama.cpp cpu experts efficiency fitted on it) or "validation"
    what: str
    value: float  # decode tok/s
    source: str
    args: tuple[str, ...]


PUBLISHED = (
    Published("rtx4090-offload", "fitting", "Mixtral-8x7B (5-bit), RTX 4090, 12 of 32 layers on the CPU", 9.0,
              "ollama/ollama#1556 (8-10 tok/s)", (*BASE[:4], "q5_k_m", "--cpu-mem", "64GB", "--context", "8192")),
    Published("llmfit-755-qwen3-30b", "fitting", "Qwen3-30B-A3B Q4_K_M, RTX 2080 8 GB, --n-cpu-moe 36, DDR4 ~102 GB/s",
              36.7, "AlexsJones/llmfit PR #755",
              ("qwen3-30b-a3b", "--gpus", "1xRTX2080", "--quant", "q4_k_m", "--cpu-mem", "62GB", "--context", "4096",
               "--cpu-bw", "102", "--n-cpu-moe", "36")),
    Published("llmfit-775-gpt-oss-20b", "validation",
              "gpt-oss-20b MXFP4, RTX 2080 8 GB, --n-cpu-moe 12, same host", 36.4, "AlexsJones/llmfit PR #775",
              ("gpt-oss-20b", "--gpus", "1xRTX2080", "--quant", "mxfp4_moe", "--cpu-mem", "62GB", "--context", "4096",
               "--cpu-bw", "102", "--n-cpu-moe", "12", "--mem-fraction", "0.98")),
)


def published_table() -> str:
    rows = ["| row | role | setup | published tok/s | moeplan tok/s | ratio | source | command |",
            "|---|---|---|---|---|---|---|---|"]
    for p in PUBLISHED:
        _, _, sp = best(p.args)
        rate = sp["decode_tok_per_s"]
        rows.append(f"| {p.id} | {p.role} | {p.what} | {p.value:g} | {rate:.1f} | {rate / p.value:.2f} | {p.source} | "
                    f"{command(p.args)} |")
    return "\n".join(rows)


def report() -> str:
    return "\n\n".join((cache_table(), locality_table(), tier_table(), published_table())) + "\n"


if __name__ == "__main__":
    sys.stdout.write(report())

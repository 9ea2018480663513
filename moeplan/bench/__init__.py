"""`moeplan bench`: a real MoE decoder layer at a model's true dimensions, measured against predictions.

Modules: run (input checks, the run, the result and its calibration), predict (the planner's side,
pure moeplan), sweep and harness (timing: CUDA graphs or eager, copy bandwidth, the kernel path,
routing counts), layers (the torch modules), ep (expert parallel over processes), table (rich output).
torch is imported only by layers, harness, sweep and ep, and only when `run_bench` is called, so
`import moeplan.bench` works without torch and `run_bench` then raises BenchUnavailableError, which
the CLI turns into exit code 2.
"""

from __future__ import annotations

from moeplan.bench.run import BenchResult, run_bench

__all__ = ["BenchResult", "run_bench"]

"""`moeplan bench`: a real MoE decoder layer at a model's true dimensions, measured against predictions.

torch is imported only by the modules of this package (layers, harness, ep) and only when
`run_bench` is called, so `import moeplan.bench` works without torch and `run_bench` then raises
BenchUnavailableError, which the CLI turns into exit code 2.
"""

from __future__ import annotations

from moeplan.bench.run import BenchResult, run_bench

__all__ = ["BenchResult", "run_bench"]

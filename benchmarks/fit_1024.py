"""Layout search for DeepSeek-V3 over 1024 GPUs (128 nodes x 8xH100): must finish in under a second.

Run: python benchmarks/fit_1024.py
"""

import time

from moeplan.hardware import parse_gpus
from moeplan.perf import rank_plan
from moeplan.plan import fit
from moeplan.sources import resolve

spec = resolve("deepseek-v3")
gpus, nodes = parse_gpus("8xH100", nodes=128)
start = time.perf_counter()
result = fit(spec, gpus, nodes=nodes, context=4096, batch=1, rank=rank_plan)
elapsed = time.perf_counter() - start
best = result.best
print(f"{len(gpus)} GPUs, {len(result.verdicts)} quantizations, best: {best.quant} {best.layout}" if best else "no fit")
print(f"search took {elapsed:.3f} s ({'OK' if elapsed < 1.0 else 'TOO SLOW'}: budget 1 s)")

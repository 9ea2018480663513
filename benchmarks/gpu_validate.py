"""One-shot GPU validation of moeplan's speed model: run it on one H100/H200 (under 8 minutes).

    python benchmarks/gpu_validate.py [--out results.json] [--cache DIR]
    python benchmarks/gpu_validate.py --dry-run      # the same pipeline on the CPU with a tiny model

What it does:
1. with an empty calibration cache (a fresh temporary MOEPLAN_CACHE unless --cache is given), runs
   `moeplan bench` (run_bench) under CUDA graphs on Mixtral-8x7B (2 layers), DeepSeek-V3 (its first
   MoE layer), Qwen3-30B-A3B and gpt-oss-120b (2 layers each) at decode batches 1, 8, 64 and prefills
   of 512 and 2048 tokens, and Mixtral eagerly at batches 1 and 8 for the launch overhead;
2. fits one calibration for the GPU over every graph-mode point of every model
   (moeplan.calibration.fit_calibration) and saves it, as `moeplan bench --save-calibration` does;
3. predicts every point again through the planner, which now reads the saved calibration, and prints
   predicted vs measured before and after it;
4. checks issue 14's GPU criteria: batch-1 decode of the Mixtral layers at >= 60% of the measured
   copy bandwidth, parameter bytes exact, peak memory beyond the weights within 10%.
Exit 0 when every check passes, 1 otherwise. Paste the output (command, GPU, date are printed) into
docs/validation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moeplan.bench.predict import StepShape, fit_point, planner_efficiency, predict_point  # noqa: E402
from moeplan.bench.run import BenchResult, run_bench  # noqa: E402
from moeplan.calibration import (  # noqa: E402
    MAX_ASSUMED_EFFICIENCY, MAX_EFFICIENCY, FitPoint, fit_calibration, save_calibration,
)  # fmt: skip
from moeplan.routing import Routing  # noqa: E402
from moeplan.sources import find_card  # noqa: E402
from moeplan.spec import LayerSpec, ModelSpec  # noqa: E402

COPY_FRACTION_MIN = 0.60  # batch-1 Mixtral decode, of the measured copy bandwidth (issue 14)
PEAK_TOLERANCE = 0.10  # peak memory beyond the weights


@dataclass(frozen=True)
class Case:
    model: str
    layers: int
    batches: str
    prompts: str
    eager: bool = False
    in_fit: bool = True


GPU_CASES = (
    Case("mixtral-8x7b", 2, "1,8,64", "512,2048"),
    Case("deepseek-v3", 1, "1,8,64", "512,2048"),
    Case("qwen3-30b-a3b", 2, "1,8,64", "512,2048"),
    Case("gpt-oss-120b", 2, "1,8,64", "512,2048"),
    Case("mixtral-8x7b", 2, "1,8", "512", eager=True, in_fit=False),
)
# --dry-run: a Mixtral-shaped model small enough for a CI CPU, one case per mode.
TINY = ModelSpec(
    name="tiny-mixtral", hidden_size=256, vocab_size=256, num_attention_heads=8, num_kv_heads=2, head_dim=32,
    layers=(LayerSpec(ffn="moe"), LayerSpec(ffn="moe")), num_experts=32, experts_per_token=2,
    expert_intermediate_size=256,
)  # fmt: skip
DRY_CASES = (Case("tiny-mixtral", 2, "1,8", "1024"), Case("tiny-mixtral", 2, "1", "256", eager=True, in_fit=False))


def _spec(name: str, dry: bool) -> ModelSpec:
    return TINY if dry else find_card(name).spec()


def run_cases(cases: tuple[Case, ...], *, device: str, dtype: str, repeats: int | None,
              dry: bool) -> list[tuple[Case, BenchResult]]:  # fmt: skip
    out = []
    for case in cases:
        t0 = time.perf_counter()
        spec = _spec(case.model, dry)
        result = run_bench(spec, device=device, dtype=dtype,  # type: ignore[arg-type]
                           batch=case.batches, prompt=case.prompts, layers=case.layers, repeats=repeats,
                           eager=case.eager)  # fmt: skip
        mode = "eager" if case.eager else result.mode
        print(f"  {case.model} ({case.layers} layer(s), {mode}): {time.perf_counter() - t0:.1f} s, path {result.path}",
              flush=True)  # fmt: skip
        out.append((case, result))
    return out


def fit_points(runs: list[tuple[Case, BenchResult]]) -> list[FitPoint]:
    return [fit_point([(c_s, m_s) for c_s, m_s in p.at_peak], p.measured_s, len(r.layers),
                      f"{r.model} {p.kind} {p.batch}x{p.tokens}")
            for c, r in runs if c.in_fit and r.fits for p in r.points]  # fmt: skip


def device_gpu(device: str) -> Any:
    """The catalog entry bench used for this device (moeplan.bench.harness.device_info)."""
    import torch

    from moeplan.bench.harness import device_info

    return device_info(torch.device(device))[1]


def after_prediction(case: Case, r: BenchResult, p: Any, dry: bool) -> float:
    """The planner's time for the point now: efficiency_for reads the calibration just saved."""
    gpu = device_gpu(r.device)
    shape = StepShape(p.kind, p.batch, p.tokens, p.context)
    eff = planner_efficiency(gpu, r.dtype, p.mode)
    return predict_point(_spec(case.model, dry), gpu, r.layers, shape, dtype=r.dtype, eff=eff, mode=p.mode,
                         routing=Routing(), full=False).seconds  # fmt: skip


def report(runs: list[tuple[Case, BenchResult]], dry: bool) -> list[str]:
    """Print predicted vs measured before and after, and return the failed checks."""
    failed: list[str] = []
    header = (f"{'model':<16} {'mode':<10} {'point':<13} {'measured ms':>12} {'before ms':>10} {'err':>6} "
              f"{'after ms':>9} {'err':>6}")  # fmt: skip
    print("\npredicted vs measured, before (defaults) and after the saved calibration")
    print(header)
    print("-" * len(header))
    for case, r in runs:
        if not r.fits:
            failed.append(f"{case.model}: did not fit ({r.oom})")
            continue
        for p in r.points:
            after = after_prediction(case, r, p, dry)
            label = f"decode b{p.batch}" if p.kind == "decode" else f"prefill {p.tokens}"
            print(f"{r.model:<16} {p.mode:<10} {label:<13} {p.measured_s * 1e3:>12.3f} {p.predicted_s * 1e3:>10.3f} "
                  f"{p.error:>+6.0%} {after * 1e3:>9.3f} {p.measured_s / after - 1:>+6.0%}")  # fmt: skip
    print("\nchecks")
    for case, r in runs:
        if not r.fits:
            continue
        pb, mb = r.predicted.param_bytes, r.measured.param_bytes
        ok = pb == mb
        print(f"  {'ok  ' if ok else 'FAIL'} {r.model} ({'eager' if case.eager else r.mode}): parameter bytes {mb:,} "
              f"measured, {pb:,} predicted; MoE path {r.path} {', '.join(r.kernels)}".rstrip())  # fmt: skip
        failed += [] if ok else [f"{r.model}: parameter bytes {mb} != {pb}"]
        for p in r.points:
            if p.kind != "prefill" or p.peak_bytes is None or p.predicted_peak_bytes is None or pb is None:
                continue
            extra_m, extra_p = p.peak_bytes - pb, p.predicted_peak_bytes - pb
            err = extra_m / extra_p - 1 if extra_p else 0.0
            ok = abs(err) <= PEAK_TOLERANCE or dry  # a CPU's peak is an RSS estimate: shown, not checked
            print(f"  {'ok  ' if ok else 'FAIL'} {r.model} prefill {p.tokens}: peak beyond the weights "
                  f"{extra_m / 2**30:.3f} GiB measured, {extra_p / 2**30:.3f} GiB predicted ({err:+.0%})"
                  f"{' (not checked in a dry run)' if dry else ''}")  # fmt: skip
            failed += [] if ok else [f"{r.model} prefill {p.tokens}: peak beyond weights off by {err:+.0%}"]
    mixtral = next(((c, r) for c, r in runs if c.in_fit and r.fits and "mixtral" in r.model), None)
    if mixtral is not None:
        b1 = next(p for p in mixtral[1].points if p.kind == "decode" and p.batch == 1)
        frac = b1.fraction_of_copy or 0.0
        ok = frac >= COPY_FRACTION_MIN or dry
        print(f"  {'ok  ' if ok else 'FAIL'} {mixtral[1].model} decode b1: {b1.gb_per_s:,.0f} GB/s, {frac:.0%} of the "
              f"measured copy bandwidth ({mixtral[1].copy_gb_per_s:,.0f} GB/s), {b1.fraction_of_peak_bandwidth:.0%} of "
              f"the datasheet; at least {COPY_FRACTION_MIN:.0%} wanted"
              f"{' (not checked in a dry run)' if dry else ''}")  # fmt: skip
        failed += [] if ok else [f"batch-1 Mixtral decode at {frac:.0%} of copy bandwidth"]
    return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="run the pipeline on the CPU with a tiny model")
    ap.add_argument("--out", type=Path, help="write every BenchResult and the fit as JSON here")
    ap.add_argument("--cache", type=Path, help="calibration cache directory (default: a fresh temporary one)")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    dry = args.dry_run
    cache = args.cache or Path(tempfile.mkdtemp(prefix="moeplan-gpu-validate-"))
    os.environ["MOEPLAN_CACHE"] = str(cache)
    import torch

    device = "cpu" if dry else "cuda"
    dtype = "fp32" if dry else "bf16"
    if not dry and not torch.cuda.is_available():
        print("error: no CUDA device (use --dry-run to check the pipeline on the CPU)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0) if not dry else "cpu (dry run)"
    print(f"$ python benchmarks/gpu_validate.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    date = datetime.now(timezone.utc).isoformat(timespec="minutes")
    print(f"device: {name}; torch {torch.__version__}; date {date}; calibration cache {cache}")
    t0 = time.perf_counter()
    runs = run_cases(DRY_CASES if dry else GPU_CASES, device=device, dtype=dtype,
                     repeats=args.repeats or (3 if dry else None), dry=dry)  # fmt: skip
    points = fit_points(runs)
    fitted = next((r for c, r in runs if c.in_fit and r.fits), None)
    if fitted is None:
        print("error: no fitting case fit on this device (nothing to calibrate); free GPU memory or "
              "edit GPU_CASES", file=sys.stderr)
        return 1
    prior = fitted.calibration
    assumed = bool(prior and prior.peaks_assumed)
    before = planner_efficiency(device_gpu(device), dtype, fitted.mode)
    fit = fit_calibration(points, prior_memory=before.memory, prior_compute=before.compute,
                          prior_layer_s=prior.layer_s if prior else 30e-6,
                          max_efficiency=MAX_ASSUMED_EFFICIENCY if assumed else MAX_EFFICIENCY)  # fmt: skip
    source = f"benchmarks/gpu_validate.py on {name}, {len(points)} points of {len({c.model for c, _ in runs})} models"
    path = save_calibration(fitted.gpu, dtype, fit.memory, fit.compute, source, layer_s=fit.layer_s,
                            peaks_assumed=assumed)  # fmt: skip
    print(f"\ncalibration for {fitted.gpu} ({dtype}) over {len(points)} points: memory {fit.memory:.3f} "
          f"({fit.memory_points} memory-bound), compute {fit.compute:.3f} ({fit.compute_points} compute-bound), "
          f"{fit.layer_s * 1e6:.1f} us per layer; saved to {path}")  # fmt: skip
    for note in fit.notes:
        print(f"  - {note}")
    failed = report(runs, dry)
    if args.out:
        args.out.write_text(json.dumps({"device": name, "fit": fit.model_dump(),
                                        "runs": [r.model_dump() for _, r in runs]}, indent=1))  # fmt: skip
    print(f"\n{len(failed)} check(s) failed; {time.perf_counter() - t0:.0f} s in all")
    for line in failed:
        print(f"  - {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

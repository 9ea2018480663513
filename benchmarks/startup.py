"""Start-up cost of `moeplan fit mixtral-8x7b --gpus 2x24GB` as a whole process, against a typer floor.

The floor is benchmarks/startup_reference.py: a typer app of the same shape (two commands, six options,
one rich table printed). Every typer CLI pays that much for Python, typer (with its pydantic-based
option coercion), click and rich; what moeplan costs above it is its own: its imports, reading the
model card, the fit search and its tables. Issue 17 asks for at most 1.15x.

How it measures:
- Both run as fresh subprocesses of this interpreter, launched the same way, `python -m NAME ARGS`
  from the directory that holds NAME: moeplan from this checkout (not whatever is installed), the
  reference from benchmarks/. Output goes to a pipe, as in CI.
- They alternate, round after round, and which goes first alternates too, so a slow spell on a busy
  machine lands on both. Medians, not means. One warm-up round first (page cache, bytecode).
- Bytecode: an installed moeplan runs from .pyc files (pip compiles them). A checkout run under
  PYTHONDONTWRITEBYTECODE=1 would compile every moeplan module on every run (about 100 ms on a
  2-core box), which is no user's start-up; both sides read and write bytecode under one cache
  directory outside the repo instead (PYTHONPYCACHEPREFIX).
- Wall time is what a user waits; CPU time (user + system of the child, from getrusage) is printed
  beside it because it is what a loaded machine disturbs least. --metric picks the one the limit
  applies to (the ratio of the two sides' medians). The median of each round's own ratio is printed
  too: a round's two runs are neighbours in time, so a slow spell weighs on both.
- What moeplan does that the reference does not, and which therefore counts in moeplan's favour:
  an option left at None skips typer's per-option pydantic adapter (moeplan.cli
  _coerce_none_without_an_adapter). Everything else the reference shares: typer's coercion of the
  options given or defaulted, the same Console settings (emoji off), annotations evaluated at
  definition as in moeplan's cli.py.

Run: python benchmarks/startup.py [--rounds 40] [--limit 1.15] [--metric wall|cpu]
Exit 0 when the ratio of medians is at most --limit, 1 when over it, 2 when a command fails.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ARGS = ("fit", "mixtral-8x7b", "--gpus", "2x24GB")
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPATH", "COLUMNS")}
ENV["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "moeplan-startup-pycache")
# (name, working directory, command): `-m` puts the working directory first on sys.path.
SIDES = (
    ("moeplan", ROOT, (sys.executable, "-m", "moeplan", *ARGS)),
    ("reference", HERE, (sys.executable, "-m", "startup_reference", *ARGS)),
)


def timed(cwd: Path, cmd: tuple[str, ...]) -> tuple[float, float]:
    """Wall and CPU seconds of one run. CPU is the child's user + system time: getrusage counts reaped
    children to the microsecond (os.times() only in 10 ms ticks), and there is one child at a time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=ENV)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:  # this plan fits: moeplan exits 0, and so does the reference
        sys.stderr.write(f"{' '.join(cmd)} (in {cwd}) exited {proc.returncode}:\n"
                         f"{proc.stderr.decode(errors='replace')}")
        sys.exit(2)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def summary(name: str, walls: list[float], cpus: list[float]) -> str:
    q = statistics.quantiles(walls, n=4) if len(walls) > 1 else [walls[0]] * 3
    return (f"{name:9}  wall median {statistics.median(walls) * 1e3:6.1f} ms (IQR {q[0] * 1e3:.1f}-{q[2] * 1e3:.1f})"
            f"   cpu median {statistics.median(cpus) * 1e3:6.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="alternating rounds (default 40)")
    parser.add_argument("--limit", type=float, default=1.15, help="the largest passing ratio (default 1.15)")
    parser.add_argument("--metric", choices=("wall", "cpu"), default="wall",
                        help="the median the limit applies to (default wall: what a user waits)")
    opts = parser.parse_args()
    if opts.rounds < 1:
        parser.error("--rounds must be at least 1")

    for _, cwd, cmd in SIDES:  # warm-up: bytecode and the page cache
        timed(cwd, cmd)
    walls: dict[str, list[float]] = {name: [] for name, _, _ in SIDES}
    cpus: dict[str, list[float]] = {name: [] for name, _, _ in SIDES}
    for i in range(opts.rounds):
        for name, cwd, cmd in SIDES if i % 2 == 0 else SIDES[::-1]:
            wall, cpu = timed(cwd, cmd)
            walls[name].append(wall)
            cpus[name].append(cpu)

    print(f"{opts.rounds} alternating rounds, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
          f"Python {sys.version.split()[0]} ({sys.executable})")
    for name, cwd, cmd in SIDES:
        print(f"{name:9}  {' '.join(cmd[1:])}   (in {cwd})")
    for name, _, _ in SIDES:
        print(summary(name, walls[name], cpus[name]))
    ratio = {m: statistics.median(d["moeplan"]) / statistics.median(d["reference"])
             for m, d in (("wall", walls), ("cpu", cpus))}
    # Each round's two runs are neighbours in time: their ratio cancels what a slow spell adds to both.
    paired = sorted(a / b for a, b in zip(walls["moeplan"], walls["reference"]))
    pq = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
    print(f"per-round wall ratios: median {statistics.median(paired):.3f}x (IQR {pq[0]:.3f}-{pq[2]:.3f})")
    ok = ratio[opts.metric] <= opts.limit
    print(f"ratio of medians: wall {ratio['wall']:.3f}x, cpu {ratio['cpu']:.3f}x; "
          f"limit {opts.limit:.2f}x on {opts.metric}: {'OK' if ok else 'OVER'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

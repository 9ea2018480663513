"""moeplan.hub against a Hub that stalls, lies or attacks (issue 17), on 127.0.0.1 (tests/hubserver.py).

Each class of fault has several cases; every one must end with exit 2 and one line on stderr (or,
where the fault is harmless, the right answer), within 10 s and 600 MB, with nothing written outside
HF_HOME. moeplan runs in a subprocess from an empty working directory, through a wrapper that
records its peak RSS; the limits are set small through MOEPLAN_HUB_TIMEOUT and MOEPLAN_HUB_DEADLINE.
Cases that wait on a stalled server run at the same time, each with its own server and HF_HOME;
the many refusal cases of one class run in one driver process that calls moeplan.hub for each (as
tests/test_hub.py does), and one case per class also runs through the CLI.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hubserver import (
    FakeRepo,
    HubServer,
    Misbehave,
    Request,
    env_for,
    hub_server,
    mixtral_tensors,
    safetensors_header,
    sharded_repo,
    single_file_repo,
)

ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = json.loads((Path(__file__).parent / "fixtures" / "hub" / "tiny-mixtral.config.json").read_text())
TINY = mixtral_tensors(TINY_CONFIG)
TIMEOUT_S, DEADLINE_S = 1.5, 4.0  # what the runs below allow one request and a whole fetch
MAX_RSS_MB = 600
MAX_WALL_S = 9.0  # one run, start-up included
GIB = 2**30
DEAD = "http://127.0.0.1:9"  # nothing listens on port 9 (discard): connections are refused

# Runs moeplan as `python -m moeplan ARGS` would, then writes its peak RSS in KiB to a file: VmHWM,
# the high-water mark of this program's own memory (ru_maxrss would be no good: Linux carries it over
# execve from the forked copy of the test process, proc(5) and getrusage(2)).
_WRAPPER = textwrap.dedent(
    """
    import os, resource, runpy, sys
    sys.argv = ["moeplan", *sys.argv[1:]]
    try:
        runpy.run_module("moeplan", run_name="__main__", alter_sys=True)
    finally:
        try:
            with open("/proc/self/status") as status:
                peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
        except (OSError, StopIteration):  # not Linux: the best there is
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with open(os.environ["MOEPLAN_TEST_RSS"], "w") as out:
            out.write(str(peak))
    """
)


def _elements(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


TINY_TOTAL = sum(_elements(shape) for _, shape in TINY.values())  # every tensor, as the config counts them


@dataclass(frozen=True)
class Run:
    case: str
    returncode: int
    stdout: str
    stderr: str
    requests: list[Request]
    wall_s: float
    rss_mb: float

    def json(self) -> Any:
        return json.loads(self.stdout)


def env_in(hub_or_endpoint: HubServer | str, tmp: Path, **extra: str) -> dict[str, str]:
    endpoint = hub_or_endpoint if isinstance(hub_or_endpoint, str) else hub_or_endpoint.endpoint
    env = env_for(endpoint, tmp)
    env.update(
        MOEPLAN_HUB_TIMEOUT=str(TIMEOUT_S),
        MOEPLAN_HUB_DEADLINE=str(DEADLINE_S),
        MOEPLAN_TEST_RSS=str(tmp / "harness" / "rss"),
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


def moeplan(hub: HubServer | None, tmp: Path, *args: str, env: dict[str, str] | None = None) -> Run:
    """One moeplan run from the empty folder tmp/cwd; `requests` are what the fake Hub saw meanwhile."""
    return _python(hub, tmp, ["-c", _WRAPPER, *args], env)


def _python(hub: HubServer | None, tmp: Path, argv: list[str], env: dict[str, str] | None) -> Run:
    (tmp / "cwd").mkdir(parents=True, exist_ok=True)
    (tmp / "harness").mkdir(parents=True, exist_ok=True)
    seen = len(hub.requests()) if hub else 0
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, *argv], env=env or env_in(hub or DEAD, tmp), cwd=tmp / "cwd", capture_output=True,
        text=True, timeout=30,
    )  # fmt: skip
    wall = time.monotonic() - start
    rss = tmp / "harness" / "rss"
    rss_kib = int(rss.read_text() or 0) if rss.exists() else 0
    requests = hub.requests()[seen:] if hub else []
    return Run(tmp.name, proc.returncode, proc.stdout, proc.stderr, requests, wall, rss_kib / 1024)


# Calls moeplan.hub.spec_from_hub for each model in argv[1] (a JSON list) and prints what each gave.
_DRIVER = textwrap.dedent(
    """
    import json, sys, time
    from moeplan.errors import MoeplanError
    from moeplan.hub import spec_from_hub
    out = {}
    for model in json.loads(sys.argv[1]):
        start = time.monotonic()
        try:
            checkpoint = spec_from_hub(model).checkpoint
            out[model] = {"ok": True, "checkpoint": checkpoint and checkpoint.model_dump(mode="json")}
        except MoeplanError as exc:
            out[model] = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
        out[model]["wall_s"] = time.monotonic() - start
    print(json.dumps(out))
    """
)


def drive(hub: HubServer, tmp: Path, models: list[str], **env: str) -> dict[str, dict[str, Any]]:
    """What spec_from_hub gave for each model, in one process; the server's requests under "requests"."""
    run = _python(hub, tmp, ["-c", _DRIVER, json.dumps(models)], env_in(hub, tmp, **env))
    assert run.returncode == 0 and run.stderr == "", run.stderr
    outcomes: dict[str, dict[str, Any]] = run.json()
    for model, outcome in outcomes.items():
        outcome["requests"] = [r for r in run.requests if r.path.startswith(f"/{model}/")]
    return outcomes


def refused(outcome: dict[str, Any], *needles: str) -> str:
    """A MoeplanError of one line (what the CLI prints and exits 2 with), quickly."""
    assert not outcome["ok"], outcome
    message: str = outcome["message"]
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    assert outcome["wall_s"] < 3.0, outcome
    return message


T = TypeVar("T")


def concurrently(tmp: Path, cases: dict[str, Callable[[Path], T]]) -> dict[str, T]:
    """Each case called with its own folder tmp/<case>, all at once; their results by case."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = {case: pool.submit(fn, tmp / case) for case, fn in cases.items()}
    return {case: future.result() for case, future in futures.items()}


def params(model: str, *extra: str) -> list[str]:
    return ["params", model, "--json", *extra]


def one_line_error(run: Run, *needles: str) -> str:
    """Exit 2, nothing on stdout, one line on stderr, no traceback, in bounded time and memory."""
    assert run.returncode == 2, (run.case, run.returncode, run.stderr, run.stdout[:500])
    assert run.stdout == "", run.case
    assert "Traceback" not in run.stderr, (run.case, run.stderr)
    lines = run.stderr.splitlines()
    assert len(lines) == 1, (run.case, run.stderr)
    for needle in needles:
        assert needle in lines[0], (run.case, needle, lines[0])
    assert run.wall_s < MAX_WALL_S, (run.case, run.wall_s)
    assert run.rss_mb < MAX_RSS_MB, (run.case, run.rss_mb)
    return lines[0]


def ok(run: Run) -> dict[str, Any]:
    assert run.returncode == 0, (run.case, run.stderr)
    assert run.stderr == "", run.case
    assert run.wall_s < MAX_WALL_S, (run.case, run.wall_s)
    assert run.rss_mb < MAX_RSS_MB, (run.case, run.rss_mb)
    data: dict[str, Any] = run.json()
    return data


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if not p.is_dir()) if folder.exists() else []


def assert_nothing_outside_hf_home(tmp: Path) -> None:
    """tmp holds HF_HOME (hf/), the wrapper's RSS file (harness/) and the working directory (cwd/, empty)."""
    for path in tmp.rglob("*"):
        top = path.relative_to(tmp).parts[0]
        assert top in ("hf", "harness", "cwd"), f"{path} was written outside HF_HOME"
    assert not any((tmp / "cwd").iterdir()), list((tmp / "cwd").iterdir())


def tiny_single(**repo: Any) -> FakeRepo:
    return single_file_repo(TINY_CONFIG, TINY, **repo)


def tiny_sharded(shards: int = 2, **repo: Any) -> FakeRepo:
    return sharded_repo(TINY_CONFIG, TINY, shards=shards, **repo)


def names(requests: list[Request]) -> list[str]:
    return [r.path.rsplit("/", 1)[1] for r in requests]


def serve_and_run(repos: dict[str, FakeRepo], *args: str, **env: str) -> Callable[[Path], Run]:
    """A case: serve `repos`, run moeplan once against them with `env` added."""

    def case(tmp: Path) -> Run:
        with hub_server(repos) as hub:
            return moeplan(hub, tmp, *args, env=env_in(hub, tmp, **env))

    return case


# ----------------------------------------------------------------------------------------------
# A slow Hub: timeouts per request and for the whole fetch
# ----------------------------------------------------------------------------------------------

STALLS = {  # case: (file, how it stalls)
    "config-body-dripped": ("config.json", Misbehave(drip_s=2.0)),
    "config-status-line-dripped": ("config.json", Misbehave(drip_head_s=2.0)),
    "config-no-answer": ("config.json", Misbehave(delay_s=30.0)),
    "single-body-dripped": ("model.safetensors", Misbehave(drip_s=2.0)),
    "single-status-line-dripped": ("model.safetensors", Misbehave(drip_head_s=2.0)),
    "shard-body-dripped": ("model-00002-of-00002.safetensors", Misbehave(drip_s=2.0)),
    "index-body-dripped": ("model.safetensors.index.json", Misbehave(drip_s=2.0)),
}


def _stalled_runs(tmp_path: Path, cases: list[str]) -> dict[str, Run]:
    def repo(file: str, how: Misbehave) -> FakeRepo:
        single = file in ("config.json", "model.safetensors")
        return tiny_single(misbehave={file: how}) if single else tiny_sharded(misbehave={file: how})

    return concurrently(tmp_path, {
        case: serve_and_run({"org/slow": repo(*STALLS[case])}, *params("org/slow")) for case in cases
    })  # fmt: skip


def _cut_off(tmp_path: Path, case: str, run: Run, line: str) -> None:
    assert "within 1.5 s, the limit MOEPLAN_HUB_TIMEOUT sets for one request" in line, (case, line)
    assert run.wall_s < TIMEOUT_S + 4.0, (case, run.wall_s)  # cut off at the limit, start-up included
    assert_nothing_outside_hf_home(tmp_path / case)


def test_a_stalling_hub_ends_config_json_in_one_line_at_the_limit(tmp_path: Path) -> None:
    for case, run in _stalled_runs(tmp_path, [c for c in STALLS if c.startswith("config")]).items():
        line = one_line_error(run, "cannot reach the Hub", "config.json of org/slow@main", "not in the local cache")
        _cut_off(tmp_path, case, run, line)


def test_a_stalling_hub_ends_the_headers_in_one_line_at_the_limit(tmp_path: Path) -> None:
    for case, run in _stalled_runs(tmp_path, [c for c in STALLS if not c.startswith("config")]).items():
        line = one_line_error(run, "reading the safetensors headers of org/slow@main", STALLS[case][0])
        _cut_off(tmp_path, case, run, line)


def test_many_slow_shards_hit_the_deadline_for_the_whole_fetch(tmp_path: Path) -> None:
    # Shards that each answer in 0.5 s, well within the 2.5 s one request may take; 8 at a time they
    # take ~5 s, past the 3 s the whole fetch may take.
    config = {**TINY_CONFIG, "num_hidden_layers": 8}
    repo = sharded_repo(config, mixtral_tensors(config), shards=96)
    shards = sorted(set(json.loads(repo.files["model.safetensors.index.json"])["weight_map"].values()))
    repo.misbehave.update({name: Misbehave(delay_s=0.5) for name in shards})
    limits = {"MOEPLAN_HUB_TIMEOUT": "2.5", "MOEPLAN_HUB_DEADLINE": "3"}
    run = serve_and_run({"org/many-slow": repo}, *params("org/many-slow"), **limits)(tmp_path)
    line = one_line_error(run, "org/many-slow@main passed the 3 s that MOEPLAN_HUB_DEADLINE allows")
    assert f"of {len(shards)} shards were read" in line and len(shards) > 70
    assert run.wall_s < 3 + 3.0
    assert_nothing_outside_hf_home(tmp_path)


def test_timeout_settings_are_checked(tmp_path: Path) -> None:
    from moeplan.errors import HubError
    from moeplan.hub import _Limits

    bad = [("MOEPLAN_HUB_TIMEOUT", "soon"), ("MOEPLAN_HUB_DEADLINE", "-1"), ("MOEPLAN_HUB_TIMEOUT", "inf"),
           ("MOEPLAN_HUB_DEADLINE", "0"), ("MOEPLAN_HUB_TIMEOUT", "nan"), ("MOEPLAN_HUB_DEADLINE", "1e9")]  # fmt: skip
    for name, value in bad:
        with pytest.MonkeyPatch.context() as env:
            env.setenv(name, value)
            with pytest.raises(HubError, match=f"{name} must be a number of seconds above 0 and at most 86400"):
                _Limits.from_env()
    run = moeplan(None, tmp_path, *params("org/x"), env=env_in(DEAD, tmp_path, MOEPLAN_HUB_TIMEOUT="soon"))
    one_line_error(run, "MOEPLAN_HUB_TIMEOUT must be a number of seconds", "'soon'")


# ----------------------------------------------------------------------------------------------
# Bounded reads: huge bodies, a server that ignores Range
# ----------------------------------------------------------------------------------------------


def _served(repo: FakeRepo, model: str) -> Callable[[Path], tuple[Run, int]]:
    """A case that also says how many body bytes the server got out before the client hung up."""

    def case(tmp: Path) -> tuple[Run, int]:
        with hub_server({model: repo}) as hub:
            run = moeplan(hub, tmp, *params(model))
            time.sleep(0.3)  # the server notices the hang-up
            return run, sum(r.sent for r in hub.requests())

    return case


def test_huge_bodies_and_ignored_ranges_are_read_only_as_far_as_needed(tmp_path: Path) -> None:
    # A header of ~300 kB (so it takes two reads), served as the start of a 1 GiB body whatever Range asks.
    header = safetensors_header(TINY, metadata={"format": "pt", "pad": "x" * 300_000})
    no_range = Misbehave(ignore_range=True, length=GIB, prefix=header, fill=b"\0")
    config = b'{"model_type": "mixtral", "pad": "'

    def huge_config(send_length: bool) -> FakeRepo:
        how = Misbehave(length=300_000_000, prefix=config, fill=b"a", suffix=b'"}', send_length=send_length)
        return tiny_single(misbehave={"config.json": how})

    huge_index = Misbehave(length=GIB, prefix=b'{"weight_map": {"', fill=b"a", suffix=b'": "x.safetensors"}}',
                           send_length=False)  # fmt: skip
    # 12 shards whose headers each claim 24 MB (under the 25 MB cap of one) and are valid JSON ({ spaces }):
    # more than the 256 MiB all headers together may hold.
    fat = Misbehave(length=8 + 24_000_000, prefix=struct.pack("<Q", 24_000_000) + b"{", fill=b" ", suffix=b"}")
    shards = [f"model-{i:05d}-of-00012.safetensors" for i in range(1, 13)]
    fat_index = {"weight_map": {f"t{i}": name for i, name in enumerate(shards)}}
    fat_files = {"config.json": json.dumps(TINY_CONFIG).encode(),
                 "model.safetensors.index.json": json.dumps(fat_index).encode()}  # fmt: skip
    results = concurrently(tmp_path, {
        "range-ignored": _served(tiny_single(misbehave={"model.safetensors": no_range}), "org/no-range"),
        "config-300mb": _served(huge_config(True), "org/huge-config"),
        "config-300mb-no-length": _served(huge_config(False), "org/huge-config"),
        "index-1gib": _served(tiny_sharded(misbehave={"model.safetensors.index.json": huge_index}), "org/huge-index"),
        "headers-288mb": _served(FakeRepo(files=fat_files, misbehave=dict.fromkeys(shards, fat)), "org/fat-headers"),
    })  # fmt: skip

    run, sent = results["range-ignored"]
    data = ok(run)
    assert data["checkpoint"]["stored_params"] == TINY_TOTAL == data["total_params"]
    reads = [r for r in run.requests if r.path.endswith("/model.safetensors")]
    # Range ignored both times; the header again from byte 8 in the second read, which stops at its end
    assert sorted((r.range, r.status) for r in reads) == [("bytes=0-100000", 200), (f"bytes=8-{len(header) - 1}", 200)]
    assert sent < 64 * 2**20  # of 2 GiB offered (socket buffers aside)

    for case in ("config-300mb", "config-300mb-no-length"):
        run, sent = results[case]
        one_line_error(run, "config.json of org/huge-config@main is larger than 16,777,216 bytes (16 MiB)")
        assert sent < 64 * 2**20, (case, sent)

    run, _ = results["index-1gib"]
    one_line_error(run, "refusing model.safetensors.index.json of org/huge-index@main", "larger than 67,108,864 bytes")
    assert not any(n.startswith("model-") for n in names(run.requests))

    run, sent = results["headers-288mb"]
    one_line_error(run, "refusing the safetensors headers of org/fat-headers@main", "more than 268,435,456 bytes")
    assert sent < 300 * 2**20
    for case in results:
        assert_nothing_outside_hf_home(tmp_path / case)


# ----------------------------------------------------------------------------------------------
# Path and cache escape: revisions, ETags, commits, shard names, redirects
# ----------------------------------------------------------------------------------------------

BAD_REVISIONS = [
    "..", "../../..", "a/../../b", "x/..", "/etc/passwd", "a\\b", "a\nb", "a\x00b", "a\x1b[31mb", "a b",
    "x.lock", ".hidden", "a/.git", "a//b", "a/", "trailing.", "@{-1}", "a:b", "a?b", "a*b", "a[b", "~1", "a^b",
    "x" * 256, "ветка",
]  # fmt: skip
GOOD_REVISIONS = ["main", "v1.0", "refs/pr/1", "release-2024_01", "0123456789abcdef0123456789abcdef01234567"]


def test_revisions_follow_git_ref_rules() -> None:
    from moeplan.errors import HubError
    from moeplan.hub import parse_model_id

    for revision in GOOD_REVISIONS:
        assert parse_model_id(f"org/name@{revision}") == ("org/name", revision)
    for revision in BAD_REVISIONS:
        with pytest.raises(HubError, match="is not a revision of org/name moeplan reads") as info:
            parse_model_id(f"org/name@{revision}")
        assert not any(c in str(info.value) for c in "\n\x1b\x00"), info.value  # shown escaped, on one line


def test_repo_ids_follow_the_hub_rules() -> None:
    from moeplan.errors import HubError
    from moeplan.hub import parse_model_id

    for bad in ("org/x..y", "org/..", "org/-x", "org/x-", "org/x.git", "org--a/b", "org/ñame", "o/" + "x" * 95):
        with pytest.raises(HubError, match="is not a valid Hub repo id"):
            parse_model_id(bad)
    assert parse_model_id("Org_1/Name-2.5") == ("Org_1/Name-2.5", "main")


def test_hostile_revisions_on_the_command_line_are_refused_before_any_request(tmp_path: Path) -> None:
    revisions = {"dots": "../../..", "absolute": "/etc/passwd"}
    runs = concurrently(tmp_path, {
        case: serve_and_run({"org/tiny": tiny_single()}, *params(f"org/tiny@{revision}"))
        for case, revision in revisions.items()
    })  # fmt: skip
    for case, run in runs.items():
        one_line_error(run, "is not a revision of org/tiny moeplan reads")
        assert run.requests == [], case
        assert files_under(tmp_path / case / "hf") == [], case
        assert_nothing_outside_hf_home(tmp_path / case)


def _lies(tmp: Path) -> dict[str, tuple[str, str, str | None]]:
    """case: (file, header, value) a lying Hub sends, aimed at tmp/outside, outside HF_HOME."""
    up = "../../../../outside/pwned"  # from HF_HOME/hub/models--org--x/blobs, or moeplan's folder, to tmp
    return {
        "etag-relative": ("config.json", "ETag", f'"{up}"'),
        "etag-absolute": ("config.json", "ETag", f'"{tmp / "outside"}/etag"'),
        "etag-weak-dots": ("config.json", "ETag", 'W/".."'),
        "linked-etag": ("config.json", "X-Linked-Etag", str(tmp / "outside" / "linked")),
        "commit-relative": ("config.json", "X-Repo-Commit", up),
        "commit-absolute": ("config.json", "X-Repo-Commit", str(tmp / "outside" / "commit")),
        "commit-short": ("config.json", "X-Repo-Commit", "abc123"),
        "commit-not-hex": ("config.json", "X-Repo-Commit", "g" * 40),
        "commit-upper": ("config.json", "X-Repo-Commit", "A" * 40),
        "commit-on-header": ("model.safetensors", "X-Repo-Commit", up),
        "etag-on-header": ("model.safetensors", "ETag", f'"{up}"'),
        "etag-on-index": ("model.safetensors.index.json", "ETag", f'"{up}"'),
    }


def _written_for(hf: Path, repo_id: str) -> list[Path]:
    """What HF_HOME holds for one repo: moeplan's entries and huggingface_hub's cache folder."""
    org, name = repo_id.split("/")
    ours, theirs = hf / "assets" / "moeplan" / f"{org}--{name}", hf / "hub" / f"models--{org}--{name}"
    return files_under(ours) + files_under(theirs)


def test_hostile_etag_and_commit_values_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    tmp = tmp_path / "driver"
    lies = _lies(tmp)
    asked, other = "1" * 40, "2" * 40
    repos = {}
    for case, (file, header, value) in lies.items():
        lie = {file: Misbehave(headers={header: value})}
        repos[f"org/{case}"] = tiny_sharded(misbehave=lie) if "index" in file else tiny_single(misbehave=lie)
    # the Hub must answer the commit it was asked for, and say which it answers
    repos["org/other-commit"] = tiny_single(sha=asked, misbehave={"*": Misbehave(headers={"X-Repo-Commit": other})})
    repos["org/no-commit"] = tiny_single(misbehave={"config.json": Misbehave(headers={"X-Repo-Commit": None})})
    models = [*(f"org/{case}" for case in lies), f"org/other-commit@{asked}", "org/no-commit"]
    with hub_server(repos) as hub:
        outcomes = drive(hub, tmp, models)
        cli = moeplan(hub, tmp_path / "cli", *params("org/etag-relative"))
    for case, (file, header, _) in lies.items():
        message = refused(outcomes[f"org/{case}"], f"for {file} of org/{case}@main: {header} ", "nothing was written")
        assert message.startswith("refusing the answer of http://127.0.0.1:"), message
        written = _written_for(tmp / "hf", f"org/{case}")
        # nothing at all; or, when config.json was fine, its entry and no more
        assert written == [] or (file != "config.json" and not any("checkpoint" in p.name for p in written)), written
    refused(outcomes[f"org/other-commit@{asked}"], f"X-Repo-Commit {other} is not the commit {asked} that was asked")
    refused(outcomes["org/no-commit"], "cannot reach the Hub", "does not answer like the Hub", "not in the local cache")
    assert _written_for(tmp / "hf", "org/other-commit") == _written_for(tmp / "hf", "org/no-commit") == []
    assert not (tmp / "outside").exists()
    assert_nothing_outside_hf_home(tmp)
    one_line_error(cli, "refusing the answer of", "ETag '\"../../../../outside/pwned\"' is not a plain hash")
    assert_nothing_outside_hf_home(tmp_path / "cli")


def test_hostile_shard_names_in_the_index_are_refused_before_any_shard_is_asked_for(tmp_path: Path) -> None:
    shards: dict[str, Any] = {
        "parent": "../x.safetensors", "other-repo": "../../other/repo/resolve/main/model.safetensors",
        "absolute": "/abs.safetensors", "backslash": "a\\b.safetensors", "inner-dots": "sub/../x.safetensors",
        "dot": "./x.safetensors", "percent": "%2e%2e/x.safetensors", "not-safetensors": "x.bin",
        "newline": "x\n.safetensors", "number": 5, "empty-map": None,
    }  # fmt: skip

    def repo(shard: Any) -> FakeRepo:
        out = tiny_sharded()
        index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": shard} if shard is not None else {}}
        out.files["model.safetensors.index.json"] = json.dumps(index).encode()
        return out

    with hub_server({f"org/{case}": repo(shard) for case, shard in shards.items()}) as hub:
        outcomes = drive(hub, tmp_path / "driver", [f"org/{case}" for case in shards])
        cli = moeplan(hub, tmp_path / "cli", *params("org/other-repo"))
    for case in shards:
        needle = "not a JSON object with a non-empty weight_map" if case == "empty-map" else "it names the shard"
        refused(outcomes[f"org/{case}"], f"refusing model.safetensors.index.json of org/{case}@main: ", needle)
        assert not any(n.startswith("model-") for n in names(outcomes[f"org/{case}"]["requests"])), case
    assert_nothing_outside_hf_home(tmp_path / "driver")
    one_line_error(cli, "it names the shard '../../other/repo/resolve/main/model.safetensors'")


def test_redirects_keep_the_token_on_the_hub_and_bad_ones_are_refused(tmp_path: Path) -> None:
    def token_case(tmp: Path) -> tuple[Run, list[Request]]:
        """A redirect to another host (a CDN) gets no Authorization; one on the Hub's own origin does."""
        repo = tiny_sharded()
        first, second = sorted(n for n in repo.files if n.startswith("model-"))
        with hub_server({}, static={f"/cdn/{first}": repo.files[first]}) as cdn:
            repo.misbehave[first] = Misbehave(redirect=f"{cdn.endpoint}/cdn/{first}")
            repo.misbehave[second] = Misbehave(redirect=f"/same-origin/{second}")
            with hub_server({"org/cdn": repo}, static={f"/same-origin/{second}": repo.files[second]}) as hub:
                run = moeplan(hub, tmp, *params("org/cdn"), env=env_in(hub, tmp, HF_TOKEN="hf_secret"))
                return run, cdn.requests()

    bad = {"loop": ("/org/loop/resolve/main/model.safetensors", "more than 5 times"),
           "file-scheme": ("file:///etc/passwd", "not an http(s) URL"),
           "bad-port": ("http://127.0.0.1:notaport/x", "malformed")}  # fmt: skip
    results = concurrently(tmp_path, {
        "token": token_case,
        **{case: serve_and_run({"org/loop": tiny_single(misbehave={"model.safetensors": Misbehave(redirect=target)})},
                               *params("org/loop"))
           for case, (target, _) in bad.items()},
    })  # fmt: skip
    run, cdn_seen = results["token"]
    assert ok(run)["checkpoint"]["stored_params"] == TINY_TOTAL
    assert {r.token for r in run.requests} == {"hf_secret"}  # the Hub, its own redirect target included
    assert any(r.path.startswith("/same-origin/") for r in run.requests)
    assert cdn_seen and {r.token for r in cdn_seen} == {None}  # never to another host
    assert all(r.range == "bytes=0-100000" for r in cdn_seen)  # the range follows the redirect
    for case, (_, needle) in bad.items():
        one_line_error(results[case], needle, "model.safetensors of org/loop@main")


# ----------------------------------------------------------------------------------------------
# Work that grows without bound: the shard count
# ----------------------------------------------------------------------------------------------


def test_3000_shards_are_refused_with_the_limit_named(tmp_path: Path) -> None:
    weight_map = {f"t{i}": f"model-{i + 1:05d}-of-03000.safetensors" for i in range(3000)}
    files = {"config.json": json.dumps(TINY_CONFIG).encode(),
             "model.safetensors.index.json": json.dumps({"weight_map": weight_map}).encode()}  # fmt: skip
    run = serve_and_run({"org/3000-shards": FakeRepo(files=files)}, *params("org/3000-shards"))(tmp_path)
    one_line_error(run, "it names 3,000 safetensors shards, more than the 2,000 moeplan reads")
    assert sorted(names(run.requests)) == ["config.json", "model.safetensors", "model.safetensors.index.json"]


# ----------------------------------------------------------------------------------------------
# The local cache: by commit, used without the Hub (and saying so), never trusted when damaged
# ----------------------------------------------------------------------------------------------


@dataclass
class Warm:
    hub: HubServer
    hf_home: Path  # a cache filled by one online run of org/tiny
    online: dict[str, Any]
    commit: str

    def folder(self, hf: Path) -> Path:
        return hf / "assets" / "moeplan" / "org--tiny"

    def entry(self, hf: Path, kind: str = "checkpoint") -> Path:
        return self.folder(hf) / self.commit / f"{kind}.json.entry"

    def copy(self, tmp: Path) -> Path:
        shutil.copytree(self.hf_home, tmp / "hf")
        return tmp / "hf"

    def run(self, tmp: Path, *args: str, **env: str) -> Run:
        return moeplan(self.hub, tmp, *(args or params("org/tiny")), env=env_in(self.hub, tmp, **env))


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Warm]:
    repo = tiny_sharded(shards=2)
    tmp = tmp_path_factory.mktemp("warm")
    with hub_server({"org/tiny": repo}) as hub:
        online = ok(moeplan(hub, tmp, *params("org/tiny")))
        yield Warm(hub, tmp / "hf", online, repo.sha)


def test_cache_entries_are_written_whole_and_keyed_by_commit(warm: Warm) -> None:
    files = files_under(warm.hf_home)
    rel = sorted(str(p.relative_to(warm.folder(warm.hf_home))) for p in files)
    assert rel == [f"{warm.commit}/checkpoint.json.entry", f"{warm.commit}/config.json.entry", "refs/main"]
    entry = json.loads(warm.entry(warm.hf_home).read_text())
    assert (entry["repo_id"], entry["commit"], entry["kind"]) == ("org/tiny", warm.commit, "checkpoint")
    assert "stored tensors" not in json.dumps(entry)  # numbers only: the notes are made again on every run


def test_later_runs_read_no_headers_and_say_when_the_cache_stood_in(warm: Warm, tmp_path: Path) -> None:
    def again(tmp: Path) -> tuple[Run, Run]:
        warm.copy(tmp)
        return warm.run(tmp), warm.run(tmp, *params(f"org/tiny@{warm.commit}"))

    def without_hub(tmp: Path) -> tuple[Run, Run]:
        warm.copy(tmp)
        down = moeplan(None, tmp, "params", "org/tiny", env=env_in(DEAD, tmp))
        return down, warm.run(tmp, HF_HUB_OFFLINE="1")

    # One after the other, not concurrently: both ask the one warm Hub, and a run's `requests` are all
    # the Hub saw while it ran, so the online run's config.json request landed in the offline run's
    # window now and then (a flaky failure of `offline.requests == []`, not a request the offline run made).
    results = {case: fn(tmp_path / case) for case, fn in {"again": again, "without-hub": without_hub}.items()}
    branch, at_commit = results["again"]
    assert ok(branch) == warm.online
    assert names(branch.requests) == ["config.json"]  # the branch is resolved; the headers come from the cache
    assert ok(at_commit)["checkpoint"] == warm.online["checkpoint"]
    assert at_commit.requests == []  # a commit's files never change: nothing to ask

    down, offline = results["without-hub"]
    assert down.returncode == 0, down.stderr
    text = " ".join(down.stdout.split())  # the text output, as rich wraps it
    assert "safetensors headers from moeplan's cache of commit" in text
    assert "not read again from the Hub: cannot reach the Hub at http://127.0.0.1:9 (connection refused)" in text
    note, *rest = ok(offline)["checkpoint"]["explanation"]
    assert note.endswith("not read again from the Hub: HF_HUB_OFFLINE is set") and rest == \
        warm.online["checkpoint"]["explanation"]  # fmt: skip
    assert offline.requests == []


def test_a_cached_config_without_cached_headers_is_said_on_stderr(warm: Warm, tmp_path: Path) -> None:
    hf = warm.copy(tmp_path)
    warm.entry(hf).unlink()  # the config is cached, the headers' summary is not
    run = warm.run(tmp_path, HF_HUB_OFFLINE="1")
    assert run.returncode == 0, run.stderr
    assert "checkpoint" not in run.json() or run.json()["checkpoint"] is None  # sizes from the config alone
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("note: config.json of org/tiny@main")
    assert "from the local cache (HF_HUB_OFFLINE is set)" in run.stderr
    assert "no safetensors headers cached" in run.stderr
    assert run.requests == []


def _rewrite(path: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    """Change the entry's JSON and fix its checksum: a consistent-looking forgery of one field."""
    entry = json.loads(path.read_text())
    change(entry)
    body = {k: v for k, v in entry.items() if k != "sha256"}
    entry["sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    path.write_text(json.dumps(entry))


def _edit(path: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    """Change the entry's JSON and leave its checksum as it was."""
    entry = json.loads(path.read_text())
    change(entry)
    path.write_text(json.dumps(entry))


def _replace(path: Path, kind: str) -> None:
    path.unlink()
    os.mkfifo(path) if kind == "fifo" else path.mkdir()


TAMPERS: dict[str, Callable[[Path], Any]] = {
    "garbage": lambda p: p.write_bytes(b"\x00\xff not json at all"),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "wrong-schema": lambda p: _rewrite(p, lambda e: e.update(summary={"total": "lots"})),
    "edited-number": lambda p: _edit(p, lambda e: e["summary"].update(total_bytes=e["summary"]["total_bytes"] + 1)),
    "other-commit": lambda p: _rewrite(p, lambda e: e.update(commit="f" * 40)),
    "other-repo": lambda p: _rewrite(p, lambda e: e.update(repo_id="org/other")),
    "other-config": lambda p: _rewrite(p, lambda e: e.update(config_sha256="0" * 64)),
    "duplicate-rows": lambda p: _rewrite(p, lambda e: e["summary"]["elements"].append(e["summary"]["elements"][0])),
    "negative": lambda p: _rewrite(p, lambda e: e["summary"].update(total_bytes=-5)),
    "fifo": lambda p: _replace(p, "fifo"),
    "directory": lambda p: _replace(p, "dir"),
    "huge": lambda p: p.write_bytes(b" " * 5_000_000),
}


@dataclass
class WarmMany:
    """One warm cache holding a copy of org/tiny per tamper (org/t-<tamper>), for the driver."""

    hub: HubServer
    hf_home: Path
    online: dict[str, dict[str, Any]]  # model -> what spec_from_hub gave online

    def entry(self, hf: Path, model: str, kind: str = "checkpoint") -> Path:
        folder = hf / "assets" / "moeplan" / model.replace("/", "--")
        (commit,) = [p.name for p in folder.iterdir() if p.name != "refs"]
        return folder / commit / f"{kind}.json.entry"


@pytest.fixture(scope="module")
def warm_many(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WarmMany]:
    tmp = tmp_path_factory.mktemp("warm-many")
    models = [f"org/t-{name}" for name in TAMPERS]
    with hub_server({model: tiny_sharded() for model in models}) as hub:
        online = drive(hub, tmp, models)
        yield WarmMany(hub, tmp / "hf", online)


def test_a_damaged_cache_entry_is_refused_offline(warm_many: WarmMany, tmp_path: Path) -> None:
    hf = shutil.copytree(warm_many.hf_home, tmp_path / "hf")
    for name, tamper in TAMPERS.items():
        tamper(warm_many.entry(hf, f"org/t-{name}"))
    outcomes = drive(warm_many.hub, tmp_path, list(warm_many.online), HF_HUB_OFFLINE="1")
    for model, outcome in outcomes.items():
        head = f"moeplan's cached summary of the safetensors headers of {model}@main"
        refused(outcome, head, "checkpoint.json.entry", "cannot be used, and HF_HUB_OFFLINE is set")
        assert outcome["requests"] == [], model
    # and through the CLI: one line, exit 2
    one_line_error(moeplan(warm_many.hub, tmp_path, *params("org/t-garbage"),
                           env=env_in(warm_many.hub, tmp_path, HF_HUB_OFFLINE="1")),  # fmt: skip
                   "cached summary of the safetensors headers of org/t-garbage@main", "is damaged or from another")


def test_a_damaged_cache_entry_is_read_again_online(warm_many: WarmMany, tmp_path: Path) -> None:
    hf = shutil.copytree(warm_many.hf_home, tmp_path / "hf")
    for name, tamper in TAMPERS.items():
        tamper(warm_many.entry(hf, f"org/t-{name}"))
    models = list(warm_many.online)
    online = drive(warm_many.hub, tmp_path, models)
    offline = drive(warm_many.hub, tmp_path, models, HF_HUB_OFFLINE="1")
    for model in models:
        want = warm_many.online[model]["checkpoint"]
        assert online[model]["checkpoint"] == want, model  # the Hub's answer, not the damaged entry
        assert any(n.endswith(".safetensors") for n in names(online[model]["requests"])), model  # read again
        if model in ("org/t-fifo", "org/t-directory"):
            continue  # not replaced (a rename does not go over them); never waited on nor trusted
        note, *rest = offline[model]["checkpoint"]["notes"]  # the entry was written anew
        assert rest == list(want["notes"]) and "HF_HUB_OFFLINE" in note, model


def test_a_damaged_config_entry_or_ref_is_not_used(warm: Warm, tmp_path: Path) -> None:
    def config(tmp: Path) -> Run:
        entry = warm.entry(warm.copy(tmp), "config")
        _edit(entry, lambda e: e.update(config=e["config"].replace('"hidden_size": 64', '"hidden_size": 16')))
        return warm.run(tmp, HF_HUB_OFFLINE="1")

    def ref(tmp: Path) -> Run:
        (warm.folder(warm.copy(tmp)) / "refs" / "main").write_text("../../../outside")
        return warm.run(tmp, HF_HUB_OFFLINE="1")

    runs = concurrently(tmp_path, {"config": config, "ref": ref})
    head = "HF_HUB_OFFLINE is set, and config.json of org/tiny@main is not in the local cache"
    one_line_error(runs["config"], head, "config.json.entry does not match its checksum")
    one_line_error(runs["ref"], head, "refs/main is damaged (not a commit)")
    for case in runs:
        assert_nothing_outside_hf_home(tmp_path / case)


# ----------------------------------------------------------------------------------------------
# What already held, and must keep holding
# ----------------------------------------------------------------------------------------------


def test_offline_asks_nothing_and_no_code_is_ever_read(tmp_path: Path) -> None:
    code_repo = tiny_sharded()
    code_repo.files["modeling_tiny.py"] = b"raise SystemExit('remote code ran')\n"  # what the config's auto_map names
    runs = concurrently(tmp_path, {
        "offline": serve_and_run({"org/tiny": tiny_single()}, *params("org/tiny"), HF_HUB_OFFLINE="1"),
        "card": serve_and_run({"org/tiny": code_repo}, "card", "org/tiny"),
    })  # fmt: skip
    one_line_error(runs["offline"], "HF_HUB_OFFLINE is set, and config.json of org/tiny@main is not in the local cache")
    assert runs["offline"].requests == []
    card = runs["card"]
    assert card.returncode == 0, card.stderr
    assert "auto_map" not in card.stdout
    shards = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert set(names(card.requests)) == {"config.json", "model.safetensors", "model.safetensors.index.json", *shards}


def test_summary_refuses_offsets_that_do_not_match_the_shape() -> None:
    from moeplan.errors import HubError
    from moeplan.hub import summarize_headers
    from moeplan.spec import spec_from_config

    spec = spec_from_config(TINY_CONFIG, name="t")
    good = {"x.safetensors": {"t": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}}
    assert summarize_headers(good, spec).total_bytes == 24
    for bad in (
        {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 23]},  # 6 x 4 is 24 bytes (safetensors validate)
        {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]},  # 2^80 elements
        {"dtype": "[red]x", "shape": [1], "data_offsets": [0, 1]},  # not a dtype name
        {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]},
        {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
        "F32",
    ):
        with pytest.raises(HubError, match="malformed") as info:
            summarize_headers({"x.safetensors": {"t\nname": bad}}, spec)
        assert "\n" not in str(info.value)

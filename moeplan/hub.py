"""Any model on the Hugging Face Hub, from its config.json and safetensors headers, never its weights.

Imported only when MODEL is a Hub id (`org/name` or `org/name@revision`), so planning from a bundled
card never imports huggingface_hub. huggingface_hub gives the endpoint (HF_ENDPOINT), the token
(HF_TOKEN or `hf auth login`), the cache root (HF_HOME) and offline mode (HF_HUB_OFFLINE); the HTTP
requests are made here, with the standard library, so that every limit below holds whatever the
server does and whichever HTTP stack huggingface_hub has (requests in 0.x, httpx in 1.x, httpx2 in
2.x), and so that nothing the server says becomes a file name before it is checked. Proxies come
from HTTP(S)_PROXY / NO_PROXY as urllib reads them (http:// proxies only); TLS is verified against the
system's certificates and certifi's.

What is read:
  * config.json: GET {endpoint}/{repo}/resolve/{revision}/config.json, at most CONFIG_MAX_BYTES.
    Only its JSON values are read: `auto_map` and remote code are never looked at, let alone run.
  * the safetensors headers: the first bytes of model.safetensors (a range request), else of each
    shard that model.safetensors.index.json names, at the commit config.json was read at.
    Safetensors format (https://huggingface.co/docs/safetensors/index#format): 8 bytes little-endian
    u64 N, then N bytes of JSON {tensor name: {dtype, shape, data_offsets: [begin, end]}}, then data.

What is written: moeplan's own entries in huggingface_hub's assets cache,
HF_ASSETS_CACHE/moeplan/{org}--{name}/ (HF_HOME/assets by default): {commit}/config.json.entry,
{commit}/checkpoint.json.entry (the headers summarised, so a later run makes no header requests and
works offline) and refs/{revision} (the commit a branch or tag pointed at). Paths are built from
validated names only; each file is written to a temp file and renamed. huggingface_hub's own cache
(HF_HOME/hub) is only read, as a fallback for config.json when the Hub cannot be reached.

Every failure becomes one HubError (or ConfigError) line that says what to do; the CLI exits 2.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import http.client
import itertools
import json
import math
import os
import re
import socket
import ssl
import stat
import struct
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moeplan.errors import ConfigError, HubError

try:  # huggingface_hub reads HF_ENDPOINT and friends as it is imported
    from huggingface_hub import constants
except ValueError as exc:  # HF_ENDPOINT='http://[::1': a URL Python cannot parse
    raise HubError(f"huggingface_hub cannot start with this environment ({exc}): check HF_ENDPOINT and HF_HOME") from None
from moeplan.params import count_params, fmt_billions
from moeplan.hf_config import spec_from_config
from moeplan.spec import ModelSpec, StoredCheckpoint

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"  # transformers' SAFE_WEIGHTS_NAME, tried before the index
INDEX_FILE = "model.safetensors.index.json"  # transformers' SAFE_WEIGHTS_INDEX_NAME
DEFAULT_REVISION = "main"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")  # a git SHA-1, lowercase, as the Hub writes X-Repo-Commit
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_CACHE_LIBRARY = "moeplan"
_CACHE_VERSION = 2  # bump when an entry's schema, _Tally or the note wording changes

# ----------------------------------------------------------------------------------------------
# Limits. A lying or slow server must end in one line, in bounded time and memory.
# ----------------------------------------------------------------------------------------------

# Real config.json files are a few kB (Mixtral-8x7B's about 1 kB, DeepSeek-V3's about 2 kB);
# transformers reads them whole without a cap. 16 MiB leaves a thousandfold margin.
CONFIG_MAX_BYTES = 16 * 2**20
# DeepSeek-V3's index names about 92k tensors in 163 shards, about 9 MB of JSON; the largest index we
# know. 64 MiB leaves a sevenfold margin.
INDEX_MAX_BYTES = 64 * 2**20
# huggingface_hub refuses a header longer than constants.SAFETENSORS_MAX_HEADER_LENGTH (25,000,000
# in 0.2x to 2.x) before asking for it; the safetensors format itself allows 100,000,000 (crate
# safetensors src/tensor.rs MAX_HEADER_SIZE). Ours is huggingface_hub's.
HEADER_MAX_BYTES = 25_000_000
# All headers together: DeepSeek-V3's 163 headers hold about 10 MB (one entry per tensor, like its
# index). 256 MiB bounds what 2,000 shards at the per-header cap could make moeplan read (50 GB).
HEADERS_TOTAL_MAX_BYTES = 256 * 2**20
# The largest real checkpoints have a few hundred shards (DeepSeek-V3 163, Llama-3.1-405B 191);
# each shard costs one or two range requests.
MAX_SHARDS = 2_000
# The first read of a header: the first 100,001 bytes, as huggingface_hub's
# parse_safetensors_file_metadata asks (`Range: bytes=0-100000`); a longer header takes a second read.
_FIRST_READ = 100_001
# The Hub answers a resolve with one or two redirects (to /api/resolve-cache, to its CDN); requests
# and httpx follow up to 30 and 20.
_MAX_REDIRECTS = 5
# Hops of one fetch: config.json, the single-file probe, the index and two reads per shard, each
# through one redirect (the Hub to its CDN). A backstop: MAX_SHARDS already bounds it.
_MAX_REQUESTS = (3 + 2 * MAX_SHARDS) * 2
# Header reads at a time. huggingface_hub's get_safetensors_metadata uses min(32, CPUs + 4); 8 hides
# the latency of DeepSeek-V3's 163 shards. Each header is parsed, summed and dropped as it arrives;
# what waits to be parsed is bounded by HEADERS_TOTAL_MAX_BYTES.
_WORKERS = 8
_CHUNK = 64 * 2**10
_WATCH_INTERVAL_S = 0.05  # how often the watchdog looks for requests past their time

# Times, in seconds, changeable for slow links and for tests. huggingface_hub's HF_HUB_DOWNLOAD_TIMEOUT
# (10 s) bounds one socket read, so a server that sends a byte every 2 s is never cut off; these bound
# a whole request (connect to last byte) and the whole fetch (config.json and every header).
TIMEOUT_ENV, DEADLINE_ENV = "MOEPLAN_HUB_TIMEOUT", "MOEPLAN_HUB_DEADLINE"
DEFAULT_TIMEOUT_S = 30.0  # a 9 MB index at 3 Mbit/s
DEFAULT_DEADLINE_S = 120.0  # DeepSeek-V3's 163 headers and index take a few seconds on a home link

# Error codes the Hub sends in X-Error-Code (huggingface_hub utils/_http.py hf_raise_for_status).
_HUB_ERROR_CODES = frozenset({"RepoNotFound", "GatedRepo", "RevisionNotFound", "EntryNotFound"})
# An ETag the Hub gives is a git blob SHA-1 (40 hex) or, for LFS files, a SHA-256 (64 hex);
# huggingface_hub names its cache blobs after it (file_download.py: blobs/{etag}). Accepted: one plain
# name of letters, digits and ._- that starts with a letter or digit (never /, \ or ..).
_ETAG = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._\-]{0,127}$")


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------


def parse_model_id(model: str) -> tuple[str, str]:
    """'org/name@rev' -> ('org/name', 'rev'); the revision defaults to main. Refuses names unsafe in URLs or paths."""
    text = model.strip()
    repo_id, at, revision = text.partition("@")
    if not _HUB_ID.match(repo_id) or (at and not revision):
        raise HubError(f"{_shown(text)} is not a Hub id: write org/name or org/name@revision")
    _check_repo_id(repo_id)
    if at:
        _check_revision(repo_id, revision)
    return repo_id, revision or DEFAULT_REVISION


# Marks a spec whose config.json came from a local cache: `ModelSpec.source` says so, and the CLI says
# it on stderr when no cached headers note does it in the output (moeplan.cli.resolve_model).
FROM_CACHE = " from the local cache"


def spec_from_hub(model: str) -> ModelSpec:
    """The ModelSpec of a Hub model, with `checkpoint` filled from its safetensors headers when it has any."""
    return _load(model)[0]


def card_yaml_from_hub(model: str) -> str:
    """A model card for model_cards/ (format: moeplan.sources docstring) built from the Hub config.json.

    `sources.spec_from_card_data(yaml.safe_load(text), ...)` gives the same counts as `spec_from_hub`.
    """
    spec, fetched = _load(model)  # also checks that the config is one moeplan can plan
    repo_id = fetched.repo_id
    count = count_params(spec)
    header = [
        f"# {repo_id}: {spec.model_type} (written by `moeplan card` from config.json)",
        f"# counted from the config: {count.total_params:,} total, {count.active_params:,} active per token",
    ]
    if spec.checkpoint is not None:
        header.append(
            f"# safetensors headers: {spec.checkpoint.total_params:,} elements stored in "
            f"{spec.checkpoint.num_files} file(s)"
        )
        header += [f"#   {note}" for note in spec.checkpoint.notes]
    body = {
        "name": repo_id.rsplit("/", 1)[1].lower(),
        "hub_id": repo_id,
        "aliases": [],
        "source": fetched.source,
        # auto_map names remote code; a card never needs it and moeplan never runs it.
        "config": {key: value for key, value in fetched.raw.items() if key != "auto_map"},
    }
    text = yaml.safe_dump(body, sort_keys=False, default_flow_style=False, allow_unicode=True, width=100)
    return "\n".join(header) + "\n" + text


def _load(model: str) -> tuple[ModelSpec, _Fetched]:
    repo_id, revision = parse_model_id(model)
    limits = _Limits.from_env()  # a bad value is one line before any request
    with _Session.open(limits) as session:
        fetched = _fetch_config(session, repo_id, revision)
        spec = spec_from_config(fetched.raw, name=model.strip(), hub_id=repo_id, source=fetched.source)
        checkpoint = _read_checkpoint(session, fetched, spec)
    return (spec.model_copy(update={"checkpoint": checkpoint}) if checkpoint is not None else spec), fetched


# ----------------------------------------------------------------------------------------------
# Names: what the user and the Hub give, checked before it reaches a URL or a path
# ----------------------------------------------------------------------------------------------


def _shown(value: str, limit: int = 80) -> str:
    """A value from the user or a server as one printable line: quoted, escaped, cut to `limit`."""
    return ascii(value if len(value) <= limit else value[:limit] + "...")


def _check_repo_id(repo_id: str) -> None:
    """The Hub's rules (huggingface_hub utils/_validators.py validate_repo_id), ASCII only."""
    org, name = repo_id.split("/")
    problem = None
    if len(repo_id) > 96 or not repo_id.isascii():
        problem = "at most 96 ASCII characters"
    elif "--" in repo_id or ".." in repo_id:
        problem = "'--' and '..' are not allowed"
    elif any(not (part[0].isalnum() or part[0] == "_") or not (part[-1].isalnum() or part[-1] == "_")
             for part in (org, name)):  # fmt: skip
        problem = "each part starts and ends with a letter, digit or '_'"
    elif name.endswith(".git"):
        problem = "it cannot end with '.git'"
    if problem:
        raise HubError(f"{_shown(repo_id)} is not a valid Hub repo id ({problem}): write org/name as the Hub shows it")


_REVISION_CHARS = re.compile(r"^[A-Za-z0-9._\-/]+$")
_MAX_REVISION = 255  # git has no limit but a file system does: refs are files, a name is at most 255 bytes


def _check_revision(repo_id: str, revision: str) -> None:
    """A branch, tag or commit: git check-ref-format(1) rules, loosely, and ASCII letters, digits, ._-/ only.

    The revision becomes part of URLs and of cache paths (huggingface_hub writes refs/{revision}), so
    `..`, absolute paths, backslashes and control characters are refused before any request.
    """
    parts = revision.split("/")
    problem = None
    if len(revision) > _MAX_REVISION:
        problem = f"longer than {_MAX_REVISION} characters"
    elif not _REVISION_CHARS.match(revision):
        problem = "only ASCII letters, digits, '.', '_', '-' and '/' are allowed"
    elif ".." in revision:
        problem = "'..' is not allowed"
    elif any(not part for part in parts):
        problem = "it cannot start or end with '/' or contain '//'"
    elif any(part.startswith(".") or part.endswith((".lock", ".")) for part in parts):
        problem = "no part may start or end with '.' or end with '.lock'"
    if problem:
        raise HubError(
            f"{_shown(revision)} is not a revision of {repo_id} moeplan reads ({problem}): give a branch, tag "
            f"or commit, e.g. {repo_id}@main"
        )


def _check_shard_name(name: Any, label: str) -> str:
    """A file name from the index: a relative path of plain parts ending in .safetensors (it goes into URLs)."""
    ok = (
        isinstance(name, str)
        and len(name) <= 255
        and name.endswith(".safetensors")
        and bool(_REVISION_CHARS.match(name))
        and all(part and part not in (".", "..") for part in name.split("/"))
    )
    if not ok:
        raise HubError(
            f"refusing {INDEX_FILE} of {label}: it names the shard {_shown(str(name))}, not a relative "
            "*.safetensors path of letters, digits and ._-/; pass a local config.json to plan without the headers"
        )
    return str(name)


def _resolve_url(repo_id: str, revision: str, filename: str) -> str:
    # huggingface_hub file_download.hf_hub_url: the revision quoted whole (refs/pr/1 -> refs%2Fpr%2F1).
    return f"{constants.ENDPOINT}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"


# ----------------------------------------------------------------------------------------------
# HTTP: one session per fetch, with a deadline per request and for the whole fetch
# ----------------------------------------------------------------------------------------------


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= 86_400):
        raise HubError(f"{name} must be a number of seconds above 0 and at most 86400, got {_shown(text)}")
    return value


@dataclass(frozen=True)
class _Limits:
    timeout_s: float  # one HTTP request, connect to last byte
    deadline_s: float  # the whole fetch: config.json, the index and every header

    @classmethod
    def from_env(cls) -> _Limits:
        return cls(_env_seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S), _env_seconds(DEADLINE_ENV, DEFAULT_DEADLINE_S))


class _Unreachable(Exception):
    """The Hub could not be read (network, timeout, 5xx, not the Hub): a cached copy may stand in."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _TimedOut(_Unreachable):
    pass


@dataclass
class _Reply:
    status: int
    body: bytes | bytearray  # 2xx only: at most what was asked for
    too_long: bool = False  # the body went on past max_bytes; the rest was not read
    error_code: str | None = None  # X-Error-Code, when it is one the Hub sends
    commit: str | None = None  # X-Repo-Commit from the Hub's own answers, checked


class _Live:
    """One request in flight, for the watchdog: its connection and the time it must end by."""

    def __init__(self, conn: http.client.HTTPConnection, deadline: float, limit: str) -> None:
        self.conn, self.deadline, self.limit = conn, deadline, limit
        self.expired = False

    def expire(self) -> None:
        # shutdown() wakes a recv() blocked in another thread, which close() alone does not (Linux).
        self.expired = True
        sock = self.conn.sock
        if sock is not None:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


class _Session:
    """The HTTP of one fetch. Sends the token only to HF_ENDPOINT's own origin, follows at most
    _MAX_REDIRECTS redirects, reads bounded bodies, and ends each request by its own deadline or
    the fetch's, whichever comes first: a watchdog thread shuts the socket of a request past its time.
    """

    def __init__(self, limits: _Limits) -> None:
        self.limits = limits
        self.endpoint = constants.ENDPOINT
        self.deadline = time.monotonic() + limits.deadline_s
        self.header_bytes = 0
        self.requests = 0
        self._hub = _origin(self.endpoint)
        self._lock = threading.Lock()
        self._live: dict[int, _Live] = {}
        self._closed = threading.Event()
        self._aborted = False
        self._watchdog: threading.Thread | None = None
        self._headers: tuple[dict[str, str], dict[str, str]] | None = None  # (to the Hub, elsewhere)
        self._tls: ssl.SSLContext | None = None

    @classmethod
    @contextmanager
    def open(cls, limits: _Limits) -> Iterator[_Session]:
        session = cls(limits)
        try:
            yield session
        finally:
            session.close()

    def close(self) -> None:
        self.abort()
        self._closed.set()

    def abort(self) -> None:
        """End every request in flight now (a sibling failed, or the user pressed Ctrl-C)."""
        with self._lock:
            self._aborted = True
            live = list(self._live.values())
        for entry in live:
            entry.expire()

    def charge_header(self, size: int, label: str) -> None:
        with self._lock:
            self.header_bytes += size
            total = self.header_bytes
        if total > HEADERS_TOTAL_MAX_BYTES:
            raise HubError(
                f"refusing the safetensors headers of {label}: together they claim more than "
                f"{HEADERS_TOTAL_MAX_BYTES:,} bytes, the most moeplan reads (real checkpoints hold a few MB); "
                "pass a local config.json to plan without them"
            )

    # -- the watchdog ------------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._closed.wait(_WATCH_INTERVAL_S):
            now = time.monotonic()
            with self._lock:
                due = [e for e in self._live.values() if self._aborted or e.deadline <= now]
            for entry in due:  # again on every tick: a socket made after the first expire() is shut too
                entry.expire()

    def _track(self, conn: http.client.HTTPConnection) -> _Live:
        now = time.monotonic()
        own = now + self.limits.timeout_s
        deadline, limit = (own, TIMEOUT_ENV) if own <= self.deadline else (self.deadline, DEADLINE_ENV)
        entry = _Live(conn, deadline, limit)
        with self._lock:
            if self._aborted:
                raise _Unreachable("stopped")
            self.requests += 1
            if self.requests > _MAX_REQUESTS:
                raise HubError(f"refusing to make more than {_MAX_REQUESTS:,} requests to {self.endpoint} in one read")
            self._live[id(entry)] = entry
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name="moeplan-hub-watchdog", daemon=True)
                self._watchdog.start()
        return entry

    def _untrack(self, entry: _Live) -> None:
        with self._lock:
            self._live.pop(id(entry), None)
        with suppress(Exception):
            entry.conn.close()

    def _timed_out(self, entry: _Live, what: str, label: str) -> _TimedOut:
        if entry.limit == TIMEOUT_ENV:
            return _TimedOut(
                f"no complete answer for {what} of {label} within {self.limits.timeout_s:g} s, the limit "
                f"{TIMEOUT_ENV} sets for one request"
            )
        return _TimedOut(
            f"reading {what} of {label} passed the {self.limits.deadline_s:g} s that {DEADLINE_ENV} allows "
            "a whole read of config.json and the headers"
        )

    def _check(self, entry: _Live, what: str, label: str) -> None:
        if entry.expired or time.monotonic() >= entry.deadline:
            raise self._timed_out(entry, what, label)

    # -- one request -------------------------------------------------------------------------------

    def _base_headers(self) -> tuple[dict[str, str], dict[str, str]]:
        if self._headers is None:
            from huggingface_hub.utils import build_hf_headers  # token (HF_TOKEN, `hf auth login`), user agent

            built = {k.lower(): v for k, v in build_hf_headers().items()}
            if not all(v.isascii() and v.isprintable() for v in built.values()):  # a header cannot hold them
                raise HubError(
                    "HF_TOKEN (or the saved token) holds characters no token has (a newline, a non-ASCII letter): "
                    "set it again from https://huggingface.co/settings/tokens"
                )
            agent = {"user-agent": built.get("user-agent", "moeplan")}
            hub = {**agent, **({"authorization": built["authorization"]} if "authorization" in built else {})}
            self._headers = (hub, agent)  # elsewhere (a CDN a redirect points to): never the token
        return self._headers

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            context = ssl.create_default_context()
            with suppress(ImportError, OSError):  # requests and httpx verify with certifi's bundle: accept it too
                import certifi

                context.load_verify_locations(certifi.where())
            self._tls = context
        return self._tls

    def _connection(self, url: str, timeout: float) -> tuple[http.client.HTTPConnection, str, dict[str, str]]:
        """A connection for url (through the proxy the environment names for it), the request target, extra headers."""
        parts = urlsplit(url)
        scheme, host, port = _origin(url)
        target = urlunsplit(("", "", parts.path or "/", parts.query, ""))
        proxy = None if urllib.request.proxy_bypass(host) else urllib.request.getproxies().get(scheme)
        if not proxy:
            if scheme == "https":
                return http.client.HTTPSConnection(host, port, timeout=timeout, context=self._tls_context()), target, {}
            return http.client.HTTPConnection(host, port, timeout=timeout), target, {}
        try:
            proxy_parts = urlsplit(proxy if "://" in proxy else "http://" + proxy)
            proxy_host = proxy_parts.hostname
        except ValueError:  # HTTPS_PROXY='http://[bad': not a URL at all
            raise HubError(f"the {scheme} proxy in the environment is not a URL: set HTTPS_PROXY=http://host:port, "
                           "or unset it") from None
        try:
            proxy_port = proxy_parts.port or 80
        except ValueError:  # a port that is not a number
            proxy_port = 0
        if proxy_parts.scheme.lower() != "http" or not proxy_host or not proxy_port:
            raise HubError(
                f"the {scheme} proxy in the environment ({proxy_parts.scheme}://{proxy_parts.hostname or '?'}) is not "
                "an http://host:port proxy, the only kind moeplan uses to reach the Hub: set "
                "HTTPS_PROXY=http://host:port"
            )
        auth = {}
        if proxy_parts.username is not None:
            secret = f"{proxy_parts.username}:{proxy_parts.password or ''}".encode()
            auth = {"proxy-authorization": "Basic " + base64.b64encode(secret).decode()}
        proxy_host = proxy_parts.hostname
        if scheme == "https":
            conn = http.client.HTTPSConnection(proxy_host, proxy_port, timeout=timeout, context=self._tls_context())
            conn.set_tunnel(host, port, headers=auth)
            return conn, target, {}
        conn = http.client.HTTPConnection(proxy_host, proxy_port, timeout=timeout)
        return conn, urlunsplit(parts._replace(fragment="")), auth  # a plain proxy takes the absolute URL

    def get(
        self,
        url: str,
        *,
        what: str,
        label: str,
        max_bytes: int = 0,
        byte_range: tuple[int, int] | None = None,
        commit: str | None = None,
    ) -> _Reply:
        """GET url. Without byte_range: up to max_bytes of the body (too_long says when more followed).

        With byte_range (first, last): those bytes, also from a server that ignores Range and sends the
        whole file (only up to `last` is read). commit: the commit asked for; the Hub must not answer another.
        """
        found_commit: str | None = None
        for _ in range(_MAX_REDIRECTS + 1):
            try:
                origin = _origin(url)  # urlsplit raises ValueError on a port that is not a number
            except ValueError:
                raise HubError(f"refusing the URL {_shown(url)} while reading {what} of {label}: malformed") from None
            if origin[0] not in ("http", "https") or not origin[1]:
                raise HubError(f"refusing a redirect to {_shown(url)} for {what} of {label}: not an http(s) URL")
            to_hub = origin == self._hub
            hub_headers, other_headers = self._base_headers()
            # identity: no compressed bodies to inflate past a cap; close: one request per connection
            headers = {**(hub_headers if to_hub else other_headers), "accept-encoding": "identity",
                       "connection": "close"}  # fmt: skip
            if byte_range is not None:
                headers["range"] = f"bytes={byte_range[0]}-{byte_range[1]}"
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise _TimedOut(
                    f"reading {what} of {label} passed the {self.limits.deadline_s:g} s that {DEADLINE_ENV} allows "
                    "a whole read of config.json and the headers"
                )
            # Each socket operation may wait at most this; the watchdog bounds the request as a whole.
            per_op = min(self.limits.timeout_s, remaining, float(getattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 10)))
            conn, target, extra = self._connection(url, per_op)
            entry = self._track(conn)
            try:
                try:
                    conn.connect()
                    self._check(entry, what, label)
                    conn.request("GET", target, headers={**headers, **extra})
                    resp = conn.getresponse()
                    self._check(entry, what, label)
                    if to_hub:
                        found_commit = self._checked_hub_headers(resp, what, label, commit) or found_commit
                    if resp.status in (301, 302, 303, 307, 308):
                        location = resp.getheader("Location")
                        if not location:
                            raise HubError(f"{self.endpoint} redirected {what} of {label} nowhere (no Location)")
                        url = urljoin(url, location.strip())
                        continue
                    reply = _Reply(status=resp.status, body=b"", commit=found_commit)
                    code = resp.getheader("X-Error-Code")
                    reply.error_code = code if code in _HUB_ERROR_CODES else None
                    if 200 <= resp.status < 300:
                        self._read_into(reply, resp, entry, what, label, max_bytes, byte_range)
                    return reply
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    if entry.expired or time.monotonic() >= entry.deadline:
                        raise self._timed_out(entry, what, label) from None
                    if isinstance(exc, TimeoutError):  # one socket operation waited per_op seconds
                        raise _TimedOut(
                            f"no data for {per_op:g} s while reading {what} of {label} (HF_HUB_DOWNLOAD_TIMEOUT, "
                            f"{TIMEOUT_ENV})"
                        ) from None
                    raise _Unreachable(_transport_reason(exc)) from None
            finally:
                self._untrack(entry)
        raise HubError(f"the server at {self.endpoint} redirected {what} of {label} more than {_MAX_REDIRECTS} times")

    def _checked_hub_headers(
        self, resp: http.client.HTTPResponse, what: str, label: str, asked: str | None
    ) -> str | None:
        """X-Repo-Commit and the ETag of an answer from the Hub's own origin, refused when hostile.

        huggingface_hub makes file names of both (snapshots/{commit}/, blobs/{etag}). Its hf_hub_download
        (2.4.0, file_download.py) checks the commit but not the ETag: an ETag of "../../../../x" or of an
        absolute path puts the downloaded file outside HF_HOME. moeplan hands it no download, and refuses
        such an answer whatever it would do with it; the ETag check belongs upstream in huggingface_hub.
        """

        def lying(detail: str) -> HubError:
            return HubError(
                f"refusing the answer of {self.endpoint} for {what} of {label}: {detail}; nothing was written "
                "(is HF_ENDPOINT a server that only looks like the Hub?)"
            )

        commit = resp.getheader("X-Repo-Commit")
        if commit is not None:
            commit = commit.strip()
            if not _COMMIT.match(commit):
                raise lying(f"X-Repo-Commit {_shown(commit)} is not a 40-hex commit")
            if asked is not None and commit != asked:
                raise lying(f"X-Repo-Commit {commit} is not the commit {asked} that was asked for")
        # huggingface_hub's get_hf_file_metadata: X-Linked-Etag (LFS files, on the redirect), else ETag.
        name, etag = "X-Linked-Etag", resp.getheader("X-Linked-Etag")
        if etag is None and 200 <= resp.status < 300:
            name, etag = "ETag", resp.getheader("ETag")
        if etag is not None:
            plain = etag.strip().removeprefix("W/").strip('"')
            if not _ETAG.match(plain):
                raise lying(f"{name} {_shown(etag)} is not a plain hash")
        return commit

    def _read_into(
        self,
        reply: _Reply,
        resp: http.client.HTTPResponse,
        entry: _Live,
        what: str,
        label: str,
        max_bytes: int,
        byte_range: tuple[int, int] | None,
    ) -> None:
        """The body into reply, never more than asked for, checking the deadline after every piece."""
        if byte_range is None:
            declared = resp.getheader("Content-Length")
            if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
                reply.too_long = True  # refused unread
                return
            pieces: list[bytes] = []
            size = 0
            while size <= max_bytes:  # one byte past the cap tells a body that is too long
                piece = resp.read1(min(_CHUNK, max_bytes + 1 - size))
                if not piece:
                    break
                pieces.append(piece)
                size += len(piece)
                self._check(entry, what, label)
            self._check(entry, what, label)  # an empty read may be the watchdog's shutdown
            self._complete(resp, size, max_bytes + 1, what)
            reply.too_long = size > max_bytes
            reply.body = b"" if reply.too_long else b"".join(pieces)
            return
        first, last = byte_range
        if resp.status == 206:
            start = _content_range_start(resp.getheader("Content-Range"))
            if start != first:
                raise HubError(
                    f"refusing the answer of {self.endpoint} for {what} of {label}: asked for bytes {first}-{last}, "
                    f"it sent Content-Range {_shown(resp.getheader('Content-Range') or '(none)')}"
                )
            skip, want = 0, last - first + 1
        else:  # 200: Range ignored, the file from its first byte; read up to the last byte asked for
            skip, want = first, last + 1
        # One buffer of the final size, filled in place: a 25 MB header costs 25 MB, not a multiple.
        buf = bytearray(want)
        size = 0
        with memoryview(buf) as view:
            while size < want:
                piece = resp.read1(min(_CHUNK, want - size))
                if not piece:
                    break
                view[size : size + len(piece)] = piece
                size += len(piece)
                self._check(entry, what, label)
        self._check(entry, what, label)
        self._complete(resp, size, want, what)
        del buf[size:]
        del buf[:skip]
        reply.body = buf

    @staticmethod
    def _complete(resp: http.client.HTTPResponse, size: int, wanted: int, what: str) -> None:
        if size < wanted and resp.length:  # Content-Length promised more than came
            raise _Unreachable(f"the connection closed {resp.length:,} bytes before the end of {what}")


def _content_range_start(value: str | None) -> int | None:
    match = re.match(r"^\s*bytes\s+(\d{1,20})-", value or "")
    return int(match[1]) if match else None


def _transport_reason(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return "the host name does not resolve"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "timed out waiting for data"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or type(exc).__name__}"
    if isinstance(exc, http.client.HTTPException):
        return f"the server broke off the HTTP exchange ({type(exc).__name__})"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return type(exc).__name__


# ----------------------------------------------------------------------------------------------
# config.json
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fetched:
    repo_id: str
    revision: str
    raw: dict[str, Any]
    config_sha256: str
    commit: str | None  # the commit config.json was read at
    online: bool  # False: read from a local cache because the Hub was not asked or not reached
    why_cached: str | None  # why, when online is False
    source: str

    @property
    def label(self) -> str:
        return f"{self.repo_id}@{self.revision}"


def _fetch_config(session: _Session, repo_id: str, revision: str) -> _Fetched:
    cache = _Cache(repo_id)
    label = f"{repo_id}@{revision}"
    if _offline_mode():
        why, fix = "HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE to download it"
        return _config_from_cache(cache, repo_id, revision, why, fix)
    if _COMMIT.match(revision):  # the files of a commit never change: a cached copy is the Hub's answer
        hit = cache.load_config(revision)
        if isinstance(hit, bytes):
            return _fetched(repo_id, revision, hit, revision, online=True, why=None)
    try:
        reply = session.get(
            _resolve_url(repo_id, revision, CONFIG_FILE), what=CONFIG_FILE, label=label, max_bytes=CONFIG_MAX_BYTES,
            commit=revision if _COMMIT.match(revision) else None,
        )  # fmt: skip
        if reply.status >= 500:
            raise _Unreachable(f"HTTP {reply.status}")
        if reply.status == 200 and reply.commit is None:  # a proxy or captive portal answers, not the Hub
            raise _Unreachable("the endpoint does not answer like the Hub: no X-Repo-Commit")
    except _Unreachable as exc:
        fix = "check the network, proxy and HF_ENDPOINT"
        if isinstance(exc, _TimedOut):
            fix += f", or raise {TIMEOUT_ENV} / {DEADLINE_ENV} on a slow link"
        why = f"cannot reach the Hub at {session.endpoint} ({exc.reason})"
        return _config_from_cache(cache, repo_id, revision, why, fix)
    if reply.status != 200:
        raise _http_error(reply, repo_id, revision, CONFIG_FILE)
    if reply.too_long:
        raise ConfigError(
            f"{CONFIG_FILE} of {label} is larger than {CONFIG_MAX_BYTES:,} bytes ({CONFIG_MAX_BYTES // 2**20} MiB), "
            "the most moeplan reads (real ones are a few kB): refusing it; pass a local config.json instead"
        )
    assert reply.commit is not None
    fetched = _fetched(repo_id, revision, reply.body, reply.commit, online=True, why=None)
    cache.save_config(reply.commit, reply.body)
    if not _COMMIT.match(revision):
        cache.save_ref(revision, reply.commit)
    return fetched


def _fetched(
    repo_id: str, revision: str, data: bytes, commit: str | None, *, online: bool, why: str | None
) -> _Fetched:
    raw = _parse_config(data, f"{repo_id}@{revision}")
    source = f"config.json of {repo_id}@{revision}"
    if commit and commit != revision:
        source += f" (commit {commit[:12]})"
    if why:
        source += f"{FROM_CACHE} ({why})"
    return _Fetched(
        repo_id=repo_id, revision=revision, raw=raw, config_sha256=hashlib.sha256(data).hexdigest(), commit=commit,
        online=online, why_cached=why, source=source,
    )  # fmt: skip


def _config_from_cache(cache: _Cache, repo_id: str, revision: str, why: str, fix: str) -> _Fetched:
    """config.json from moeplan's cache, else from huggingface_hub's (read only); or one line saying neither has it."""
    label = f"{repo_id}@{revision}"
    problems: list[str] = []
    commit = revision if _COMMIT.match(revision) else cache.load_ref(revision, problems)
    if commit is not None:
        hit = cache.load_config(commit, problems)
        if isinstance(hit, bytes):
            return _fetched(repo_id, revision, hit, commit, online=False, why=why)
    path = _hf_cached_config(repo_id, revision)
    if path is not None:
        try:
            data = _read_regular(path, CONFIG_MAX_BYTES)
        except _Damaged as exc:
            problems.append(f"{path}: {exc}")
        else:
            if data is not None:
                hf_commit = path.parent.name if _COMMIT.match(path.parent.name) else None
                return _fetched(repo_id, revision, data, hf_commit, online=False, why=why)
    damaged = f"; {'; '.join(problems)}" if problems else ""
    raise HubError(
        f"{why}, and {CONFIG_FILE} of {label} is not in the local cache ({cache.root}{damaged}): {fix}, "
        "set HF_TOKEN if the repo is private or gated, or pass a local path to config.json"
    )


def _hf_cached_config(repo_id: str, revision: str) -> Path | None:
    """config.json in huggingface_hub's own cache (say, downloaded by transformers); names checked already."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, CONFIG_FILE, revision=revision)
    except Exception:  # whatever the reason, it is not usable
        return None
    return Path(found) if isinstance(found, str) else None


def _parse_config(data: bytes, label: str) -> dict[str, Any]:
    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{CONFIG_FILE} of {label} is not UTF-8 text; pass a corrected local config.json") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{CONFIG_FILE} of {label} is not valid JSON (line {exc.lineno}: {exc.msg}); "
            "pass a corrected local config.json instead"
        ) from None
    except (RecursionError, ValueError) as exc:  # nesting too deep; an integer of more than 4300 digits
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(":")[0]
        raise ConfigError(
            f"{CONFIG_FILE} of {label} cannot be read as JSON ({reason}); pass a local config.json instead"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{CONFIG_FILE} of {label} must be a JSON object, got {type(raw).__name__}")
    return raw


# ----------------------------------------------------------------------------------------------
# Safetensors headers
# ----------------------------------------------------------------------------------------------

def _read_checkpoint(session: _Session, fetched: _Fetched, spec: ModelSpec) -> StoredCheckpoint | None:
    """Headers -> StoredCheckpoint; None when the repo has no safetensors (only .bin, GGUF, ...).

    Cached by commit (and the config's hash): a second run reads no header, and a run without the Hub
    uses the cached summary and says so in the notes.
    """
    commit = fetched.commit
    if commit is None:  # config.json from a cache that does not tell the commit: nothing to key a summary by
        return None
    cache = _Cache(fetched.repo_id)
    state, summary, problem = cache.load_checkpoint(commit, fetched.config_sha256, spec.num_layers)
    if not fetched.online:
        if state == "damaged":
            raise HubError(
                f"moeplan's cached summary of the safetensors headers of {fetched.label} ({problem}) cannot be "
                f"used, and {fetched.why_cached}: delete that file, or rerun with the Hub reachable to read the "
                "headers again"
            )
        if state == "missing" or summary is None:
            return None
        note = (
            f"safetensors headers from moeplan's cache of commit {commit[:12]}, not read again from the Hub: "
            f"{fetched.why_cached}"
        )
        return summary.checkpoint(spec, lead=(note,))
    if state == "hit":
        return summary.checkpoint(spec) if summary is not None else None
    try:
        tally = _fetch_tally(session, fetched, spec)
    except _Unreachable as exc:
        raise HubError(
            f"reading the safetensors headers of {fetched.label} from {session.endpoint} failed ({exc.reason}): "
            f"retry when the Hub answers (on a slow link raise {TIMEOUT_ENV} / {DEADLINE_ENV}), or pass a "
            "local config.json to plan without them"
        ) from None
    cache.save_checkpoint(commit, fetched.config_sha256, tally)
    return tally.checkpoint(spec) if tally is not None else None


def _fetch_tally(session: _Session, fetched: _Fetched, spec: ModelSpec) -> _Tally | None:
    repo_id, commit, label = fetched.repo_id, fetched.commit or fetched.revision, fetched.label
    tally = _Tally(spec.num_layers)
    single = _header_json(session, fetched, SINGLE_FILE, probe=True)
    if single is not None:
        tally.add(SINGLE_FILE, _parse_header(SINGLE_FILE, single, label), label)
        return tally
    index_url = _resolve_url(repo_id, commit, INDEX_FILE)
    reply = session.get(index_url, what=INDEX_FILE, label=label, max_bytes=INDEX_MAX_BYTES, commit=commit)
    if reply.status == 404 and reply.error_code in (None, "EntryNotFound"):
        return None  # neither model.safetensors nor an index: .bin, GGUF or no weights
    if reply.status >= 500:
        raise _Unreachable(f"HTTP {reply.status}")
    if reply.status != 200:
        raise _http_error(reply, repo_id, fetched.revision, INDEX_FILE)
    if reply.too_long:
        raise HubError(
            f"refusing {INDEX_FILE} of {label}: larger than {INDEX_MAX_BYTES:,} bytes, the most moeplan reads "
            "(DeepSeek-V3's is about 9 MB); pass a local config.json to plan without the headers"
        )
    shards = _shards_of(reply.body, label)
    _read_shards(session, fetched, shards, tally)
    return tally


def _shards_of(data: bytes, label: str) -> list[str]:
    """The shard files an index names, checked, at most MAX_SHARDS."""
    try:
        index = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        index = None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise HubError(
            f"refusing {INDEX_FILE} of {label}: not a JSON object with a non-empty weight_map; "
            "pass a local config.json to plan without the headers"
        )
    names = set(weight_map.values()) if all(isinstance(v, str) for v in weight_map.values()) else {None}
    if len(names) > MAX_SHARDS:
        raise HubError(
            f"refusing {INDEX_FILE} of {label}: it names {len(names):,} safetensors shards, more than the "
            f"{MAX_SHARDS:,} moeplan reads (one request or two each; real checkpoints have at most a few hundred); "
            "pass a local config.json to plan without the headers"
        )
    return sorted(_check_shard_name(name, label) for name in names)


def _read_shards(session: _Session, fetched: _Fetched, shards: list[str], tally: _Tally) -> None:
    """Every shard's header, _WORKERS at a time; each is parsed and added as it arrives, then dropped."""
    label = fetched.label
    done = 0
    pool = ThreadPoolExecutor(max_workers=min(_WORKERS, len(shards)), thread_name_prefix="moeplan-hub")
    futures: dict[Future[bytes | bytearray | None], str] = {
        pool.submit(_header_json, session, fetched, shard): shard for shard in shards
    }
    try:
        for future in as_completed(futures):
            shard = futures[future]
            raw = future.result()
            assert raw is not None  # probe=False: a missing shard raised
            del futures[future]  # drop the future's hold on the header bytes once parsed
            tally.add(shard, _parse_header(shard, raw, label), label)
            del raw
            done += 1
    except BaseException as exc:
        session.abort()  # the first failure (or Ctrl-C) ends the requests still in flight at once
        if isinstance(exc, _TimedOut):
            raise _TimedOut(f"{exc.reason}; {done} of {len(shards)} shards were read") from None
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _header_json(
    session: _Session, fetched: _Fetched, filename: str, *, probe: bool = False
) -> bytes | bytearray | None:
    """The JSON bytes of one file's header, in at most two range reads; None for a missing probe file."""
    label, commit = fetched.label, fetched.commit or fetched.revision
    url = _resolve_url(fetched.repo_id, commit, filename)

    def refuse(detail: str) -> HubError:
        return HubError(
            f"refusing the safetensors header of {filename} in {label}: {detail}; the checkpoint is damaged or "
            "not safetensors: pass a local config.json to plan without reading it"
        )

    first = session.get(url, what=filename, label=label, byte_range=(0, _FIRST_READ - 1), commit=commit)
    if first.status == 404 and first.error_code in (None, "EntryNotFound") and probe:
        return None
    if first.status >= 500:
        raise _Unreachable(f"HTTP {first.status}")
    if first.status not in (200, 206, 416):  # 416: an empty file
        raise _http_error(first, fetched.repo_id, fetched.revision, filename)
    data = first.body
    if len(data) < 8:
        raise refuse(f"the file is {len(data)} bytes, shorter than the 8-byte length prefix")
    (size,) = struct.unpack_from("<Q", data)
    if size > HEADER_MAX_BYTES:
        raise refuse(
            f"its length prefix says {size} bytes, more than the {HEADER_MAX_BYTES:,} moeplan reads "
            "(huggingface_hub's SAFETENSORS_MAX_HEADER_LENGTH)"
        )
    session.charge_header(size, label)
    if 8 + size <= len(data):
        return bytes(data[8 : 8 + size])
    if len(data) < _FIRST_READ:
        raise refuse(
            f"the header is cut short, not json: its length prefix says {size:,} bytes,"
            f" {len(data) - 8:,} follow"
        )
    # The whole header in one buffer, from byte 8 (the first 100 kB again, rather than two buffers joined).
    rest = session.get(url, what=filename, label=label, byte_range=(8, 8 + size - 1), commit=commit)
    if rest.status >= 500:
        raise _Unreachable(f"HTTP {rest.status}")
    if rest.status not in (200, 206, 416):
        raise _http_error(rest, fetched.repo_id, fetched.revision, filename)
    if len(rest.body) < size:
        raise refuse(
            f"the header is cut short, not json: its length prefix says {size:,} bytes, {len(rest.body):,} follow"
        )
    return rest.body


def _parse_header(filename: str, raw: bytes | bytearray, label: str) -> dict[str, Any]:
    """{tensor name: entry} from a header's JSON; `__metadata__` dropped."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested too deeply, huge integers
        reason = "nested too deeply" if isinstance(exc, RecursionError) else " ".join(str(exc).split())[:100]
        raise HubError(
            f"refusing the safetensors header of {filename} in {label}: header is not json ({reason}); the "
            "checkpoint is damaged or not safetensors: pass a local config.json to plan without reading it"
        ) from None
    if not isinstance(header, dict):
        raise HubError(
            f"refusing the safetensors header of {filename} in {label}: a JSON {type(header).__name__}, not an "
            "object of tensors; the checkpoint is damaged or not safetensors: pass a local config.json instead"
        )
    header.pop("__metadata__", None)
    return header


# Tensor names that are not weights of the model the config describes. Sources: DeepSeek-V3
# README_WEIGHTS.md (MTP layer 61, fp8 weight_scale_inv per 128x128 block); transformers
# integrations/mxfp4.py (gpt-oss *_blocks / *_scales, U8); AutoGPTQ / AutoAWQ (qweight, qzeros,
# scales, g_idx); compressed-tensors (weight_scale, input_scale); bitsandbytes (absmax, quant_map).
_LAYER = re.compile(r"(?:^|\.)layers\.(\d{1,9})\.")  # at most 9 digits: int() of 5000 digits raises
_VISION = re.compile(r"vision|visual|multi_modal_projector|mm_projector")
_MTP_PREFIXES = ("mtp.", "model.mtp.")
_SCALE_SUFFIXES = ("_scale_inv", "_scale", "_scale_2", "_zero_point")
_QUANT_META = frozenset({"qzeros", "scales", "g_idx", "absmax", "quant_map", "nested_absmax", "nested_quant_map"})
Category = Literal["weight", "mtp", "scales", "packed_fp4", "fp4_scales", "packed_int", "quant_meta", "vision"]
_DTYPE = re.compile(r"^[A-Za-z0-9_]{1,32}$")
# Bits per element (safetensors crate, src/tensor.rs Dtype::bitsize). Metadata::validate there
# refuses an entry whose data_offsets do not span exactly elements x bits / 8 bytes; so does moeplan,
# for the dtypes it knows.
_DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
    "I64": 64, "U64": 64,
}  # fmt: skip
_U64 = 2**64  # data_offsets are u64 in the format
_NAMES_SAMPLE = 8


def _category(name: str, dtype: str, layer: int | None, num_layers: int) -> Category:
    """Which bucket of the stored-vs-counted explanation one tensor falls in (first match wins).

    Scales and other quantization metadata go first, so that the MTP bucket holds only the MTP
    layers' weights and equals what count_params reports as mtp_params_stored. String tests, not
    regexes, on the hot path: DeepSeek-V3 has 92k tensors.
    """
    if _VISION.search(name):
        return "vision"
    tail = name.rsplit(".", 1)[-1]
    if tail == "qweight":
        return "packed_int"
    if tail in _QUANT_META or ".quant_state." in name:
        return "quant_meta"
    if dtype == "U8" and tail.endswith("_scales"):
        return "fp4_scales"
    if tail.endswith(_SCALE_SUFFIXES):
        return "scales"
    if (layer is not None and layer >= num_layers) or name.startswith(_MTP_PREFIXES):
        return "mtp"
    if dtype == "U8" and tail.endswith("_blocks"):
        return "packed_fp4"
    return "weight"


def _elements(filename: str, name: str, meta: Any, label: str) -> tuple[str, int, int]:
    """(dtype, elements, data bytes) of one header entry; refuses what the safetensors format forbids."""
    if isinstance(meta, Mapping):  # as a header's JSON has it
        meta = (meta.get("dtype"), meta.get("shape"), meta.get("data_offsets"))
    try:
        dtype, shape, (begin, end) = meta
        if isinstance(shape, (str, bytes)) or len(shape) > 16:
            raise ValueError(shape)
        elements = 1
        for dim in shape:
            if type(dim) is not int or not 0 <= dim < _U64:  # exact type: True is not a dimension
                raise ValueError(dim)
            elements *= dim
        if not isinstance(dtype, str) or not _DTYPE.match(dtype) or elements >= _U64:
            raise ValueError(meta)
        if type(begin) is not int or type(end) is not int or not 0 <= begin <= end < _U64:
            raise ValueError(meta)
        bits = _DTYPE_BITS.get(dtype)
        if bits is not None and (end - begin) * 8 != elements * bits:
            raise ValueError(meta)
    except (TypeError, ValueError):
        raise HubError(
            f"refusing the safetensors header of {filename} in {label}: tensor {_shown(str(name))} has a malformed "
            f"dtype/shape/data_offsets entry ({repr(meta)[:120]}); the checkpoint is damaged"
        ) from None
    return dtype, elements, end - begin


class _Tally:
    """What the headers store, summed one file at a time (a header is parsed, added, then dropped).

    It depends on the config only through num_layers, so it is cached with the config's hash, and the
    notes are made again from the spec on every run (a cache entry holds numbers, never text to print).
    """

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.elements: dict[tuple[Category, str], int] = {}
        self.mtp_layers: set[int] = set()
        self.total_bytes = 0
        self.num_files = 0
        self.names: list[str] = []  # the first names in sorted order, over all files

    def add(self, filename: str, tensors: Mapping[str, Any], label: str) -> None:
        for name, meta in tensors.items():
            dtype, elements, size = _elements(filename, name, meta, label)
            self.total_bytes += size  # from data_offsets: exact, also for sub-byte dtypes
            match = _LAYER.search(name)
            layer = int(match.group(1)) if match else None
            category = _category(name, dtype, layer, self.num_layers)
            key = (category, dtype)
            self.elements[key] = self.elements.get(key, 0) + elements
            if category == "mtp" and layer is not None:
                self.mtp_layers.add(layer)
        self.names = heapq.nsmallest(_NAMES_SAMPLE, itertools.chain(self.names, map(str, tensors)))
        self.num_files += 1

    def checkpoint(self, spec: ModelSpec, lead: tuple[str, ...] = ()) -> StoredCheckpoint:
        by_dtype: Counter[str] = Counter()
        by_category: Counter[str] = Counter()
        dtypes_in: dict[str, set[str]] = {}
        for (category, dtype), elements in self.elements.items():
            by_dtype[dtype] += elements
            by_category[category] += elements
            dtypes_in.setdefault(category, set()).add(dtype)
        notes = _notes(spec, by_category, dtypes_in, self.mtp_layers, sum(by_dtype.values()))
        return StoredCheckpoint(
            params_by_dtype=dict(sorted(by_dtype.items())),
            total_bytes=self.total_bytes,
            num_files=self.num_files,
            tensor_names_sample=tuple(self.names),
            notes=(*lead, *notes),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "elements": sorted([c, d, n] for (c, d), n in self.elements.items()),
            "mtp_layers": sorted(self.mtp_layers),
            "total_bytes": self.total_bytes,
            "num_files": self.num_files,
            "names": list(self.names),
        }

    @classmethod
    def from_model(cls, saved: _SummaryModel) -> _Tally:
        tally = cls(saved.num_layers)
        for category, dtype, elements in saved.elements:
            if (category, dtype) in tally.elements:
                raise ValueError(f"({category}, {dtype}) twice")
            tally.elements[(category, dtype)] = elements
        tally.mtp_layers = set(saved.mtp_layers)
        tally.total_bytes, tally.num_files, tally.names = saved.total_bytes, saved.num_files, list(saved.names)
        return tally


def summarize_headers(
    files: Mapping[str, Mapping[str, Any]], spec: ModelSpec, *, label: str = "checkpoint"
) -> StoredCheckpoint:
    """What the headers store, with notes that reconcile it with count_params(spec).total_params.

    `files` maps each safetensors file to {tensor name: (dtype, shape, (begin, end))} or to the
    header's own {tensor name: {"dtype", "shape", "data_offsets"}}.
    """
    tally = _Tally(spec.num_layers)
    for filename, tensors in files.items():
        tally.add(filename, tensors, label)
    return tally.checkpoint(spec)


def _int_bits(spec: ModelSpec) -> int:
    """GPTQ/AWQ weight bits (quantization_config.bits, 4 when absent)."""
    bits = (spec.quantization_config or {}).get("bits", 4)
    return bits if isinstance(bits, int) and bits in (2, 3, 4, 8) else 4


def _notes(
    spec: ModelSpec, cat: Counter[str], dtypes_in: dict[str, set[str]], mtp_layers: set[int], stored: int
) -> list[str]:
    """One line per reason stored != counted, each with its numbers, then the reconciliation."""
    count = count_params(spec)
    notes: list[str] = []
    logical = stored  # stored elements turned into the weights the count means

    def dt(category: str) -> str:
        return "/".join(sorted(dtypes_in.get(category, ())))

    if cat["mtp"]:
        shown = sorted(mtp_layers)
        layers = ", ".join(str(i) for i in shown[:8]) or "mtp.*"
        if len(shown) > 8:
            layers += f", ... ({len(shown):,} layers)"
        config_says = "" if cat["mtp"] == count.mtp_params_stored else f" (config: {count.mtp_params_stored:,})"
        notes.append(
            f"MTP (multi-token prediction) layer {layers}: {cat['mtp']:,} elements ({fmt_billions(cat['mtp'])}) "
            f"stored after the {spec.num_layers} decoder layers, its copies of the embedding and lm_head included; "
            f"not in total_params, reported as mtp_params_stored{config_says}"
        )
        logical -= cat["mtp"]
    if cat["scales"]:
        notes.append(
            f"quantization scales (*_scale_inv / *weight_scale, {dt('scales')}): {cat['scales']:,} elements "
            f"({fmt_billions(cat['scales'])}), one per block of weights, not weights; not in total_params"
        )
        logical -= cat["scales"]
    if cat["packed_fp4"]:
        notes.append(
            f"packed 4-bit blocks (*_blocks, U8, mxfp4): {cat['packed_fp4']:,} bytes hold "
            f"{2 * cat['packed_fp4']:,} 4-bit weights (2 per byte); counted as weights"
        )
        logical += cat["packed_fp4"]  # each stored byte is two weights
    if cat["fp4_scales"]:
        notes.append(
            f"mxfp4 block scales (*_scales, U8, one E8M0 per 32 weights): {cat['fp4_scales']:,} elements; "
            "not in total_params"
        )
        logical -= cat["fp4_scales"]
    if cat["packed_int"]:
        per = 32 // _int_bits(spec)
        notes.append(
            f"packed int weights (qweight, GPTQ/AWQ): {cat['packed_int']:,} int32 hold "
            f"{per * cat['packed_int']:,} {_int_bits(spec)}-bit weights ({per} per int32); counted as weights"
        )
        logical += (per - 1) * cat["packed_int"]
    if cat["quant_meta"]:
        notes.append(
            f"quantization metadata (qzeros / scales / g_idx / absmax, {dt('quant_meta')}): "
            f"{cat['quant_meta']:,} elements; not in total_params"
        )
        logical -= cat["quant_meta"]
    if cat["vision"]:
        counted = spec.vision is not None
        notes.append(
            f"vision tower and projector: {cat['vision']:,} elements ({fmt_billions(cat['vision'])}); "
            + ("in total_params as 'vision'" if counted else "not in total_params (a text-only count)")
        )
        if not counted:
            logical -= cat["vision"]
    diff = logical - count.total_params
    if diff == 0:
        notes.append(
            ("after these adjustments the" if len(notes) else "the")
            + f" stored tensors match the count from config.json exactly ({count.total_params:,})"
        )
    else:
        notes.append(
            f"unexplained: {diff:+,} elements between the stored tensors ({logical:,} after the adjustments "
            f"above) and the count from config.json ({count.total_params:,}): tied or untied embeddings, "
            "buffers stored as tensors, or config keys this family reads differently"
        )
    return notes


# ----------------------------------------------------------------------------------------------
# moeplan's cache: HF_ASSETS_CACHE/moeplan/{org}--{name}/{commit}/*.entry and refs/{revision}
# ----------------------------------------------------------------------------------------------
#
# Each entry is JSON that names its repo and commit and carries a SHA-256 of its own content: an
# entry that is truncated, edited by hand, copied from another commit or written by another moeplan
# version is not used as fact (ignored when the Hub can be asked again, refused with its path when not).
# The checksum finds damage, not malice: whoever can write HF_HOME can also rewrite huggingface_hub's
# cached files.


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


_Count = Annotated[int, Field(ge=0, lt=2**80)]
_Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
_CommitStr = Annotated[str, Field(pattern=r"^[0-9a-f]{40}$")]


class _SummaryModel(_Strict):
    num_layers: Annotated[int, Field(ge=0, le=10**6)]
    elements: list[tuple[Category, Annotated[str, Field(pattern=_DTYPE.pattern)], _Count]] = Field(max_length=1_000)
    mtp_layers: list[Annotated[int, Field(ge=0, lt=10**9)]] = Field(max_length=1_000_000)
    total_bytes: _Count
    num_files: Annotated[int, Field(ge=1, le=MAX_SHARDS)]
    names: list[Annotated[str, Field(max_length=4_096)]] = Field(max_length=_NAMES_SAMPLE)


class _CheckpointEntry(_Strict):
    moeplan_cache: Literal[2]
    kind: Literal["checkpoint"]
    repo_id: str
    commit: _CommitStr
    config_sha256: _Sha256  # the config.json the summary was made with (num_layers decides MTP)
    summary: _SummaryModel | None  # None: the commit has no safetensors files
    sha256: _Sha256


class _ConfigEntry(_Strict):
    moeplan_cache: Literal[2]
    kind: Literal["config"]
    repo_id: str
    commit: _CommitStr
    config: str  # config.json as the Hub sent it
    sha256: _Sha256


class _Damaged(Exception):
    pass


def _digest(entry: Mapping[str, Any]) -> str:
    body = {key: value for key, value in entry.items() if key != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read_regular(path: Path, max_bytes: int) -> bytes | None:
    """A regular file of at most max_bytes; None when absent. A FIFO or device is refused, never waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _Damaged(exc.strerror or type(exc).__name__) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _Damaged("not a regular file")
        if info.st_size > max_bytes:
            raise _Damaged(f"larger than {max_bytes:,} bytes")
        chunks, left = [], max_bytes
        while left > 0 and (chunk := os.read(fd, min(left, 2**20))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise _Damaged(exc.strerror or type(exc).__name__) from None
    finally:
        os.close(fd)


class _Cache:
    def __init__(self, repo_id: str) -> None:
        # repo_id passed _check_repo_id: ASCII [\w.-] in two parts without '..' or '--', so one safe folder name
        self.repo_id = repo_id
        self.base = Path(constants.HF_ASSETS_CACHE).expanduser() / _CACHE_LIBRARY
        self.root = self.base / repo_id.replace("/", "--")

    def _path(self, *parts: str) -> Path:
        path = self.root.joinpath(*parts)
        # Every part is checked where it comes from; this guards against a check that was missed.
        if ".." in path.relative_to(self.base).parts or any(p in ("", ".") for p in parts):
            raise _Damaged(f"unsafe cache path {path}")
        return path

    @staticmethod
    def _ref_name(revision: str) -> str:
        name = quote(revision, safe="")  # refs/pr/1 -> refs%2Fpr%2F1: one file name
        return name if len(name) <= 200 else "sha256-" + hashlib.sha256(revision.encode()).hexdigest()

    def _write(self, path: Path, data: bytes) -> None:
        """Atomically: a temp file in the same folder, flushed, then renamed over the entry."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise

    def _save(self, path_parts: tuple[str, ...], entry: dict[str, Any]) -> None:
        entry["sha256"] = _digest(entry)
        with suppress(OSError, ValueError, _Damaged):  # a cache that cannot be written only costs a later run
            self._write(self._path(*path_parts), json.dumps(entry, ensure_ascii=False).encode("utf-8"))

    def save_ref(self, revision: str, commit: str) -> None:
        with suppress(OSError, _Damaged):
            self._write(self._path("refs", self._ref_name(revision)), commit.encode())

    def load_ref(self, revision: str, problems: list[str]) -> str | None:
        try:
            path = self._path("refs", self._ref_name(revision))
            data = _read_regular(path, 64)
        except _Damaged as exc:
            problems.append(f"refs/{revision}: {exc}")
            return None
        if data is None:
            return None
        text = data.decode("ascii", "replace").strip()
        if not _COMMIT.match(text):
            problems.append(f"{path} is damaged (not a commit)")
            return None
        return text

    def save_config(self, commit: str, data: bytes) -> None:
        entry = {"moeplan_cache": _CACHE_VERSION, "kind": "config", "repo_id": self.repo_id, "commit": commit,
                 "config": data.decode("utf-8", "strict")}  # fmt: skip
        self._save((commit, "config.json.entry"), entry)

    def load_config(self, commit: str, problems: list[str] | None = None) -> bytes | None:
        try:
            # ensure_ascii=False: the text as sent, escaped only where JSON must (quotes, control characters)
            entry = self._load((commit, "config.json.entry"), _ConfigEntry, 2 * CONFIG_MAX_BYTES + 2**16, commit)
        except _Damaged as exc:
            if problems is not None:
                problems.append(str(exc))
            return None
        return entry.config.encode("utf-8") if entry is not None else None

    def save_checkpoint(self, commit: str, config_sha256: str, tally: _Tally | None) -> None:
        entry = {"moeplan_cache": _CACHE_VERSION, "kind": "checkpoint", "repo_id": self.repo_id, "commit": commit,
                 "config_sha256": config_sha256, "summary": tally.to_json() if tally is not None else None}  # fmt: skip
        self._save((commit, "checkpoint.json.entry"), entry)

    def load_checkpoint(
        self, commit: str, config_sha256: str, num_layers: int
    ) -> tuple[Literal["hit", "missing", "damaged"], _Tally | None, str]:
        """("hit", tally or None for no safetensors, ""), ("missing", None, ""), or ("damaged", None, why)."""
        path = self._path(commit, "checkpoint.json.entry")
        try:
            entry = self._load((commit, "checkpoint.json.entry"), _CheckpointEntry, 2**22, commit)
            if entry is None:
                return "missing", None, ""
            if entry.config_sha256 != config_sha256:
                raise _Damaged(f"{path} was made from another config.json")
            if entry.summary is None:
                return "hit", None, ""
            if entry.summary.num_layers != num_layers:
                raise _Damaged(f"{path} is inconsistent (made for {entry.summary.num_layers} layers, not {num_layers})")
            try:
                return "hit", _Tally.from_model(entry.summary), ""
            except ValueError as exc:
                raise _Damaged(f"{path} is inconsistent ({exc})") from None
        except _Damaged as exc:
            return "damaged", None, str(exc)

    def _load(self, parts: tuple[str, ...], model: type[Any], max_bytes: int, commit: str) -> Any:
        """The entry at parts, checked: schema, version, repo and commit, checksum. None when absent."""
        path = self._path(*parts)
        try:
            data = _read_regular(path, max_bytes)
        except _Damaged as exc:
            raise _Damaged(f"{path}: {exc}") from None
        if data is None:
            return None
        try:
            entry = model.model_validate_json(data)
            plain = json.loads(data)
        except (ValidationError, ValueError, RecursionError):
            raise _Damaged(f"{path} is damaged or from another moeplan version") from None
        if entry.repo_id != self.repo_id or entry.commit != commit:
            raise _Damaged(f"{path} names {_shown(entry.repo_id)}@{entry.commit[:12]}, not this repo and commit")
        if _digest(plain) != entry.sha256:
            raise _Damaged(f"{path} does not match its checksum (edited or corrupted)")
        return entry


# ----------------------------------------------------------------------------------------------
# Errors: the Hub's answers -> one actionable line
# ----------------------------------------------------------------------------------------------


def _offline_mode() -> bool:
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _http_error(reply: _Reply, repo_id: str, revision: str, what: str) -> HubError:
    """A 4xx from the Hub, read as huggingface_hub's hf_raise_for_status reads X-Error-Code and the status."""
    endpoint = constants.ENDPOINT
    status, code = reply.status, reply.error_code
    token_hint = "set HF_TOKEN to a read token (https://huggingface.co/settings/tokens) or run `hf auth login`"
    if code == "GatedRepo":
        if status == 403:
            return HubError(
                f"{repo_id} is gated and your token has not been granted access: accept its terms at "
                f"{endpoint}/{repo_id}, then retry with that account's token (HF_TOKEN or `hf auth login`)"
            )
        return HubError(
            f"{repo_id} is gated and no token was sent (HTTP {status}): {token_hint}, from an "
            f"account that accepted its terms at {endpoint}/{repo_id}"
        )
    if code == "RepoNotFound":
        if status == 401:
            return HubError(
                f"{repo_id} was not found on {endpoint} (HTTP 401): it does not exist, or it is private or "
                f"gated and no valid token was sent; check the id, or {token_hint}"
            )
        return HubError(
            f"{repo_id} does not exist on {endpoint} (HTTP {status}), or your token cannot see it: check "
            "the org/name spelling (the Hub id is case-sensitive)"
        )
    if code == "RevisionNotFound":
        return HubError(
            f"{repo_id} has no revision {_shown(revision)}: give a branch, tag or commit that exists (org/name@main)"
        )
    if code == "EntryNotFound" or status == 404:
        return HubError(
            f"{repo_id}@{revision} has no {what}: moeplan reads transformers-style repos; "
            "pass a local config.json or write a model card"
        )
    if status == 401:
        return HubError(f"the Hub refused the token for {repo_id} (HTTP 401): {token_hint}")
    if status == 403:
        return HubError(f"access to {repo_id} is forbidden (HTTP 403): your token lacks read permission; {token_hint}")
    if status == 429:
        return HubError(
            f"the Hub is rate-limiting requests for {repo_id} (HTTP 429): retry later, or {token_hint} for higher "
            "limits"
        )
    return HubError(f"the Hub answered HTTP {status} for {what} of {repo_id}@{revision}; retry later")

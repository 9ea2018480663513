"""A fake Hugging Face Hub on 127.0.0.1 for tests: real HTTP, the requests huggingface_hub makes.

Usage (any test; tests/ is on sys.path under pytest's default import mode):

    from hubserver import FakeRepo, hub_server, env_for, sharded_repo

    with hub_server({"org/name": sharded_repo(config, tensors)}) as hub:
        env = env_for(hub.endpoint, tmp_path)          # HF_ENDPOINT, HF_HOME=tmp_path/hf, no telemetry
        subprocess.run([sys.executable, "-m", "moeplan", "params", "org/name", "--json"], env=env, ...)
        assert all(r.path.startswith("/org/name/") for r in hub.log)

huggingface_hub reads HF_ENDPOINT and HF_HOME when it is imported, so point it here by running
moeplan in a subprocess with `env_for(...)`; nothing in the test process is patched.

What it answers, as the Hub does (huggingface_hub file_download.get_hf_file_metadata and
utils/_http.hf_raise_for_status say which headers matter):
  HEAD/GET /{org}/{name}/resolve/{revision}/{file}   ETag, X-Repo-Commit, Content-Length;
                                                     `Range: bytes=a-b` -> 206 with the slice
  GET /api/models/{org}/{name}[/revision/{rev}]      {"id", "sha", "siblings": [{"rfilename"}]}
Errors carry X-Error-Code (RepoNotFound, GatedRepo, RevisionNotFound, EntryNotFound) and
X-Error-Message like the Hub: unknown or private repo -> 401 without a token, 404 with one;
gated repo -> 401 without a token, 403 with a token that was not granted access.

Safetensors files are served as their header only (8-byte little-endian length + JSON, per
https://huggingface.co/docs/safetensors/index#format): readers only ask for ranges inside it.

A repo can also misbehave, file by file (`FakeRepo.misbehave`, see `Misbehave`): drip the body or the
status line and headers a byte at a time, answer late, ignore Range, stream a huge body generated as
it is sent (never held in memory), send hostile ETag / X-Repo-Commit values, or redirect elsewhere.
`hub_server(..., static={path: bytes})` serves plain files at fixed paths, as a CDN a redirect points to.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import struct
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

# Bytes per element of each safetensors dtype (safetensors crate, src/tensor.rs Dtype::size).
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

# name -> (dtype, shape)
Tensors = Mapping[str, tuple[str, Sequence[int]]]


@dataclass(frozen=True)
class Misbehave:
    """How one file is served wrong; every field off by default."""

    delay_s: float = 0.0  # wait this long before answering
    drip_s: float = 0.0  # send the body one byte at a time, this many seconds apart
    drip_head_s: float = 0.0  # send the status line and headers one byte at a time
    ignore_range: bool = False  # answer 200 with the whole body even when a Range was asked
    headers: Mapping[str, str | None] = field(default_factory=dict)  # set, or with None drop, response headers
    redirect: str | None = None  # answer 302 with this Location (absolute, relative, any scheme)
    length: int | None = None  # a body of this many bytes, made as it is sent: `prefix`, `fill`..., `suffix`
    prefix: bytes = b""
    fill: bytes = b" "
    suffix: bytes = b""
    send_length: bool = True  # False: no Content-Length; the body ends when the server closes the connection


@dataclass
class FakeRepo:
    """One model repo. `files` maps a file name to the bytes served (safetensors: header only).

    `misbehave` maps a file name (or "*" for every file) to how it is served wrong.
    """

    files: dict[str, bytes]
    sha: str = ""  # commit; derived from the files when empty
    branches: tuple[str, ...] = ("main",)
    gated: bool = False
    private: bool = False
    tokens: frozenset[str] = frozenset()  # tokens granted access to a gated or private repo
    status: int | None = None  # answer every request for this repo with this status (503: Hub down)
    misbehave: dict[str, Misbehave] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.sha:
            digest = hashlib.sha1()
            for name in sorted(self.files):
                digest.update(name.encode() + hashlib.sha1(self.files[name]).digest())
            self.sha = digest.hexdigest()


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # unquoted path, no query
    range: str | None
    token: str | None  # the bearer token sent, if any
    status: int
    size: int | None = None  # length of the file served at this path (safetensors: its header)
    sent: int = 0  # body bytes written before the answer ended or the client hung up

    def range_end(self) -> int | None:
        """Last byte asked for by `Range: bytes=a-b`; None without a range."""
        match = _RANGE.match(self.range.strip()) if self.range else None
        return int(match[2]) if match and match[2] else None


@dataclass
class HubServer:
    endpoint: str
    repos: dict[str, FakeRepo]
    static: dict[str, bytes] = field(default_factory=dict)  # path -> bytes, served as is (with Range)
    log: list[Request] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)  # set when the server stops: drips end
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, request: Request) -> None:
        with self._lock:
            self.log.append(request)

    def paths(self) -> list[str]:
        with self._lock:
            return [r.path for r in self.log]

    def requests(self) -> list[Request]:
        with self._lock:
            return list(self.log)


@dataclass(frozen=True)
class _Body:
    """A body of `size` bytes: `prefix`, `fill` repeated, `suffix`; made piece by piece as it is sent."""

    prefix: bytes
    size: int
    fill: bytes = b" "
    suffix: bytes = b""

    def pieces(self, start: int, end: int) -> Iterator[bytes]:
        """Bytes [start, end) in pieces of at most 64 KiB."""
        pos = start
        while pos < end:
            tail = self.size - len(self.suffix)
            if pos < len(self.prefix):
                piece = self.prefix[pos : min(end, len(self.prefix), pos + 65536)]
            elif pos >= tail:
                piece = self.suffix[pos - tail : end - tail]
            else:
                n = min(end, tail) - pos
                n = min(n, 65536)
                offset = (pos - len(self.prefix)) % len(self.fill)
                piece = (self.fill * (n // len(self.fill) + 2))[offset : offset + n]
            yield piece
            pos += len(piece)


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+?)(?:/revision/(?P<rev>[^/]+))?$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the Hub; every answer has a Content-Length
    hub: HubServer  # set on the subclass made per server

    def log_message(self, format: str, *args: Any) -> None:  # the base class names it `format`
        pass  # requests are recorded in hub.log instead of printed

    def do_HEAD(self) -> None:  # http.server dispatches on do_<METHOD>
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None

    def _route(self, *, head: bool) -> None:
        raw_path = urlsplit(self.path).path
        self._size: int | None = None
        self._sent = 0
        status = 0
        try:
            status = self._answer(raw_path, head=head)
        finally:  # recorded also when the client hung up mid-answer
            request = Request(
                self.command, unquote(raw_path), self.headers.get("Range"), self._token(), status, self._size,
                self._sent,
            )  # fmt: skip
            self.hub.record(request)

    def _answer(self, raw_path: str, *, head: bool) -> int:
        if raw_path in self.hub.static:
            data = self.hub.static[raw_path]
            self._size = len(data)
            return self._ranged(_Body(data, len(data)), {"Accept-Ranges": "bytes"}, head=head, how=Misbehave())
        if match := _RESOLVE.match(raw_path):
            return self._resolve(unquote(match["repo"]), unquote(match["rev"]), unquote(match["file"]), head=head)
        if match := _API.match(raw_path):
            return self._api(unquote(match["repo"]), unquote(match["rev"] or "main"), head=head)
        return self._error(404, None, "Not Found", head=head)

    def _access(self, repo_id: str, *, head: bool) -> tuple[FakeRepo | None, int | None]:
        """The repo, or the error status already sent (as the Hub: hide private, 401 vs 403 for gated)."""
        repo = self.hub.repos.get(repo_id)
        token = self._token()
        if repo is None or (repo.private and token not in repo.tokens):
            status = 404 if token else 401
            return None, self._error(status, "RepoNotFound", "Repository not found", head=head)
        if repo.status is not None:
            return None, self._error(repo.status, None, "Service Unavailable", head=head)
        if repo.gated and token not in repo.tokens:
            if token is None:
                message = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
                return None, self._error(401, "GatedRepo", message, head=head)
            message = f"Access to model {repo_id} is restricted and you are not in the authorized list."
            return None, self._error(403, "GatedRepo", message, head=head)
        return repo, None

    def _resolve(self, repo_id: str, revision: str, filename: str, *, head: bool) -> int:
        repo, status = self._access(repo_id, head=head)
        if repo is None:
            return status or 500
        if revision not in repo.branches and revision != repo.sha:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
        how = repo.misbehave.get(filename) or repo.misbehave.get("*") or Misbehave()
        if how.delay_s and self.hub.stopping.wait(how.delay_s):
            return 0
        commit = _apply({"X-Repo-Commit": repo.sha}, how.headers)
        if how.redirect is not None:
            return self._send(302, b"", head=head, extra={**commit, "Location": how.redirect}, how=how)
        if filename not in repo.files and how.length is None:
            return self._error(
                404, "EntryNotFound", f'{filename} does not exist on "{revision}"', head=head, extra=commit
            )
        data = repo.files.get(filename, b"")
        body = _Body(data, len(data))
        if how.length is not None:
            body = _Body(how.prefix or data, how.length, how.fill, how.suffix)
        self._size = body.size
        etag = hashlib.sha256(data + how.prefix).hexdigest()
        headers = _apply({"X-Repo-Commit": repo.sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}, how.headers)
        return self._ranged(body, headers, head=head, how=how)

    def _ranged(self, body: _Body, headers: dict[str, str], *, head: bool, how: Misbehave) -> int:
        """200 with the whole body, or 206 with the slice a `Range: bytes=a-b` asks for."""
        wanted = self.headers.get("Range")
        size = body.size
        if wanted and not head and not how.ignore_range:
            match = _RANGE.match(wanted.strip())
            if match is None or int(match[1]) >= size:
                return self._send(416, b"", head=head, extra={**headers, "Content-Range": f"bytes */{size}"}, how=how)
            start = int(match[1])
            end = min(int(match[2]) if match[2] else size - 1, size - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            return self._send(206, body, head=head, extra=headers, span=(start, end + 1), how=how)
        return self._send(200, body, head=head, extra=headers, span=(0, size), how=how)

    def _api(self, repo_id: str, revision: str, *, head: bool) -> int:
        repo, status = self._access(repo_id, head=head)
        if repo is None:
            return status or 500
        if revision not in repo.branches and revision != repo.sha:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
        info = {
            "id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "siblings": [{"rfilename": name} for name in sorted(repo.files)],
        }  # fmt: skip
        return self._send(200, json.dumps(info).encode(), head=head, extra={"Content-Type": "application/json"})

    def _error(
        self, status: int, code: str | None, message: str, *, head: bool, extra: Mapping[str, str] | None = None
    ) -> int:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        return self._send(status, json.dumps({"error": message}).encode(), head=head, extra=headers)

    def _send(
        self,
        status: int,
        body: bytes | _Body,
        *,
        head: bool,
        extra: Mapping[str, str],
        span: tuple[int, int] | None = None,
        how: Misbehave | None = None,
    ) -> int:
        how = how or Misbehave()
        if isinstance(body, bytes):
            body = _Body(body, len(body))
        start, end = span or (0, body.size)
        lines = [f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}", *(f"{k}: {v}" for k, v in extra.items())]
        if how.send_length:
            lines.append(f"Content-Length: {end - start}")
        else:  # the body ends when the connection does
            lines.append("Connection: close")
            self.close_connection = True
        try:
            self._write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), how.drip_head_s, count=False)
            if not head:
                for piece in body.pieces(start, end):
                    self._write(piece, how.drip_s)
        except OSError:  # the client hung up (or the server is stopping): the answer ends here
            self.close_connection = True
        return status

    def _write(self, data: bytes, drip_s: float, *, count: bool = True) -> None:
        if not drip_s:
            self.wfile.write(data)
            self._sent += len(data) if count else 0
            return
        for i in range(len(data)):
            self.wfile.write(data[i : i + 1])
            self._sent += 1 if count else 0
            if self.hub.stopping.wait(drip_s):
                raise ConnectionAbortedError("server stopping")


def _apply(headers: Mapping[str, str], changes: Mapping[str, str | None]) -> dict[str, str]:
    """headers with `changes` set (a value) or dropped (None); names compared without case."""
    out = {k: v for k, v in headers.items() if k.lower() not in {c.lower() for c in changes}}
    out.update({k: v for k, v in changes.items() if v is not None})
    return out


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up mid-answer is what several tests do on purpose


@contextmanager
def hub_server(repos: Mapping[str, FakeRepo], static: Mapping[str, bytes] | None = None) -> Iterator[HubServer]:
    """Serve `repos` on a free port of 127.0.0.1 until the block ends; yields endpoint and request log."""
    hub = HubServer(endpoint="", repos=dict(repos), static=dict(static or {}))
    handler = type("Handler", (_Handler,), {"hub": hub})
    server = _Server(("127.0.0.1", 0), handler)
    hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        hub.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def closed_endpoint() -> str:
    """An endpoint on a port nothing listens on: connections are refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def env_for(endpoint: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for a moeplan subprocess that talks only to `endpoint`, with its own empty cache.

    Any request that is not for 127.0.0.1 goes to a proxy on a closed port and fails, so a test
    that reaches for the internet breaks loudly instead of passing by luck.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    dead_proxy = closed_endpoint()
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_ETAG_TIMEOUT="3",
        HF_HUB_DOWNLOAD_TIMEOUT="3",
        HTTP_PROXY=dead_proxy,
        HTTPS_PROXY=dead_proxy,
        ALL_PROXY=dead_proxy,
        NO_PROXY="127.0.0.1,localhost",
        PYTHONDONTWRITEBYTECODE="1",
        COLUMNS="200",
    )
    for key in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        env.pop(key, None)
    env.update(extra)
    return env


# ----------------------------------------------------------------------------------------------
# Safetensors headers and repos
# ----------------------------------------------------------------------------------------------


def safetensors_header(tensors: Tensors, metadata: Mapping[str, str] | None = None) -> bytes:
    """The first bytes of a safetensors file: u64 little-endian header length, then the JSON header.

    Data offsets are laid out back to back, as if the data followed.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = math.prod(shape) * DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    body = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(body)) + body


def raw_safetensors(claimed_length: int, body: bytes) -> bytes:
    """A header whose length prefix says `claimed_length`, followed by `body` (to build broken files)."""
    return struct.pack("<Q", claimed_length) + body


def tensor_bytes(tensors: Tensors) -> int:
    return sum(math.prod(shape) * DTYPE_BYTES[dtype] for dtype, shape in tensors.values())


def sharded_repo(config: Mapping[str, Any], tensors: Tensors, *, shards: int = 4, **repo: Any) -> FakeRepo:
    """config.json + model-0000i-of-0000n.safetensors + model.safetensors.index.json, split in order."""
    names = list(tensors)
    per = -(-len(names) // shards)
    files: dict[str, bytes] = {"config.json": json.dumps(config, indent=2).encode()}
    weight_map: dict[str, str] = {}
    for i in range(shards):
        chunk = {name: tensors[name] for name in names[i * per : (i + 1) * per]}
        filename = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        files[filename] = safetensors_header(chunk)
        weight_map.update(dict.fromkeys(chunk, filename))
    index = {"metadata": {"total_size": tensor_bytes(tensors)}, "weight_map": weight_map}
    files["model.safetensors.index.json"] = json.dumps(index, indent=2).encode()
    return FakeRepo(files=files, **repo)


def single_file_repo(config: Mapping[str, Any], tensors: Tensors, **repo: Any) -> FakeRepo:
    files = {"config.json": json.dumps(config, indent=2).encode(), "model.safetensors": safetensors_header(tensors)}
    return FakeRepo(files=files, **repo)


# ----------------------------------------------------------------------------------------------
# Every tensor of a few real architectures, with real names and shapes, from their config.json.
# Sources: transformers modeling_mixtral.py, DeepSeek-V3 modeling_deepseek.py + README_WEIGHTS.md
# (fp8 e4m3 weights with F32 weight_scale_inv per 128x128 block; MTP layer = layer num_hidden_layers),
# transformers modeling_gpt_oss.py + integrations/mxfp4.py (U8 *_blocks [.., n/32, 16], *_scales).
# ----------------------------------------------------------------------------------------------


def mixtral_tensors(cfg: Mapping[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    out: dict[str, tuple[str, tuple[int, ...]]] = {"model.embed_tokens.weight": ("BF16", (vocab, h))}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = ("BF16", (h,))
        out[p + "post_attention_layernorm.weight"] = ("BF16", (h,))
        out[p + "self_attn.q_proj.weight"] = ("BF16", (q, h))
        out[p + "self_attn.k_proj.weight"] = ("BF16", (kv, h))
        out[p + "self_attn.v_proj.weight"] = ("BF16", (kv, h))
        out[p + "self_attn.o_proj.weight"] = ("BF16", (h, q))
        out[p + "block_sparse_moe.gate.weight"] = ("BF16", (cfg["num_local_experts"], h))
        for e in range(cfg["num_local_experts"]):
            x = f"{p}block_sparse_moe.experts.{e}."
            out[x + "w1.weight"] = ("BF16", (inter, h))
            out[x + "w2.weight"] = ("BF16", (h, inter))
            out[x + "w3.weight"] = ("BF16", (inter, h))
    out["model.norm.weight"] = ("BF16", (h,))
    out["lm_head.weight"] = ("BF16", (vocab, h))
    return out


def _fp8_linear(out: dict[str, tuple[str, tuple[int, ...]]], name: str, rows: int, cols: int, block: int) -> None:
    out[name + ".weight"] = ("F8_E4M3", (rows, cols))
    out[name + ".weight_scale_inv"] = ("F32", (-(-rows // block), -(-cols // block)))


def deepseek_v3_tensors(cfg: Mapping[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """All tensors of DeepSeek-V3 as shipped: fp8 linears + scales, BF16 rest, MTP layer(s) at the end."""
    h, vocab, heads = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"]
    block = cfg["quantization_config"]["weight_block_size"][0]
    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    q_rank, kv_rank = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    n_layers, n_mtp = cfg["num_hidden_layers"], cfg.get("num_nextn_predict_layers", 0)
    out: dict[str, tuple[str, tuple[int, ...]]] = {"model.embed_tokens.weight": ("BF16", (vocab, h))}
    for i in range(n_layers + n_mtp):
        p = f"model.layers.{i}."
        if i >= n_layers:  # MTP module: its own embedding/head copies, two norms, eh_proj (2H -> H)
            out[p + "embed_tokens.weight"] = ("BF16", (vocab, h))
            out[p + "enorm.weight"] = ("BF16", (h,))
            out[p + "hnorm.weight"] = ("BF16", (h,))
            out[p + "eh_proj.weight"] = ("BF16", (h, 2 * h))
            out[p + "shared_head.norm.weight"] = ("BF16", (h,))
            out[p + "shared_head.head.weight"] = ("BF16", (vocab, h))
        out[p + "input_layernorm.weight"] = ("BF16", (h,))
        out[p + "post_attention_layernorm.weight"] = ("BF16", (h,))
        a = p + "self_attn."
        _fp8_linear(out, a + "q_a_proj", q_rank, h, block)
        out[a + "q_a_layernorm.weight"] = ("BF16", (q_rank,))
        _fp8_linear(out, a + "q_b_proj", heads * (nope + rope), q_rank, block)
        _fp8_linear(out, a + "kv_a_proj_with_mqa", kv_rank + rope, h, block)
        out[a + "kv_a_layernorm.weight"] = ("BF16", (kv_rank,))
        _fp8_linear(out, a + "kv_b_proj", heads * (nope + v), kv_rank, block)
        _fp8_linear(out, a + "o_proj", h, heads * v, block)
        m = p + "mlp."
        if i < cfg["first_k_dense_replace"]:
            inter = cfg["intermediate_size"]
            _fp8_linear(out, m + "gate_proj", inter, h, block)
            _fp8_linear(out, m + "up_proj", inter, h, block)
            _fp8_linear(out, m + "down_proj", h, inter, block)
            continue
        inter, experts = cfg["moe_intermediate_size"], cfg["n_routed_experts"]
        out[m + "gate.weight"] = ("BF16", (experts, h))
        out[m + "gate.e_score_correction_bias"] = ("F32", (experts,))
        for e in range(experts):
            _fp8_linear(out, f"{m}experts.{e}.gate_proj", inter, h, block)
            _fp8_linear(out, f"{m}experts.{e}.up_proj", inter, h, block)
            _fp8_linear(out, f"{m}experts.{e}.down_proj", h, inter, block)
        shared = inter * cfg["n_shared_experts"]
        _fp8_linear(out, m + "shared_experts.gate_proj", shared, h, block)
        _fp8_linear(out, m + "shared_experts.up_proj", shared, h, block)
        _fp8_linear(out, m + "shared_experts.down_proj", h, shared, block)
    out["model.norm.weight"] = ("BF16", (h,))
    out["lm_head.weight"] = ("BF16", (vocab, h))
    return out


def gpt_oss_tensors(cfg: Mapping[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """gpt-oss as shipped: BF16 attention/router/embeddings, mxfp4 experts (U8 blocks of 32 fp4 in 16 bytes)."""
    h, vocab, inter = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    heads, kv, hd, experts = (
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["head_dim"],
        cfg["num_local_experts"],
    )
    out: dict[str, tuple[str, tuple[int, ...]]] = {"model.embed_tokens.weight": ("BF16", (vocab, h))}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = ("BF16", (h,))
        out[p + "post_attention_layernorm.weight"] = ("BF16", (h,))
        for proj, rows in (("q_proj", heads * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
            out[f"{p}self_attn.{proj}.weight"] = ("BF16", (rows, h))
            out[f"{p}self_attn.{proj}.bias"] = ("BF16", (rows,))
        out[p + "self_attn.o_proj.weight"] = ("BF16", (h, heads * hd))
        out[p + "self_attn.o_proj.bias"] = ("BF16", (h,))
        out[p + "self_attn.sinks"] = ("BF16", (heads,))
        out[p + "mlp.router.weight"] = ("BF16", (experts, h))
        out[p + "mlp.router.bias"] = ("BF16", (experts,))
        for proj, rows, cols in (("gate_up_proj", 2 * inter, h), ("down_proj", h, inter)):
            out[f"{p}mlp.experts.{proj}_blocks"] = ("U8", (experts, rows, cols // 32, 16))
            out[f"{p}mlp.experts.{proj}_scales"] = ("U8", (experts, rows, cols // 32))
            out[f"{p}mlp.experts.{proj}_bias"] = ("BF16", (experts, rows))
    out["model.norm.weight"] = ("BF16", (h,))
    out["lm_head.weight"] = ("BF16", (vocab, h))
    return out

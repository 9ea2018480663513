"""A GGUF file as a model: its header (metadata and tensor infos), never its tensor data.

Format: ggml-org/ggml docs/gguf.md (GGUF v3, v2 reads the same):
    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x   (key: string, value_type u32, value)      string = u64 length + bytes
    tensor_count x (name: string, n_dims u32, dims u64[n_dims], ggml_type u32, offset u64)
    padding to general.alignment (default 32) | tensor data (offsets relative to its start)
A model split by llama.cpp's gguf-split is NAME-00001-of-0000N.gguf ...: the first part holds the
metadata, every part its own tensor infos (split.count, split.no, split.tensors.count).

The gguf package (ggml-org/llama.cpp gguf-py) supplies what a header means: the ggml types with their
block sizes (GGML_QUANT_SIZES, so Q4_K_M sizes are the file's own: 144 bytes per 256 Q4_K weights),
the file types, value types and key names. Its GGUFReader is not used to walk the header: it builds
numpy arrays per array element (9.6 s for a 152k-token vocabulary measured here) and loops forever on
a hostile array length (past the end its reads come back empty and the offset stops moving). This
module walks the header itself, in bounded chunks, checking every length against the file size and
every count against a cap before trusting it; it never reads a tensor's data.

The metadata becomes a Hugging Face style config for hf_config.spec_from_config (llama incl. Mixtral,
qwen2moe, qwen3moe, deepseek2, gpt-oss); the tensor infos become a StoredCheckpoint (what the file
stores, by ggml type) and, in quantization_config, the file's bytes per moeplan component, which
`file_scheme` turns into a QuantScheme whose weights are the file's own bytes.

numpy and gguf are imported inside functions only: importing moeplan never imports them.
"""

from __future__ import annotations

import math
import os
import re
import stat
import struct
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from moeplan.errors import ConfigError, QuantError

if TYPE_CHECKING:
    from moeplan.quant import QuantScheme
    from moeplan.spec import ModelSpec, StoredCheckpoint

# The scheme name of "the GGUF file's own tensor types" (see file_scheme).
FILE_SCHEME = "gguf-file"
QUANT_METHOD = "gguf"

# Caps on what a header may claim, far above any published model and low enough that a hostile
# header costs well under a second and a few MB. DeepSeek-V3 as GGUF has ~1,150 tensors; Gemma 3's
# vocabulary, the largest common one, 262,144 tokens.
MAX_TENSORS = 100_000
MAX_KV = 65_536
MAX_KEY_BYTES = 65_535  # gguf.md: a key is at most 2^16-1 bytes
MAX_NAME_BYTES = 256  # gguf.md: a tensor name at most 64 bytes; llama.cpp refuses longer ones
MAX_DIMS = 4  # gguf.md: n_dimensions "currently at most 4" (GGML_MAX_DIMS)
MAX_ARRAY_LEN = 1 << 21  # elements in one metadata array
MAX_WALKED = 1 << 22  # string / nested array elements walked one by one, over the whole header (~1 s)
MAX_NESTING = 8
MAX_KEPT_STRING = 1 << 16  # longer strings (chat templates) are skipped, not read
MAX_KEPT_ARRAY = 4096  # numeric arrays kept (per-layer values); longer ones only counted
MAX_SHARDS = 1024
MAX_BLOCKS = 1024  # block_count: every block becomes a LayerSpec (spec.py bounds layers the same)
MAX_ALIGNMENT = 1 << 20
_CHUNK = 1 << 20

# gguf.md gguf_metadata_value_type -> struct format of the fixed-size ones.
# A bool is read as a byte ("?" would take any non-zero byte as true) and checked to be 0 or 1.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


class GGUFError(ConfigError):
    """A GGUF file moeplan cannot read: one line naming the file and what is wrong."""


# ----------------------------------------------------------------------------------------------
# The header, as read
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: str  # gguf GGMLQuantizationType name: "Q4_K", "F32", ...
    shape: tuple[int, ...]  # ggml order: shape[0] is the row (contiguous) dimension
    n_elements: int
    n_bytes: int  # elements / block size x bytes per block (GGML_QUANT_SIZES)
    offset: int  # absolute byte offset of its data in its file
    file: int = 0  # which part of a split model


@dataclass(frozen=True)
class Skipped:
    """A metadata value not kept in memory: a long string, a long or nested array, or undecodable text."""

    kind: str  # "string", "array[<type>]", "text that is not UTF-8"
    length: int


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    num_files: int = 1
    file_bytes: int = 0


class _Cursor:
    """Reads a file front to back in bounded chunks; every read is checked against the file size."""

    def __init__(self, f: BinaryIO, size: int, label: str, order: str = "<") -> None:
        self.f, self.size, self.label, self.order = f, size, label, order
        self.buf = b""
        self.base = 0  # file offset of buf[0]
        self.i = 0
        self.walked = 0

    @property
    def pos(self) -> int:
        return self.base + self.i

    def fail(self, message: str) -> GGUFError:
        return GGUFError(f"{self.label}: {message}")

    def truncated(self, what: str, n: int) -> GGUFError:
        return self.fail(f"truncated: {what} at byte {self.pos:,} needs {n:,} bytes but the file ends at byte "
                         f"{self.size:,}; the file is damaged or incomplete, re-download it")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.truncated(what, n)
        if len(self.buf) - self.i >= n:
            return
        rest = self.buf[self.i:]
        want = min(max(n - len(rest), _CHUNK), self.size - self.pos - len(rest))
        self.f.seek(self.pos + len(rest))
        more = self.f.read(want)
        self.base, self.buf, self.i = self.pos, rest + more, 0
        if len(self.buf) < n:  # the file shrank under us
            raise self.truncated(what, n)

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        out = self.buf[self.i:self.i + n]
        self.i += n
        return out

    def skip(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.truncated(what, n)
        if len(self.buf) - self.i >= n:
            self.i += n
        else:
            self.base, self.buf, self.i = self.pos + n, b"", 0

    def unpack_all(self, fmt: str, what: str) -> tuple[Any, ...]:
        s = _struct(self.order + fmt)
        self.need(s.size, what)
        values = s.unpack_from(self.buf, self.i)
        self.i += s.size
        return values

    def unpack(self, fmt: str, what: str) -> Any:
        return self.unpack_all(fmt, what)[0]

    def length(self, what: str, unit: int, cap: int | None = None) -> int:
        """A u64 length that must fit in the rest of the file (at `unit` bytes each) and under `cap`."""
        at = self.pos
        n = self.unpack("Q", what)
        if cap is not None and n > cap:
            raise self.fail(f"{what} at byte {at:,} claims {n:,} (the limit is {cap:,}); the header is damaged")
        if n * unit > self.size - self.pos:
            size = f" ({n * unit:,} bytes or more)" if unit > 1 else " bytes"
            raise self.fail(f"{what} at byte {at:,} claims {n:,}{size} but only {self.size - self.pos:,} bytes "
                            "follow; the file is damaged or truncated")
        return n

    def skip_strings(self, n: int, what: str) -> None:
        """Walk n strings without keeping them: the hot loop of a vocabulary (tokens, merges)."""
        u64 = _struct(self.order + "Q")
        for _ in range(n):
            if len(self.buf) - self.i < 8:
                self.need(8, f"string length in {what}")
            length = u64.unpack_from(self.buf, self.i)[0]
            self.i += 8
            if length <= len(self.buf) - self.i:
                self.i += length
            else:
                self.skip(length, f"string in {what}")

    def text(self, what: str, cap: int) -> str:
        at = self.pos
        raw = self.take(self.length(f"{what} length", 1, cap), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {at:,} is not UTF-8 text ({raw[:24]!r}); the header is damaged") from None

    def walk(self, n: int, what: str) -> None:
        self.walked += n
        if self.walked > MAX_WALKED:
            raise self.fail(f"the metadata arrays hold more than {MAX_WALKED:,} strings or nested arrays in all "
                            f"({what}); moeplan refuses headers that large")


@lru_cache(maxsize=64)
def _struct(fmt: str) -> struct.Struct:
    return struct.Struct(fmt)


def _open_regular(path: Path, label: str) -> tuple[BinaryIO, int]:
    """Open for reading only if it is a regular file: a FIFO would block, /dev/zero never end."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise GGUFError(f"cannot read {label}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
            raise GGUFError(f"{label} is {kind}, not a GGUF file; give the path of a .gguf file")
        return os.fdopen(fd, "rb"), st.st_size  # buffered: read(n) returns n bytes unless at the end
    except BaseException:
        os.close(fd)
        raise


def read_header(path: Path) -> GGUFHeader:
    """The header of a GGUF file, and of the other parts when it is the first part of a split model."""
    path = Path(path)
    first = _read_one(path, str(path))
    count = first.metadata.get("split.count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_SHARDS:
        raise GGUFError(f"{path}: split.count {count!r} is not a part count between 1 and {MAX_SHARDS}")
    if count == 1:
        return first
    no = first.metadata.get("split.no", 0)
    match = _SPLIT_NAME.match(path.name)
    if no != 0 or (match and int(match["no"]) != 1):
        part = f"part {no + 1} of {count}" if isinstance(no, int) else f"one of {count} parts"
        raise GGUFError(f"{path} is {part} of a split model; give the first part (NAME-00001-of-{count:05d}.gguf), "
                        "which holds the metadata")
    if not match or int(match["count"]) != count:
        raise GGUFError(f"{path}: the model is split into {count} parts but the name does not follow "
                        f"NAME-00001-of-{count:05d}.gguf, so the other parts cannot be found; keep gguf-split's names")
    tensors = list(first.tensors)
    size = first.file_bytes
    for i in range(1, count):
        part_path = path.with_name(f"{match['stem']}-{i + 1:05d}-of-{count:05d}.gguf")
        if not part_path.exists():
            raise GGUFError(f"{path}: part {i + 1} of {count} ({part_path.name}) is missing; download every part")
        part = _read_one(part_path, str(part_path), file_index=i)
        if part.metadata.get("split.no", i) != i:
            raise GGUFError(f"{part_path}: says it is part {part.metadata.get('split.no')!r}, expected {i}")
        tensors += part.tensors
        size += part.file_bytes
        if len(tensors) > MAX_TENSORS:
            raise GGUFError(f"{path}: the parts hold more than {MAX_TENSORS:,} tensors; moeplan refuses that many")
    expected = first.metadata.get("split.tensors.count")
    if isinstance(expected, int) and not isinstance(expected, bool) and expected != len(tensors):
        raise GGUFError(f"{path}: split.tensors.count says {expected:,} tensors, the {count} parts hold "
                        f"{len(tensors):,}")
    _no_duplicates(tensors, str(path))
    return GGUFHeader(path=path, version=first.version, metadata=first.metadata, tensors=tuple(tensors),
                      num_files=count, file_bytes=size)


def _read_one(path: Path, label: str, file_index: int = 0) -> GGUFHeader:
    f, size = _open_regular(path, label)
    with f:
        return _parse(_Cursor(f, size, label), file_index)


def _parse(cur: _Cursor, file_index: int) -> GGUFHeader:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # the ggml type table; imports numpy

    if cur.size < 24:
        raise cur.fail(f"{cur.size} bytes is too short for a GGUF header (24 bytes or more); not a GGUF file")
    magic = cur.take(4, "magic")
    if magic != b"GGUF":
        raise cur.fail(f"not a GGUF file: it starts with {magic!r}, not b'GGUF'")
    raw_version = cur.take(4, "version")
    version = struct.unpack("<I", raw_version)[0]
    if version not in (2, 3):
        swapped = struct.unpack(">I", raw_version)[0]
        if swapped in (2, 3):  # gguf.md: v3 files may be big-endian throughout
            cur.order, version = ">", swapped
        elif version == 1:
            raise cur.fail("GGUF version 1 (2023) is not supported; re-convert it with a current llama.cpp")
        else:
            raise cur.fail(f"unknown GGUF version {version}; moeplan reads versions 2 and 3")
    # The smallest tensor info is 32 bytes (name length, n_dims, one dim, type, offset), the smallest
    # key-value 13 (key length, type, a one-byte value): a count that cannot fit is a lie.
    n_tensors = cur.length("tensor count", 32, MAX_TENSORS)
    n_kv = cur.length("metadata key-value count", 13, MAX_KV)
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        at = cur.pos
        key = cur.text("metadata key", MAX_KEY_BYTES)
        if key in metadata:
            raise cur.fail(f"metadata key {key!r} appears twice (again at byte {at:,}); the header is damaged")
        vtype = cur.unpack("I", f"type of {key!r}")
        metadata[key] = _value(cur, vtype, key, 0)
    alignment = metadata.get("general.alignment", 32)
    if (not isinstance(alignment, int) or isinstance(alignment, bool) or not 1 <= alignment <= MAX_ALIGNMENT
            or alignment & (alignment - 1)):
        raise cur.fail(f"general.alignment {alignment!r} is not a power of two up to {MAX_ALIGNMENT:,}")
    infos = []
    for _ in range(n_tensors):
        name = cur.text("tensor name", MAX_NAME_BYTES)
        n_dims = cur.unpack("I", f"dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions; GGUF tensors have 1 to {MAX_DIMS}")
        dims = cur.unpack_all(f"{n_dims}Q", f"dimensions of {name!r}")
        type_id = cur.unpack("I", f"type of {name!r}")
        offset = cur.unpack("Q", f"offset of {name!r}")
        infos.append((name, dims, type_id, offset))
    data_start = -(-cur.pos // alignment) * alignment
    if infos and data_start > cur.size:
        raise cur.truncated("the tensor data", data_start - cur.pos)
    tensors = []
    for name, dims, type_id, offset in infos:
        try:
            ggml_type = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            raise cur.fail(f"tensor {name!r} has ggml type {type_id}, which this gguf package does not know; "
                           "upgrade it (pip install -U gguf) or re-convert the file") from None
        n = math.prod(dims)
        if dims[0] % block:
            raise cur.fail(f"tensor {name!r} ({ggml_type.name}) has rows of {dims[0]:,} values, not a multiple of "
                           f"its block of {block}; the header is damaged")
        n_bytes = n // block * type_size
        if offset % alignment or offset + n_bytes > cur.size - data_start:
            raise cur.fail(f"tensor {name!r} claims {n_bytes:,} bytes at data offset {offset:,}, outside the "
                           f"{cur.size - data_start:,} bytes of tensor data (or not aligned to {alignment}); "
                           "the file is damaged or truncated, re-download it")
        tensors.append(TensorInfo(name=name, ggml_type=ggml_type.name, shape=dims, n_elements=n, n_bytes=n_bytes,
                                  offset=data_start + offset, file=file_index))
    _no_duplicates(tensors, cur.label)
    ordered = sorted(tensors, key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:]):
        if b.offset < a.offset + a.n_bytes:
            raise cur.fail(f"tensors {a.name!r} and {b.name!r} overlap in the file; the header is damaged")
    return GGUFHeader(path=Path(cur.label), version=version, metadata=metadata, tensors=tuple(tensors),
                      file_bytes=cur.size)


def _no_duplicates(tensors: list[TensorInfo], label: str) -> None:
    seen: set[str] = set()
    for t in tensors:
        if t.name in seen:
            raise GGUFError(f"{label}: tensor {t.name!r} appears twice; the header is damaged")
        seen.add(t.name)


def _value(cur: _Cursor, vtype: int, key: str, depth: int) -> Any:
    if vtype in _SCALARS:
        value = cur.unpack(_SCALARS[vtype], f"value of {key!r}")
        if vtype == 7 and value not in (0, 1):  # gguf.md: a bool byte other than 0 or 1 is invalid
            raise cur.fail(f"{key!r} is a bool of value {value}; the header is damaged")
        return bool(value) if vtype == 7 else value
    if vtype == _STRING:
        n = cur.length(f"string length of {key!r}", 1)
        if n > MAX_KEPT_STRING:
            cur.skip(n, f"string of {key!r}")
            return Skipped("string", n)
        raw = cur.take(n, f"string of {key!r}")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:  # a value moeplan reads is checked where it is read
            return Skipped("text that is not UTF-8", n)
    if vtype == _ARRAY:
        if depth >= MAX_NESTING:
            raise cur.fail(f"{key!r} nests arrays more than {MAX_NESTING} deep; the header is damaged")
        item = cur.unpack("I", f"array type of {key!r}")
        if item in _SCALARS:
            size = struct.calcsize(_SCALARS[item])
            n = cur.length(f"array length of {key!r}", size, MAX_ARRAY_LEN)
            if n <= MAX_KEPT_ARRAY and depth == 0:
                values = list(cur.unpack_all(f"{n}{_SCALARS[item]}", f"array {key!r}"))
                if item == 7 and any(v not in (0, 1) for v in values):
                    raise cur.fail(f"{key!r} holds a bool other than 0 or 1; the header is damaged")
                return [bool(v) for v in values] if item == 7 else values
            cur.skip(n * size, f"array {key!r}")
            return Skipped(f"array[{_SCALARS[item]}]", n)
        if item in (_STRING, _ARRAY):
            n = cur.length(f"array length of {key!r}", 8 if item == _STRING else 12, MAX_ARRAY_LEN)
            cur.walk(n, key)
            if item == _STRING:
                cur.skip_strings(n, repr(key))
            for _ in range(n if item == _ARRAY else 0):
                _value(cur, _ARRAY, key, depth + 1)
            return Skipped("array[string]" if item == _STRING else "array[array]", n)
        raise cur.fail(f"{key!r} is an array of unknown value type {item}; the header is damaged")
    raise cur.fail(f"{key!r} has unknown value type {vtype}; the header is damaged")


# ----------------------------------------------------------------------------------------------
# Tensors -> moeplan components
# ----------------------------------------------------------------------------------------------

# llama.cpp tensor names (gguf-py constants TENSOR_NAMES) -> the components of moeplan.params. Norms
# inside attention (q/k norms, MLA's q_a/kv_a norms) are counted with attention there too.
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+?)(?:\.(?:weight|bias))?$")
_PER_EXPERT = re.compile(r"^ffn_(?:gate|up|down)\.\d+$")  # Mixtral GGUFs converted before 2024
_IN_BLOCK = {
    "attention": ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "attn_q_a", "attn_q_b", "attn_kv_a_mqa",
                  "attn_kv_b", "attn_k_b", "attn_v_b", "attn_q_norm", "attn_k_norm", "attn_q_a_norm",
                  "attn_kv_a_norm", "attn_sinks"),
    "norms": ("attn_norm", "ffn_norm", "post_attention_norm", "post_ffw_norm", "layer_output_norm"),
    "router": ("ffn_gate_inp", "exp_probs_b", "ffn_gate_inp_shexp"),
    "routed_experts": ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_up_exps"),
    "shared_experts": ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"),
    "dense_ffn": ("ffn_gate", "ffn_up", "ffn_down"),
}
_BY_STEM = {stem: component for component, stems in _IN_BLOCK.items() for stem in stems}
_TOP = {"token_embd.weight": "embedding", "output.weight": "lm_head", "output_norm.weight": "norms",
        "output_norm.bias": "norms"}
# Not weights of the model: llama.cpp's precomputed rope factors (Llama 3.1 rope_freqs).
NOT_WEIGHTS = ("rope_freqs.weight",)


def component_of(name: str, num_layers: int) -> str:
    """The moeplan component of one GGUF tensor: a params component, 'mtp' for blocks past the
    decoder layers, 'not_weights' for buffers, 'other' for names moeplan does not place."""
    if name in _TOP:
        return _TOP[name]
    if name in NOT_WEIGHTS:
        return "not_weights"
    m = _BLOCK.match(name)
    if not m:
        return "other"
    if int(m[1]) >= num_layers:
        return "mtp"
    stem = m[2]
    if _PER_EXPERT.match(stem):
        return "routed_experts"
    return _BY_STEM.get(stem, "other")


def block_of(name: str) -> int | None:
    m = _BLOCK.match(name)
    return int(m[1]) if m else None


# ----------------------------------------------------------------------------------------------
# Metadata -> a Hugging Face style config for spec_from_config
# ----------------------------------------------------------------------------------------------

ARCHITECTURES = ("llama", "qwen2moe", "qwen3moe", "deepseek2", "gpt-oss")
# Caps on the sizes moeplan plans over, far above published models (llama.cpp's own: LLAMA_MAX_LAYERS
# 512, LLAMA_MAX_EXPERTS 512 in src/llama-hparams.h); any other <arch>. number is capped at 2^32.
_LIMITS = {"block_count": MAX_BLOCKS, "expert_count": 65_536, "expert_used_count": 65_536,
           "expert_shared_count": 65_536, "attention.head_count": 65_536, "attention.head_count_kv": 65_536,
           "embedding_length": 1 << 20, "leading_dense_block_count": MAX_BLOCKS, "nextn_predict_layers": MAX_BLOCKS}


class _Meta:
    """Typed reads of `<arch>.` keys, each with the file and key in its error."""

    def __init__(self, header: GGUFHeader) -> None:
        self.kv = header.metadata
        self.label = str(header.path)
        arch = self.kv.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise GGUFError(f"{self.label}: no general.architecture text in the header ({_show(arch)}); not a "
                            "model GGUF")
        self.arch = arch

    def key(self, name: str) -> str:
        return f"{self.arch}.{name}"

    def int(self, name: str, default: int | None = None, *, minimum: int = 0) -> int | None:
        """A whole number under the key's cap (_LIMITS): planning loops over layers and experts."""
        key = self.key(name)
        value = self.kv.get(key)
        if value is None:
            return default
        if isinstance(value, list) and value:
            # Per-layer arrays (head_count_kv in some converters): one value, or moeplan cannot model it.
            if any(v != value[0] for v in value):
                raise GGUFError(f"{self.label}: {key} varies per layer ({value[:8]}...); moeplan reads one value")
            value = value[0]
        if isinstance(value, bool) or not isinstance(value, int):
            raise GGUFError(f"{self.label}: {key} must be a whole number, got {_show(value)}")
        cap = _LIMITS.get(name, 1 << 32)
        if not minimum <= value <= cap:
            raise GGUFError(f"{self.label}: {key} is {value:,}, outside {minimum}..{cap:,}; the header is damaged")
        return value

    def need(self, name: str, *, minimum: int = 1) -> int:
        value = self.int(name, minimum=minimum)
        if value is None:
            raise GGUFError(f"{self.label}: {self.key(name)} is missing; the header lacks what {self.arch} needs")
        return value

    def float(self, name: str) -> float | None:
        value = self.kv.get(self.key(name))
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise GGUFError(f"{self.label}: {self.key(name)} must be a finite number, got {_show(value)}")
        return float(value)

    def flag(self, name: str) -> bool | None:
        value = self.kv.get(self.key(name))
        if value is None or isinstance(value, bool):
            return value
        raise GGUFError(f"{self.label}: {self.key(name)} must be a bool, got {_show(value)}")


def _show(value: Any) -> str:
    return f"a {value.kind} of {value.length:,}" if isinstance(value, Skipped) else repr(value)[:80]


def _shape(tensors: dict[str, TensorInfo], name: str, dim: int) -> int | None:
    t = tensors.get(name)
    return t.shape[dim] if t is not None and len(t.shape) > dim else None


def config_from_header(header: GGUFHeader) -> dict[str, Any]:
    """The header's metadata as config.json keys (transformers names), for hf_config.spec_from_config."""
    meta = _Meta(header)
    if meta.arch not in ARCHITECTURES:
        raise GGUFError(f"{meta.label}: GGUF architecture {meta.arch!r} is not one moeplan reads from GGUF "
                        f"({', '.join(ARCHITECTURES)}); pass the model's config.json or a card instead")
    if not header.tensors:
        raise GGUFError(f"{meta.label}: the file holds no tensors (a vocab-only GGUF?); give a model file")
    tensors = {t.name: t for t in header.tensors}
    blocks = meta.need("block_count")
    if blocks > MAX_BLOCKS:
        raise GGUFError(f"{meta.label}: {meta.key('block_count')} is {blocks:,}; moeplan plans at most {MAX_BLOCKS:,}")
    nextn = meta.int("nextn_predict_layers", 0) or 0
    if nextn >= blocks:
        raise GGUFError(f"{meta.label}: {meta.key('nextn_predict_layers')} ({nextn}) must be below block_count "
                        f"({blocks})")
    present = {b for b in map(block_of, tensors) if b is not None}
    missing = [i for i in range(blocks) if i not in present]
    if missing:
        raise GGUFError(f"{meta.label}: {meta.key('block_count')} is {blocks:,} but blocks {_ranges(missing)} have no "
                        "tensors; the header is damaged")
    layers = blocks - nextn  # llama.cpp counts nextn (MTP) blocks in block_count, after the decoder layers
    hidden = meta.need("embedding_length")
    if (rows := _shape(tensors, "token_embd.weight", 0)) is not None and rows != hidden:
        raise GGUFError(f"{meta.label}: {meta.key('embedding_length')} is {hidden:,} but token_embd.weight rows "
                        f"are {rows:,} wide; the header is damaged")
    heads = meta.need("attention.head_count")
    vocab = _shape(tensors, "token_embd.weight", 1) or meta.int("vocab_size", minimum=1)
    if vocab is None:
        tokens = header.metadata.get("tokenizer.ggml.tokens")
        vocab = tokens.length if isinstance(tokens, Skipped) else len(tokens) if isinstance(tokens, list) else None
    if not vocab:
        raise GGUFError(f"{meta.label}: no token_embd.weight, {meta.key('vocab_size')} or tokenizer tokens; "
                        "cannot tell the vocabulary size")
    cfg: dict[str, Any] = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": meta.int("attention.head_count_kv", heads, minimum=1),
        "vocab_size": vocab,
        "max_position_embeddings": meta.int("context_length", minimum=1),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
    }
    if (head_dim := meta.int("attention.key_length", minimum=1)) is not None:
        cfg["head_dim"] = head_dim
    if (theta := meta.float("rope.freq_base")) is not None:
        cfg["rope_theta"] = theta
    if (window := meta.int("attention.sliding_window", minimum=1)) is not None:
        cfg["sliding_window"] = window
    experts = meta.int("expert_count", 0) or 0
    if experts:
        cfg["num_experts_per_tok"] = meta.need("expert_used_count")
        # Blocks with a dense FFN and no experts (leading dense blocks, Qwen mlp_only_layers).
        cfg["mlp_only_layers"] = [i for i in range(layers) if f"blk.{i}.ffn_up.weight" in tensors
                                  and f"blk.{i}.ffn_up_exps.weight" not in tensors
                                  and f"blk.{i}.ffn_gate_up_exps.weight" not in tensors]
    ffn = meta.int("feed_forward_length", minimum=1)
    expert_ffn = (meta.int("expert_feed_forward_length", minimum=1) or _shape(tensors, "blk.0.ffn_up_exps.weight", 1)
                  or ffn)
    if ffn is not None:
        cfg["intermediate_size"] = ffn
    if meta.arch == "llama":
        if experts:
            # NOTE: llama.cpp stores Mixtral as arch llama with expert_count; its feed_forward_length
            # is the expert width (Mixtral's intermediate_size).
            cfg.update(model_type="mixtral", num_local_experts=experts, intermediate_size=expert_ffn)
        else:
            cfg["model_type"] = "llama"
    elif meta.arch == "qwen2moe":
        shared = meta.int("expert_shared_feed_forward_length", minimum=1) or _shape(
            tensors, f"blk.{layers - 1}.ffn_up_shexp.weight", 1) or 0
        cfg.update(model_type="qwen2_moe", num_experts=experts, moe_intermediate_size=expert_ffn,
                   shared_expert_intermediate_size=shared)
    elif meta.arch == "qwen3moe":
        cfg.update(model_type="qwen3_moe", num_experts=experts, moe_intermediate_size=expert_ffn)
    elif meta.arch == "deepseek2":
        _deepseek2(meta, cfg, tensors, experts, expert_ffn, nextn)
    elif meta.arch == "gpt-oss":
        # llama.cpp LLM_ARCH_OPENAI_MOE: set_swa_pattern(2), sliding window on even layers; the same
        # as transformers GptOssConfig layer_types (sliding when (i + 1) % 2).
        cfg.update(model_type="gpt_oss", num_local_experts=experts, intermediate_size=expert_ffn,
                   layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)])
    return cfg


def _deepseek2(meta: _Meta, cfg: dict[str, Any], tensors: dict[str, TensorInfo], experts: int, expert_ffn: int | None,
               nextn: int) -> None:
    """DeepSeek-V2/V3/R1, Kimi K2 (llama.cpp arch deepseek2). NOTE: since 2025 llama.cpp writes MLA as
    MQA over the latent: key_length = kv_lora_rank + rope dim and value_length = kv_lora_rank, the
    per-head widths under key_length_mla / value_length_mla (convert_hf_to_gguf DeepseekV2Model);
    older files have the per-head widths under key_length / value_length."""
    rope = meta.need("rope.dimension_count")
    key = meta.int("attention.key_length_mla", minimum=1) or meta.need("attention.key_length")
    value = meta.int("attention.value_length_mla", minimum=1) or meta.need("attention.value_length")
    if key <= rope:
        raise GGUFError(f"{meta.label}: the key head width ({key}) must exceed the rope dimension ({rope})")
    q_lora = meta.int("attention.q_lora_rank", 0) or None  # 0 or absent: a plain attn_q (V2-Lite)
    gating = meta.int("expert_gating_func", 1)  # gguf ExpertGatingFuncType: 1 softmax, 2 sigmoid
    noaux = any(name.endswith(".exp_probs_b.bias") for name in tensors)
    cfg.pop("head_dim", None)  # MLA: spec derives it from the nope and rope widths
    cfg.update(
        model_type="deepseek_v3" if noaux or gating == 2 else "deepseek_v2",
        num_key_value_heads=cfg["num_attention_heads"],  # HF convention; MLA caches the latent
        n_routed_experts=experts, moe_intermediate_size=expert_ffn,
        n_shared_experts=meta.int("expert_shared_count", 0),
        first_k_dense_replace=meta.int("leading_dense_block_count", 0),
        q_lora_rank=q_lora, kv_lora_rank=meta.need("attention.kv_lora_rank"),
        qk_rope_head_dim=rope, qk_nope_head_dim=key - rope, v_head_dim=value,
        scoring_func="sigmoid" if gating == 2 else "softmax",
        topk_method="noaux_tc" if noaux else "greedy",
        num_nextn_predict_layers=nextn,
    )
    if (scale := meta.float("expert_weights_scale")) is not None:
        cfg["routed_scaling_factor"] = scale
    if (norm := meta.flag("expert_weights_norm")) is not None:
        cfg["norm_topk_prob"] = norm


def _ranges(ids: list[int]) -> str:
    return f"{ids[0]}..{ids[-1]}" if len(ids) > 3 else ", ".join(map(str, ids))


# ----------------------------------------------------------------------------------------------
# GGUF file -> ModelSpec, with what the file stores
# ----------------------------------------------------------------------------------------------

# llama.cpp file types (general.file_type) -> the built-in scheme (moeplan.quant) closest to it, for
# the code paths that size a plan by scheme name. The file's exact bytes are in quantization_config.
_BUILTIN = {
    "ALL_F32": "fp32", "MOSTLY_F16": "fp16", "MOSTLY_BF16": "bf16", "MOSTLY_Q8_0": "q8_0", "MOSTLY_Q6_K": "q6_k",
    "MOSTLY_Q5_K_M": "q5_k_m", "MOSTLY_Q5_K_S": "q5_k_m", "MOSTLY_Q4_K_M": "q4_k_m", "MOSTLY_Q4_K_S": "q4_k_s",
    "MOSTLY_Q4_0": "q4_0", "MOSTLY_Q3_K_M": "q3_k_m", "MOSTLY_Q3_K_S": "q3_k_m", "MOSTLY_Q3_K_L": "q3_k_m",
    "MOSTLY_Q2_K": "q2_k", "MOSTLY_Q2_K_S": "q2_k", "MOSTLY_IQ4_XS": "iq4_xs", "MOSTLY_IQ4_NL": "iq4_xs",
    "MOSTLY_IQ3_XXS": "iq3_xxs", "MOSTLY_IQ3_XS": "iq3_xxs", "MOSTLY_IQ3_S": "iq3_xxs", "MOSTLY_IQ3_M": "iq3_xxs",
    "MOSTLY_IQ2_XXS": "iq2_xxs", "MOSTLY_IQ2_XS": "iq2_xxs", "MOSTLY_IQ2_S": "iq2_xxs", "MOSTLY_IQ2_M": "iq2_xxs",
    "MOSTLY_IQ1_S": "iq1_s", "MOSTLY_IQ1_M": "iq1_s", "MOSTLY_MXFP4_MOE": "mxfp4_moe",
}  # fmt: skip
# Tensor type -> built-in scheme, when general.file_type is absent or unknown to this gguf package.
_BY_TYPE = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "Q8_0": "q8_0", "Q6_K": "q6_k", "Q5_K": "q5_k_m",
            "Q4_K": "q4_k_m", "Q4_0": "q4_0", "Q3_K": "q3_k_m", "Q2_K": "q2_k", "IQ4_XS": "iq4_xs",
            "IQ4_NL": "iq4_xs", "IQ3_XXS": "iq3_xxs", "IQ3_S": "iq3_xxs", "IQ2_XXS": "iq2_xxs", "IQ2_XS": "iq2_xxs",
            "IQ2_S": "iq2_xxs", "IQ1_S": "iq1_s", "IQ1_M": "iq1_s", "MXFP4": "mxfp4_moe"}


def file_type_of(header: GGUFHeader) -> tuple[str, str]:
    """(the file type as llama.cpp names it, e.g. 'Q4_K_M', the closest built-in scheme name)."""
    from gguf import LlamaFileType

    raw = header.metadata.get("general.file_type")
    try:
        name = LlamaFileType(raw).name if isinstance(raw, int) and not isinstance(raw, bool) else None
    except ValueError:
        name = None
    # The type holding the most bytes of 2-D weights (what file_type means: "the majority of the tensors").
    by_bytes: Counter[str] = Counter()
    for t in header.tensors:
        if len(t.shape) >= 2:
            by_bytes[t.ggml_type] += t.n_bytes
    major = by_bytes.most_common(1)[0][0] if by_bytes else "F32"
    if name is not None and name in _BUILTIN:
        return name.removeprefix("MOSTLY_").removeprefix("ALL_"), _BUILTIN[name]
    shown = name.removeprefix("MOSTLY_").removeprefix("ALL_") if name and name != "GUESSED" else f"mostly {major}"
    return shown, _BY_TYPE.get(major, "bf16")


def spec_from_gguf(path: Path) -> ModelSpec:
    """A GGUF file (or the first part of a split one) -> ModelSpec, with `checkpoint` (what the file
    stores) and quantization_config (its bytes per component) filled from the tensor infos."""
    from moeplan.hf_config import first_error, spec_from_config

    path = Path(path)
    try:
        header = read_header(path)
    except ImportError:
        raise GGUFError(f"{path}: reading GGUF files needs the gguf package: pip install 'moeplan[gguf]'") from None
    cfg = config_from_header(header)
    file_type, builtin = file_type_of(header)
    num_layers = cfg["num_hidden_layers"]
    by_component: dict[str, dict[str, int]] = {}
    types_in: dict[str, Counter[str]] = {}
    for t in header.tensors:
        c = component_of(t.name, num_layers)
        row = by_component.setdefault(c, {"elements": 0, "bytes": 0})
        row["elements"] += t.n_elements
        row["bytes"] += t.n_bytes
        types_in.setdefault(c, Counter())[t.ggml_type] += t.n_bytes
    cfg["torch_dtype"] = builtin
    cfg["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "file_type": file_type,
        "component_bytes": {c: v["bytes"] for c, v in by_component.items()},
        "component_elements": {c: v["elements"] for c, v in by_component.items()},
        "component_types": {c: sorted(types) for c, types in types_in.items()},
    }
    try:
        spec = spec_from_config(cfg, name=path.name, source=f"GGUF header of {path}")
    except ConfigError as exc:
        # spec_from_config names "config for NAME"; say that its keys came from this file's header.
        detail = str(exc).removeprefix(f"config for {path.name}: ")
        raise GGUFError(f"{path}: {detail} (keys translated from its GGUF metadata)") from None
    except ValueError as exc:  # pragma: no cover - spec_from_config wraps its own
        raise GGUFError(f"{path}: {first_error(exc)}") from None
    return spec.model_copy(update={"checkpoint": stored_checkpoint(header, spec, by_component, file_type, builtin)})


def stored_checkpoint(header: GGUFHeader, spec: ModelSpec, by_component: dict[str, dict[str, int]],
                      file_type: str, builtin: str) -> StoredCheckpoint:
    """What the file stores, by ggml type, with notes that reconcile it with count_params(spec)."""
    from moeplan.params import count_params, fmt_billions
    from moeplan.spec import StoredCheckpoint

    by_type: Counter[str] = Counter()
    bytes_by_type: Counter[str] = Counter()
    for t in header.tensors:
        by_type[t.ggml_type] += t.n_elements
        bytes_by_type[t.ggml_type] += t.n_bytes
    total_bytes = sum(bytes_by_type.values())
    types = ", ".join(f"{name} {fmt_billions(n)} ({8 * bytes_by_type[name] / n:.2f} bpw)" if n else name
                      for name, n in by_type.most_common())
    notes = [f"GGUF {file_type}, {header.num_files} file(s): tensor types {types}"]
    count = count_params(spec)
    stored = {c: v["elements"] for c, v in by_component.items()}
    for kind, why in (("mtp", f"blocks after the {spec.num_layers} decoder layers (MTP / nextn)"),
                      ("not_weights", "precomputed buffers (rope_freqs)"), ("other", "names moeplan does not place")):
        if stored.get(kind):
            notes.append(f"{why}: {stored[kind]:,} elements, {by_component[kind]['bytes']:,} bytes; "
                         "not in total_params")
    diffs = [f"{c.name} {stored.get(c.name, 0) - c.total:+,}" for c in count.components
             if stored.get(c.name, 0) != c.total]
    diffs += [f"{name} {n:+,}" for name, n in stored.items()
              if n and name not in {c.name for c in count.components} | {"mtp", "not_weights", "other"}]
    if not diffs:
        notes.append(f"the stored tensors match the count from the GGUF metadata exactly ({count.total_params:,}), "
                     "component by component")
    else:
        notes.append(f"stored minus counted, by component: {', '.join(diffs)}; the header's metadata and its "
                     "tensors disagree (or llama.cpp stores this family differently)")
    from moeplan.memory import weight_bytes
    from moeplan.quant import get_scheme, native_scheme

    if native_scheme(spec).name != FILE_SCHEME:
        approx = weight_bytes(spec, get_scheme(builtin)).total
        weights = sum(v["bytes"] for c, v in by_component.items() if c not in ("mtp", "not_weights", "other"))
        notes.append(f"memory and fit size the weights with the built-in {builtin} ({approx / 1e9:,.2f} GB); "
                     f"the file's own: {weights / 1e9:,.2f} GB")
    return StoredCheckpoint(
        params_by_dtype=dict(sorted(by_type.items())),
        total_bytes=total_bytes,
        num_files=header.num_files,
        tensor_names_sample=tuple(sorted(t.name for t in header.tensors)[:8]),
        notes=tuple(notes),
    )


# ----------------------------------------------------------------------------------------------
# The file's own bytes as a QuantScheme
# ----------------------------------------------------------------------------------------------


def is_gguf_spec(spec: ModelSpec) -> bool:
    return (spec.quantization_config or {}).get("quant_method") == QUANT_METHOD


def _exact_bits(n_bytes: int, elements: int) -> float:
    """Bits per weight such that memory.weight_bytes' ceil(elements x bits / 8) gives n_bytes back."""
    bits = 8 * n_bytes / elements
    for _ in range(8):
        got = math.ceil(elements * bits / 8)
        if got == n_bytes:
            return bits
        bits = math.nextafter(bits, -math.inf if got > n_bytes else math.inf)
    return bits


def file_scheme(spec: ModelSpec) -> QuantScheme:
    """The GGUF file's own tensor types as a llama.cpp scheme: per component, the bits that give the
    file's bytes for moeplan's count of that component (memory.weight_bytes is then the file's size)."""
    from moeplan.params import ROUTED_EXPERTS, count_params
    from moeplan.quant import QuantScheme

    qc = spec.quantization_config or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise QuantError(f"--quant {FILE_SCHEME} sizes a GGUF file's own tensors; {spec.name} was not read from a "
                         "GGUF file")
    stored_bytes = qc.get("component_bytes") or {}
    count = count_params(spec)
    weights = {c.name: c.total for c in count.components if c.total}
    sane = isinstance(stored_bytes, dict) and all(type(b) is int and b >= 0 for b in stored_bytes.values())
    placed = {c: b for c, b in stored_bytes.items() if c in weights} if sane else {}
    if sum(placed.values()) <= 0:  # a config.json that only says "gguf", or says it with junk
        raise QuantError(f"{spec.name}: quant_method 'gguf' names a GGUF file's own tensor types, which only the "
                         "file carries: give the .gguf file as MODEL, or pass --quant (e.g. q4_k_m)")
    mean = 8 * sum(placed.values()) / max(sum(weights[c] for c in placed), 1)
    bits = {c: _exact_bits(placed[c], n) if c in placed else mean for c, n in weights.items()}
    types = qc.get("component_types") or {}
    shown = "; ".join(f"{c} {'/'.join(types.get(c, []))}" for c in weights if types.get(c))
    return QuantScheme(
        name=FILE_SCHEME, description=f"GGUF {qc.get('file_type', '')} as stored in the file ({shown})",
        bits=bits.get(ROUTED_EXPERTS, mean), component_bits={**bits, "vision": 0.0}, gguf=True,
        engines=("llamacpp",),
    )  # fmt: skip

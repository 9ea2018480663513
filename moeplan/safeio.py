"""Reading what a user or a download hands us, and writing what we keep, without surprises.

One home for the rules every file moeplan reads must pass (config.json, model cards, deployment
specs, routing files, the calibration cache): a regular file (a FIFO would block forever,
/dev/zero never ends), at most a size cap (read no more than the cap, whatever the file claims),
UTF-8 text, JSON and YAML nested no deeper than real configs are, and YAML aliases bounded before
they are expanded ("billion laughs": a few hundred bytes of anchors that name each other expand to
10^9 nodes in whatever walks the result). Every refusal is one MoeplanError line naming the file.

Writes go to a temporary file in the same directory and are renamed over the target (os.replace
is atomic on POSIX and Windows), so a full disk or an interrupt never leaves a half-written file.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moeplan.errors import ConfigError

if TYPE_CHECKING:
    import yaml

# Real config.json files are 1-20 kB, cards and specs smaller; 16 MiB is far beyond any of them
# and keeps a hostile file from costing more than that much memory.
MAX_TEXT_BYTES = 16 * 2**20
# Deepest nesting in any real HF config or card is ~5 levels; 64 leaves room and stays far below
# Python's recursion limit, which the json and yaml parsers would otherwise hit with a traceback.
MAX_DEPTH = 64
# Nodes of a YAML document after alias expansion; a large card is ~2,000.
MAX_YAML_NODES = 200_000
# Linux PATH_MAX; a longer path is refused before the OS is asked.
MAX_PATH_CHARS = 4096



def _yaml_loader() -> type[yaml.SafeLoader]:
    # yaml is imported on first use: `moeplan fit CARD` reads the precompiled card index, no YAML.
    import yaml

    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# The process umask, read once at import (reading it means setting it, which threads writing the Hub
# cache must not race).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class ReadError(ConfigError):
    """A file moeplan was given could not be read as what it should be."""


def check_path_text(text: str, what: str = "path") -> None:
    if len(text) > MAX_PATH_CHARS:
        raise ReadError(f"{what} is {len(text):,} characters long; paths are at most {MAX_PATH_CHARS:,}")
    if "\x00" in text:
        raise ReadError(f"{what} contains a NUL character")


def expand_user(text: str, what: str = "path") -> Path:
    """Path(text).expanduser(), with "~someone" that names no user as one line, not a RuntimeError."""
    check_path_text(text, what)
    try:
        return Path(text).expanduser()
    except RuntimeError:
        raise ReadError(f"{what} {text[:80]!r}: '~' names no home directory here; write the path out") from None


def read_text(path: Path | str, *, what: str = "file", max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of a regular file of at most `max_bytes` bytes, or one ReadError line."""
    return decode_text(read_bytes(path, what=what, max_bytes=max_bytes), f"{what} {_label(Path(path))}")


def read_bytes(path: Path | str, *, what: str = "file", max_bytes: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes` bytes, or one ReadError line."""
    check_path_text(str(path))
    path = Path(path)
    label = _label(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ReadError(f"cannot read {what} {label}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ReadError(f"{what} {label} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device or socket"
        raise ReadError(f"{what} {label} is {kind}, not a regular file; give a file")
    if st.st_size > max_bytes:
        raise ReadError(f"{what} {label} is {st.st_size:,} bytes; moeplan reads at most {max_bytes:,}")
    try:
        # O_NONBLOCK: if the path was swapped for a FIFO after the stat, open does not wait for a writer.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ReadError(f"{what} {label} is not a regular file; give a file")
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise ReadError(f"cannot read {what} {label}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise ReadError(f"{what} {label} is larger than {max_bytes:,} bytes; moeplan reads at most that")
    return data


def decode_text(data: bytes, label: str) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ReadError(f"{label} is UTF-16 text; save it as UTF-8")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ReadError(f"{label} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    return text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is harmless


def loads_json(text: str, label: str) -> Any:
    """json.loads with nesting and number checks: one ReadError line for any of them."""
    import json  # here, not at start-up: `fit CARD` reads no JSON (~1.5 ms to import)

    depth = _bracket_depth(text)
    if depth > MAX_DEPTH:
        raise ReadError(f"{label}: JSON nested {depth} levels deep; moeplan reads at most {MAX_DEPTH}")
    try:
        return json.loads(text, parse_constant=_no_constant, parse_int=_bounded_int)
    except json.JSONDecodeError as exc:
        raise ReadError(f"{label}: not valid JSON (line {exc.lineno}: {exc.msg}); fix the file") from None
    except RecursionError:
        raise ReadError(f"{label}: JSON nested too deeply") from None


def _no_constant(name: str) -> float:
    # json accepts NaN, Infinity and -Infinity by default; no config count or size is one.
    raise ReadError(f"JSON value {name} is not a number moeplan accepts (give a finite number)")


def _bounded_int(text: str) -> int:
    # int() of a 100,000-digit string is slow (and refused past 4,300 digits by Python itself).
    if len(text.lstrip("-")) > 30:
        raise ReadError(f"JSON integer of {len(text):,} digits is beyond any count or size a model has")
    return int(text)


def _bracket_depth(text: str, quotes: bool = True) -> int:
    """Deepest [ / { nesting outside strings (a cheap scan before the recursive parser). YAML has
    comments and single-quoted strings a double-quote scan would misread (a stray `"` in a comment
    would switch counting off), so for YAML every bracket counts: over-counting only refuses sooner."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"' and quotes:
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    return deepest
        elif ch in "]}":
            depth = max(depth - 1, 0)  # stray closers (in a comment, say) cannot bank depth for later
    return deepest


def compose_yaml(text: str, label: str) -> yaml.Node | None:
    """The YAML node graph of one document, its expanded size and depth bounded before anything is
    constructed from it. YAMLError passes through for the caller's line-numbered message."""
    # libyaml's parser recurses in C: tens of thousands of levels crash the process before any node
    # exists to count, so nesting is bounded on the text first (flow brackets, and block indentation
    # with the "- " of compact sequences).
    if _bracket_depth(text, quotes=False) > MAX_DEPTH or _block_depth(text) > MAX_BLOCK_COLUMNS:
        raise ReadError(f"{label}: YAML nested more than {MAX_DEPTH} levels deep")
    import yaml

    try:
        node = yaml.compose(text, Loader=_yaml_loader())
    except RecursionError:
        raise ReadError(f"{label}: YAML nested too deeply") from None
    if node is not None:
        _check_yaml_size(node, label)
    return node


# Block nesting costs at least one column per level; real cards indent 2 per level, ~5 levels deep.
MAX_BLOCK_COLUMNS = 4 * MAX_DEPTH


def _block_depth(text: str) -> int:
    """The most columns of indentation, compact "- " indicators included, on any line."""
    deepest = 0
    for line in text.splitlines():
        body = line.lstrip(" \t")
        cols = len(line) - len(body)
        while body.startswith(("- ", "? ")):
            stripped = body[2:].lstrip(" ")
            cols += len(body) - len(stripped)
            body = stripped
        deepest = max(deepest, cols)
    return deepest


def _check_yaml_size(root: yaml.Node, label: str) -> None:
    """Expanded node count (each alias counted as what it names) by memoised DAG walk, and depth."""
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    # Post-order without recursion: (node, children visited?) pairs.
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    on_path: set[int] = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        if key in sizes and not done:
            continue
        kids = _children(node)
        if not done:
            if key in on_path:  # a recursive alias (&a [*a]): infinite when expanded
                raise ReadError(f"{label}: a YAML alias refers to itself")
            on_path.add(key)
            stack.append((node, True))
            stack.extend((k, False) for k in kids if id(k) not in sizes)
            continue
        on_path.discard(key)
        sizes[key] = 1 + sum(sizes[id(k)] for k in kids)
        depths[key] = 1 + max((depths[id(k)] for k in kids), default=0)
        if sizes[key] > MAX_YAML_NODES:
            raise ReadError(f"{label}: the YAML expands to more than {MAX_YAML_NODES:,} values (aliases that "
                            "repeat each other); write the values out")
        if depths[key] > MAX_DEPTH:
            raise ReadError(f"{label}: YAML nested more than {MAX_DEPTH} levels deep")


def _children(node: yaml.Node) -> list[yaml.Node]:
    # PyYAML's node classes name their kind in `id`: no yaml import on this per-node path.
    if node.id == "sequence":
        return list(node.value)
    if node.id == "mapping":
        return [n for pair in node.value for n in pair]
    return []


def load_yaml(text: str, label: str) -> Any:
    """yaml.safe_load bounded as compose_yaml; YAMLError passes through for the caller's message."""
    return construct_yaml(compose_yaml(text, label), label)


def construct_yaml(node: yaml.Node | None, label: str) -> Any:
    """Python values of a node graph compose_yaml has bounded."""
    if node is None:
        return None
    loader = _yaml_loader()("")
    try:
        return loader.construct_document(node)
    except RecursionError:
        raise ReadError(f"{label}: YAML nested too deeply") from None
    except ValueError as exc:  # an integer of more than 4,300 digits (Python's int() limit)
        raise ReadError(f"{label}: a YAML value cannot be read ({str(exc).split(':')[0]}); no count or size "
                        "needs that many digits") from None
    finally:
        loader.dispose()


def write_atomic(path: Path, write: Callable[[Any], None], *, binary: bool = False) -> None:
    """Write through `write(file)` to a temporary file beside `path`, then rename it over `path`.
    On any failure the target is untouched and the temporary file removed. A target that exists and
    is not a regular file (/dev/stdout, a FIFO, /dev/full) is written in place, as a shell redirect
    would: renaming over a device node would replace it."""
    try:
        special = path.exists() and not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        special = False
    if special:
        with open(path, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the mode any new file gets
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _label(path: Path) -> str:
    text = str(path)
    return text if len(text) <= 200 else text[:100] + "..." + text[-60:]

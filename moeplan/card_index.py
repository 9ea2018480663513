"""The bundled model cards, precompiled: model_cards/index.marshal.

Why: `moeplan fit CARD` is a start-up-bound command (issue 17 bounds its whole process at 1.15x a
bare typer app). Reading a card the long way costs importing PyYAML and parsing the card, then
building pydantic's validator for ModelSpec and its nested models: ~40 ms of a ~400 ms run on a
2-core box, spent on the same bytes every time. The index holds, per card file, what that produces
(the card's data and its validated ModelSpec, dumped to JSON types), and a ModelSpec is rebuilt from
it without validation.

Why marshal (format version 2, which Python 3 reads and writes alike and which has no back-references,
so a build is the same bytes every time): a start-up that reads JSON first imports the json package,
~1.5 ms of `fit`'s, more than the whole read; marshal is built into the interpreter. The file is
moeplan's own, shipped beside the cards and rebuilt from them; nothing downloaded is ever read as
marshal. Each card's data and spec are one marshal string of their own, decoded only for the card
asked for (fresh objects every time, so no caller can change another's).

Why it cannot go stale silently: each entry carries a checksum of its YAML file, and the index one of
the code that turns a card into a spec (CODE_FILES). An entry is used only when both still match the
files on disk; otherwise the card is read from its YAML as before. So editing a card
or the spec reader without rebuilding costs speed, never correctness. `tests/test_card_index.py`
fails when the committed index differs from a fresh build, and says to run:

    python -m moeplan.card_index        # rewrites model_cards/index.marshal
"""

from __future__ import annotations

import marshal
import sys
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

INDEX_FILE = "index.marshal"
INDEX_VERSION = 4
MARSHAL_VERSION = 2  # no references between objects (version 3 on): the same index is the same bytes
# The modules whose code decides what a card's spec is: the spec classes (spec.py), spec_from_config
# (hf_config.py), the card reader (sources.py), the YAML reader (safeio.py), the escaping of names
# (escape.py), the Record base the spec classes are built on (record.py), and this file's dump format.
CODE_FILES = ("spec.py", "hf_config.py", "sources.py", "safeio.py", "escape.py", "record.py", "card_index.py")
_HERE = Path(__file__).resolve().parent


def _checksum(data: bytes) -> str:
    """CRC-32, Adler-32 and length of `data`: 64 bits of check against edits (Python itself trusts a
    .pyc while its source's mtime and size match). A cache check, not a security boundary: code that
    can rewrite these files can rewrite moeplan. Not SHA-256: its pure-C build in CPython takes ~0.5 ms
    for the code files, a quarter of reading a card (issue 17's start-up); zlib does it in ~0.05 ms."""
    return f"{zlib.crc32(data):08x}{zlib.adler32(data):08x}-{len(data)}"


def code_key() -> str:
    """The checksum of the modules in CODE_FILES, in order (their bytes on disk)."""
    return _checksum(b"".join(name.encode() + b"\0" + (_HERE / name).read_bytes() + b"\0"
                              for name in CODE_FILES))


def build_index(directory: Path) -> dict[str, Any]:
    """The index of every *.yaml card in `directory`: read, validated and dumped as `fit` would."""
    import json

    from moeplan.sources import _card_from_yaml  # the slow path, PyYAML and validation included

    entries = {}
    for path in sorted(directory.glob("*.yaml")):
        card = _card_from_yaml(path)
        spec = card.spec()
        dump = json.loads(json.dumps(spec.model_dump(mode="json", exclude_defaults=True)))
        if spec.vision is not None:  # the discriminator is a default, so exclude_defaults drops it
            dump["vision"]["kind"] = spec.vision.kind
        # Only what comes back exactly is indexed: a card whose data or spec would come back different
        # (a YAML date, which marshal cannot hold) is read from its YAML every time instead.
        try:
            payload = marshal.dumps({"data": card.data, "spec": dump}, MARSHAL_VERSION)
        except ValueError:
            continue
        if marshal.loads(payload) != {"data": card.data, "spec": dump} or spec_from_dump(dump) != spec:
            continue
        entries[path.name] = {"checksum": _checksum(path.read_bytes()), "name": card.name, "hub_id": card.hub_id,
                              "aliases": list(card.aliases), "payload": payload}
    return {"version": INDEX_VERSION, "code_checksum": code_key(), "cards": entries}


def dump_index(index: dict[str, Any]) -> bytes:
    return marshal.dumps(index, MARSHAL_VERSION)


@lru_cache(maxsize=4)
def load_index(directory: Path) -> dict[str, Any] | None:
    """The index beside the cards when it was built by this code, else None (read cards from YAML)."""
    try:
        index = marshal.loads((directory / INDEX_FILE).read_bytes())
        if index.get("version") != INDEX_VERSION or index.get("code_checksum") != code_key():
            return None
        return index if isinstance(index.get("cards"), dict) else None
    except (OSError, ValueError, EOFError, TypeError, AttributeError):  # absent, unreadable or not ours:
        return None  # the slow path is correct


def fresh_entry(directory: Path, path: Path, raw: bytes) -> dict[str, Any] | None:
    """The index entry for the card file `path` whose bytes are `raw`, when it matches them."""
    index = load_index(directory)
    if index is None:
        return None
    entry = index["cards"].get(path.name)
    if not isinstance(entry, dict) or entry.get("checksum") != _checksum(raw):
        return None
    try:
        payload = marshal.loads(entry["payload"])
        return {**entry, "data": payload["data"], "spec": payload["spec"]}
    except (KeyError, TypeError, ValueError, EOFError):  # not ours: the slow path is correct
        return None


def spec_from_dump(dump: dict[str, Any]) -> Any:
    """A ModelSpec from its index dump, without validation: the dump is what validation produced
    (build_index), so the fields and nested models are rebuilt as they were. JSON lists become
    the tuples the fields hold."""
    from moeplan import spec as S

    nested: dict[str, type[S._Frozen]] = {"mla": S.MLASpec, "compressed": S.CompressedAttnSpec, "indexer": S.IndexerSpec,
                                          "linear": S.LinearAttnSpec, "mtp_layer": S.LayerSpec, "mamba": S.MambaSpec}
    vision = {"llama4": S.VisionSpec, "qwen3_vl": S.QwenVisionSpec, "gemma4": S.Gemma4VisionSpec,
              "siglip": S.SiglipVisionSpec}
    fields: dict[str, Any] = {}
    for key, value in dump.items():
        if value is None:
            fields[key] = None
        elif key in nested:
            fields[key] = nested[key].model_construct(**value)
        elif key == "layers":
            fields[key] = tuple(S.LayerSpec.model_construct(**layer) for layer in value)
        elif key == "vision":
            fields[key] = vision[value["kind"]].model_construct(**value)
        elif key == "checkpoint":  # never in a card (only the Hub fills it); kept exact if it ever is
            fields[key] = S.StoredCheckpoint.model_validate(value)
        elif isinstance(value, list):
            fields[key] = tuple(value)
        else:
            fields[key] = value
    return S.ModelSpec.model_construct(**fields)


def main() -> int:
    from moeplan.sources import cards_dir

    directory = cards_dir()
    index = build_index(directory)
    (directory / INDEX_FILE).write_bytes(dump_index(index))
    sys.stdout.write(f"wrote {directory / INDEX_FILE}: {len(index['cards'])} cards\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

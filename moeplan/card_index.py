"""The bundled model cards, precompiled: model_cards/index.json.

Why: `moeplan fit CARD` is a start-up-bound command (issue 17 bounds its whole process at 1.15x a
bare typer app). Reading a card the long way costs importing PyYAML and parsing the card, then
building pydantic's validator for ModelSpec and its nested models: ~40 ms of a ~400 ms run on a
2-core box, spent on the same bytes every time. The index holds, per card file, what that produces
(the card's data and its validated ModelSpec, dumped to JSON), and a ModelSpec is rebuilt from it
without validation.

Why it cannot go stale silently: each entry carries the SHA-256 of its YAML file, and the index the
SHA-256 of the code that turns a card into a spec (CODE_FILES). An entry is used only when both
still match the files on disk; otherwise the card is read from its YAML as before. So editing a card
or the spec reader without rebuilding costs speed, never correctness. `tests/test_card_index.py`
fails when the committed index differs from a fresh build, and says to run:

    python -m moeplan.card_index        # rewrites model_cards/index.json
"""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

try:  # CPython's own SHA-256: hashlib would first load OpenSSL, ~3 ms of every start-up
    from _sha256 import sha256  # Python 3.11
except ImportError:  # pragma: no cover - other Pythons
    try:
        from _sha2 import sha256  # type: ignore[no-redef]  # Python 3.12+
    except ImportError:
        from hashlib import sha256  # type: ignore[no-redef]

INDEX_FILE = "index.json"
INDEX_VERSION = 2
# The modules whose code decides what a card's spec is: spec_from_config (spec.py), the card reader
# (sources.py), the YAML reader (safeio.py), the escaping of names (escape.py), the Record base the spec
# classes are built on (record.py), and this file's dump format.
CODE_FILES = ("spec.py", "sources.py", "safeio.py", "escape.py", "record.py", "card_index.py")
_HERE = Path(__file__).resolve().parent


def _sha256(data: bytes) -> str:
    return sha256(data).hexdigest()


def code_key() -> str:
    """SHA-256 over the modules in CODE_FILES, in order (their bytes on disk)."""
    digest = sha256()
    for name in CODE_FILES:
        digest.update(name.encode() + b"\0" + (_HERE / name).read_bytes() + b"\0")
    return digest.hexdigest()


def build_index(directory: Path) -> dict[str, Any]:
    """The index of every *.yaml card in `directory`: read, validated and dumped as `fit` would."""
    from moeplan.sources import _card_from_yaml  # the slow path, PyYAML and validation included

    entries = {}
    for path in sorted(directory.glob("*.yaml")):
        card = _card_from_yaml(path)
        spec = card.spec()
        dump = json.loads(json.dumps(spec.model_dump(mode="json", exclude_defaults=True)))
        if spec.vision is not None:  # the discriminator is a default, so exclude_defaults drops it
            dump["vision"]["kind"] = spec.vision.kind
        # Only what survives JSON exactly is indexed: a card whose data or spec would come back
        # different (a YAML date, an integer key) is read from its YAML every time instead.
        if json.loads(json.dumps(card.data)) != card.data or spec_from_dump(dump) != spec:
            continue
        # The card's data and spec as one JSON string: loading the index then scans 34 strings instead
        # of building every card's dicts (~2 ms of a start-up), and only the card asked for is decoded.
        entries[path.name] = {"sha256": _sha256(path.read_bytes()), "name": card.name, "hub_id": card.hub_id,
                              "aliases": list(card.aliases),
                              "payload": json.dumps({"data": card.data, "spec": dump}, separators=(",", ":"))}
    return {"version": INDEX_VERSION, "code_sha256": code_key(), "cards": entries}


@lru_cache(maxsize=4)
def load_index(directory: Path) -> dict[str, Any] | None:
    """The index beside the cards when it was built by this code, else None (read cards from YAML)."""
    try:
        index = json.loads((directory / INDEX_FILE).read_bytes())
        if index.get("version") != INDEX_VERSION or index.get("code_sha256") != code_key():
            return None
        return index if isinstance(index.get("cards"), dict) else None
    except (OSError, ValueError, AttributeError):  # absent, unreadable or not ours: the slow path is correct
        return None


def fresh_entry(directory: Path, path: Path, raw: bytes) -> dict[str, Any] | None:
    """The index entry for the card file `path` whose bytes are `raw`, when it matches them."""
    index = load_index(directory)
    if index is None:
        return None
    entry = index["cards"].get(path.name)
    if not isinstance(entry, dict) or entry.get("sha256") != _sha256(raw):
        return None
    try:
        payload = json.loads(entry["payload"])
        return {**entry, "data": payload["data"], "spec": payload["spec"]}
    except (KeyError, TypeError, ValueError):  # not ours: the slow path is correct
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
    text = json.dumps(index, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    (directory / INDEX_FILE).write_text(text, encoding="utf-8")
    sys.stdout.write(f"wrote {directory / INDEX_FILE}: {len(index['cards'])} cards\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""MODEL argument -> ModelSpec: a bundled card (short name or Hub id), a path, or the Hub.

Card format (model_cards/*.yaml), documented in README:
    name: mixtral-8x7b              # short name, lowercase
    hub_id: mistralai/Mixtral-8x7B-v0.1
    aliases: [...]                  # more short names and Hub ids that share the architecture
    source: where the numbers came from
    published: {total_params, active_params, convention, source}   # optional, for checking
    config: {...}                   # the model's config.json keys, read by hf_config.spec_from_config
  or, instead of config:
    spec: {...}                     # ModelSpec fields directly, for models without a config.json
"""

from __future__ import annotations

import difflib
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from moeplan import card_index
from moeplan.errors import ConfigError, UnknownModelError
from moeplan.record import Record
from moeplan.safeio import check_path_text, decode_text, expand_user, load_yaml, loads_json, read_bytes, read_text
from moeplan.spec import ModelSpec

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?\Z", re.ASCII)  # \Z: no trailing newline


class Card(Record):
    """One bundled model card (a Record, not a dataclass: @dataclass costs ~0.6 ms of every start-up)."""

    name: str
    hub_id: str | None
    aliases: tuple[str, ...]
    path: Path
    data: dict[str, Any]
    # The validated spec as moeplan.card_index dumped it, when the precompiled index matched the file.
    spec_dump: dict[str, Any] | None = None

    @property
    def published(self) -> dict[str, Any]:
        return dict(self.data.get("published") or {})

    def spec(self) -> ModelSpec:
        if self.spec_dump is not None:
            return card_index.spec_from_dump(self.spec_dump)
        return spec_from_card_data(self.data, label=str(self.path))


def cards_dir() -> Path:
    """The bundled cards: inside the installed package, or model_cards/ in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "model_cards", here.parent / "model_cards"):
        # The index beside the cards says so with one stat; a glob (a pattern compiled, the folder
        # listed) is ~0.3 ms of every start-up.
        if candidate.is_dir() and ((candidate / card_index.INDEX_FILE).is_file() or any(candidate.glob("*.yaml"))):
            return candidate
    try:
        from importlib.resources import files

        return Path(str(files("moeplan.model_cards")))
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - broken install
        return here.parent / "model_cards"


def _load_yaml(path: Path, text: str | None = None) -> Any:
    import yaml  # only when a card is read from YAML: bundled cards come from the precompiled index

    if text is None:
        text = read_text(path, what="model card")  # regular file, size cap, UTF-8
    try:
        return load_yaml(text, str(path))  # aliases and depth bounded
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)}); fix the file") from None


@lru_cache(maxsize=None)
def _card_at(path: Path) -> Card:
    """The card in one bundled file, read once per process (find_card and bundled_cards share it):
    from the precompiled index when it matches the file's bytes and moeplan's code, else from YAML."""
    raw = read_bytes(path, what="model card")
    entry = card_index.fresh_entry(path.parent, path, raw)
    if entry is not None:
        return Card(name=entry["name"], hub_id=entry["hub_id"], aliases=tuple(entry["aliases"]), path=path,
                    data=entry["data"], spec_dump=entry["spec"])
    return _card_from_yaml(path, decode_text(raw, f"model card {path}"))


def _card_from_yaml(path: Path, text: str | None = None) -> Card:
    data = _load_yaml(path, text)
    if not isinstance(data, dict) or "name" not in data:
        raise ConfigError(f"{path}: a model card needs at least 'name' and 'config' or 'spec'")
    return Card(name=str(data["name"]).lower(), hub_id=data.get("hub_id"),
                aliases=tuple(str(a) for a in data.get("aliases") or ()), path=path, data=data)


@lru_cache(maxsize=1)
def bundled_cards() -> tuple[Card, ...]:
    return tuple(_card_at(path) for path in sorted(cards_dir().glob("*.yaml")))


def find_card(name: str) -> Card | None:
    key = name.strip().lower()
    # The common case first: a card's own name is its file's stem, so one file is read, not all.
    path = cards_dir() / f"{key}.yaml"
    if key and len(key) <= 200 and "/" not in key and "\\" not in key and not key.startswith(".") and path.is_file():
        card = _card_at(path)
        if card.name == key:
            return card
    for card in bundled_cards():
        keys = {card.name, *(a.lower() for a in card.aliases)}
        if card.hub_id:
            keys.add(card.hub_id.lower())
        if key in keys:
            return card
    return None


def spec_from_card_data(data: Any, *, label: str) -> ModelSpec:
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: a model card must be a YAML mapping")
    name = str(data.get("name") or Path(label).stem)
    hub_id = data.get("hub_id")
    # The hub_id goes into launch commands (`vllm serve HUB_ID`): a Hub id, never an option ("-h",
    # "--trust-remote-code") or anything else a shell or an engine would read as more than a name.
    if hub_id is not None and (not isinstance(hub_id, str) or not HUB_ID.match(hub_id) or ".." in hub_id):
        raise ConfigError(f"{label}: hub_id must be a Hub repo id such as mistralai/Mixtral-8x7B-v0.1, got "
                          f"{str(hub_id)[:60]!r}; fix the card")
    source = data.get("source")
    from moeplan.hf_config import first_error, spec_from_config  # the config reader: only off the index path

    if isinstance(data.get("config"), dict):
        return spec_from_config(data["config"], name=name, hub_id=hub_id, source=source)
    if isinstance(data.get("spec"), dict):
        try:
            # The card's name (top-level, else its file name) and top-level hub_id/source win over the
            # same keys inside `spec:`.
            return ModelSpec(**{**data["spec"], "name": name, "hub_id": hub_id or data["spec"].get("hub_id"),
                                "source": source or data["spec"].get("source")})
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{label}: {first_error(exc) if isinstance(exc, ValueError) else exc}") from None
    raise ConfigError(f"{label}: a model card needs a 'config' (config.json keys) or a 'spec' mapping")


def read_config_file(path: Path) -> dict[str, Any]:
    raw = loads_json(read_text(path, what="config"), str(path))
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: config.json must be a JSON object")
    return raw


def spec_from_path(path: Path) -> ModelSpec:
    from moeplan.hf_config import spec_from_config
    if path.suffix.lower() == ".gguf":
        from moeplan.gguf_file import spec_from_gguf  # imports gguf and numpy only on this path

        return spec_from_gguf(path)
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ConfigError(f"{path} is a directory without config.json; point at a config.json or a card")
        return spec_from_config(read_config_file(config), name=path.name, source=str(config))
    if path.suffix.lower() in (".yaml", ".yml"):
        return spec_from_card_data(_load_yaml(path), label=str(path))
    return spec_from_config(read_config_file(path), name=path.parent.name or path.stem, source=str(path))


def looks_like_path(model: str) -> bool:
    return (model.endswith((".json", ".yaml", ".yml")) or model.lower().endswith(".gguf")
            or model.startswith((".", "/", "~")) or _exists(model))


def _exists(text: str) -> bool:
    """Path.exists() raises on a name the OS refuses (a component over 255 bytes): that is "no"."""
    try:
        return Path(text).exists()
    except OSError:
        return False


def resolve(model: str, *, from_hub: bool = False) -> ModelSpec:
    """Turn the MODEL argument into a ModelSpec. Order: path, bundled card, Hub id."""
    model = model.strip()
    if not model:
        raise UnknownModelError("no model given; name a card (see `moeplan models`), a Hub id or a path")
    check_path_text(model, "MODEL")
    if looks_like_path(model):
        path = expand_user(model, "MODEL")
        try:
            found = path.exists()
        except OSError as exc:  # ENAMETOOLONG and the like
            raise ConfigError(f"{model[:80]!r}: {exc.strerror or exc}; give a shorter path") from None
        if not found:
            raise ConfigError(f"{model}: no such file or directory")
        return spec_from_path(path)
    card = None if from_hub else find_card(model)
    if card is not None:
        return card.spec()
    if HUB_ID.match(model):
        from moeplan import hub  # huggingface_hub is only imported on this path

        return hub.spec_from_hub(model)
    raise UnknownModelError(_unknown_message(model))


def _unknown_message(model: str) -> str:
    names = [c.name for c in bundled_cards()] + [c.hub_id for c in bundled_cards() if c.hub_id]
    close = difflib.get_close_matches(model.lower(), [n.lower() for n in names], n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"unknown model '{model}': {hint}see `moeplan models`, or give a Hub id (org/name) or a path to config.json"

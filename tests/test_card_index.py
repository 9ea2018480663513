"""model_cards/index.marshal, the precompiled bundled cards (moeplan.card_index): current, exact, and
never used when it no longer matches the card file or the code."""

from __future__ import annotations

import marshal
import shutil
from pathlib import Path

import pytest

from moeplan import card_index, sources

CARDS = sources.cards_dir()


def test_the_committed_index_is_a_fresh_build() -> None:
    committed = (CARDS / card_index.INDEX_FILE).read_bytes()
    fresh = card_index.build_index(CARDS)
    assert marshal.loads(committed) == fresh, "model_cards/index.marshal is stale: run python -m moeplan.card_index"
    assert committed == card_index.dump_index(fresh)  # the same index is the same bytes (no noise in git)


def test_every_bundled_card_is_indexed() -> None:
    index = card_index.load_index(CARDS)
    assert index is not None
    assert sorted(index["cards"]) == sorted(p.name for p in CARDS.glob("*.yaml"))


@pytest.mark.parametrize("path", sorted(CARDS.glob("*.yaml")), ids=lambda p: p.stem)
def test_an_indexed_spec_equals_the_validated_one(path: Path) -> None:
    fast = sources._card_at.__wrapped__(path)  # a fresh read: other tests may have changed cached data
    slow = sources._card_from_yaml(path)
    assert fast.spec_dump is not None
    assert (fast.name, fast.hub_id, fast.aliases, fast.data) == (slow.name, slow.hub_id, slow.aliases, slow.data)
    a, b = fast.spec(), slow.spec()
    assert a == b
    assert a.model_dump(mode="json") == b.model_dump(mode="json")
    assert type(a.layers) is tuple and type(a.notes) is tuple


def _copy_cards(tmp_path: Path) -> Path:
    folder = tmp_path / "cards"
    shutil.copytree(CARDS, folder)
    return folder


def test_an_edited_card_is_read_from_its_yaml(tmp_path: Path) -> None:
    folder = _copy_cards(tmp_path)
    path = folder / "mixtral-8x7b.yaml"
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("num_local_experts: 8", "num_local_experts: 16"), encoding="utf-8")
    assert card_index.fresh_entry(folder, path, path.read_bytes()) is None
    card = sources._card_at.__wrapped__(path)  # uncached: other tests rely on the cached cards' identity
    assert card.spec_dump is None and card.spec().num_experts == 16


def test_an_index_from_other_code_is_not_used(tmp_path: Path) -> None:
    folder = _copy_cards(tmp_path)
    index = marshal.loads((folder / card_index.INDEX_FILE).read_bytes())
    index["code_checksum"] = "0" * 24
    (folder / card_index.INDEX_FILE).write_bytes(card_index.dump_index(index))
    card_index.load_index.cache_clear()
    try:
        assert card_index.load_index(folder) is None
        for junk in (b"{not marshal", b"", marshal.dumps([1, 2]), marshal.dumps({"version": "x"})):
            (folder / card_index.INDEX_FILE).write_bytes(junk)
            card_index.load_index.cache_clear()
            assert card_index.load_index(folder) is None, junk
        card = sources._card_at.__wrapped__(folder / "mixtral-8x7b.yaml")  # read from its YAML instead
        assert card.spec_dump is None and card.spec().num_experts == 8
    finally:
        card_index.load_index.cache_clear()


def test_fit_of_a_card_imports_no_yaml_no_json_and_no_config_reader() -> None:
    """Start-up (issue 17): a bundled card comes from the index, so neither PyYAML, json nor the HF
    config reader (moeplan.hf_config) is imported."""
    import subprocess
    import sys

    code = ("import sys; from moeplan.cli import main; sys.argv = ['moeplan', 'fit', 'mixtral-8x7b', '--gpus', "
            "'2x24GB']\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
            "sys.stderr.write(str([m for m in ('yaml', 'json', 'moeplan.hf_config') if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stderr.strip().endswith("[]"), proc.stderr


def test_the_spec_module_still_offers_the_config_reader() -> None:
    from moeplan import hf_config, spec

    assert spec.spec_from_config is hf_config.spec_from_config and spec.first_error is hf_config.first_error
    assert spec.SUPPORTED_MODEL_TYPES is hf_config.SUPPORTED_MODEL_TYPES
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        spec.not_a_name  # noqa: B018


def test_the_code_key_follows_every_byte_of_the_card_reading_code(tmp_path: Path, monkeypatch) -> None:
    for name in card_index.CODE_FILES:
        (tmp_path / name).write_bytes((card_index._HERE / name).read_bytes())
    monkeypatch.setattr(card_index, "_HERE", tmp_path)
    key = card_index.code_key()
    for name in card_index.CODE_FILES:
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # one bit
        assert card_index.code_key() != key, name
        (tmp_path / name).write_bytes(data)
    assert card_index.code_key() == key

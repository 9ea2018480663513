"""Any model on the Hugging Face Hub, from its config.json and safetensors headers, never its weights.

Imported only when MODEL is a Hub id (`org/name` or `org/name@revision`), so planning from a bundled
card never imports huggingface_hub. All network access goes through huggingface_hub, which honours
HF_TOKEN, HF_HOME (its cache), HF_HUB_OFFLINE and HF_ENDPOINT.

What is read:
  * config.json, with `hf_hub_download` (cached like any Hub file). Only its JSON values are read:
    `auto_map` and remote code are never looked at, let alone run.
  * the safetensors headers, with `HfApi.get_safetensors_metadata`: HTTP range requests for the
    first bytes of each shard, named by model.safetensors.index.json (or one model.safetensors).
    Safetensors format (https://huggingface.co/docs/safetensors/index#format): 8 bytes little-endian
    u64 N, then N bytes of JSON {tensor name: {dtype, shape, data_offsets: [begin, end]}}, then data.
    What the headers say is summarised into a StoredCheckpoint and kept in huggingface_hub's assets
    cache, keyed by commit, so a later run without network gives the same answer.

Every failure becomes one HubError (or ConfigError) line that says what to do; the CLI exits 2.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
import yaml
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

from moeplan.errors import ConfigError, HubError
from moeplan.params import count_params, fmt_billions
from moeplan.spec import ModelSpec, StoredCheckpoint, spec_from_config

try:
    from huggingface_hub import errors as hf_errors
except ImportError:  # huggingface_hub < 0.24 exported its errors from utils
    from huggingface_hub import utils as hf_errors  # type: ignore[no-redef]

CONFIG_FILE = "config.json"
DEFAULT_REVISION = "main"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_CACHE_LIBRARY = "moeplan"
_CACHE_FILE = "checkpoint.json"
_CACHE_VERSION = 1  # bump when StoredCheckpoint or the note wording changes


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------


def parse_model_id(model: str) -> tuple[str, str]:
    """'org/name@rev' -> ('org/name', 'rev'); the revision defaults to main."""
    repo_id, at, revision = model.strip().partition("@")
    if not _HUB_ID.match(repo_id) or (at and not revision):
        raise HubError(f"'{model}' is not a Hub id: write org/name or org/name@revision")
    return repo_id, revision or DEFAULT_REVISION


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
    fetched = _fetch_config(repo_id, revision)
    spec = spec_from_config(fetched.raw, name=model.strip(), hub_id=repo_id, source=fetched.source)
    checkpoint = _read_checkpoint(fetched, spec)
    return (spec.model_copy(update={"checkpoint": checkpoint}) if checkpoint is not None else spec), fetched


# ----------------------------------------------------------------------------------------------
# config.json
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fetched:
    repo_id: str
    revision: str
    raw: dict[str, Any]
    commit: str | None  # the commit config.json was read at, when the cache layout tells it
    online: bool  # False: read from the local cache because the Hub was unreachable
    source: str


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """huggingface_hub draws tqdm bars on downloads and while it reads shards; the CLI owns stderr."""
    were_off = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not were_off:
            enable_progress_bars()


def _fetch_config(repo_id: str, revision: str) -> _Fetched:
    path: Path | None = None
    if _offline_mode():
        reason, fix = "HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE to download it"
    else:
        try:
            # A HEAD first, without retries: when the Hub is down, hf_hub_download (1.x, 2.x) retries
            # with backoff for ~20 s, logging each retry, before it looks in the cache.
            get_hf_file_metadata(hf_hub_url(repo_id, CONFIG_FILE, revision=revision))
            with _no_progress_bars():
                path = Path(hf_hub_download(repo_id, CONFIG_FILE, revision=revision))
        except Exception as exc:  # huggingface_hub raises its own errors and those of its HTTP stack
            unreachable = _unreachable_reason(exc)
            if unreachable is None:
                raise _hub_error(exc, repo_id, revision, CONFIG_FILE) from None
            reason = f"cannot reach the Hub at {constants.ENDPOINT} ({unreachable})"
            fix = "check the network, proxy and HF_ENDPOINT"
    online = path is not None
    if path is None:
        try:
            path = Path(hf_hub_download(repo_id, CONFIG_FILE, revision=revision, local_files_only=True))
        except Exception:  # whatever the reason, the file is not usable from the cache
            raise HubError(
                f"{reason}, and {CONFIG_FILE} of {repo_id}@{revision} is not in the local cache "
                f"({constants.HF_HUB_CACHE}): {fix}, set HF_TOKEN if the repo is private or gated, "
                "or pass a local path to config.json"
            ) from None
    raw = _parse_config(path, repo_id, revision)
    commit = path.parent.name if _COMMIT.match(path.parent.name) else None
    source = f"config.json of {repo_id}@{revision}"
    if commit and commit != revision:
        source += f" (commit {commit[:12]})"
    if not online:
        source += " from the local cache (Hub not reached)"
    return _Fetched(repo_id=repo_id, revision=revision, raw=raw, commit=commit, online=online, source=source)


def _parse_config(path: Path, repo_id: str, revision: str) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{CONFIG_FILE} of {repo_id}@{revision} is not valid JSON (line {exc.lineno}: {exc.msg}); "
            "pass a corrected local config.json instead"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the cached {CONFIG_FILE} of {repo_id}@{revision} ({path}): {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{CONFIG_FILE} of {repo_id}@{revision} must be a JSON object, got {type(raw).__name__}")
    return raw


# ----------------------------------------------------------------------------------------------
# Safetensors headers
# ----------------------------------------------------------------------------------------------

# One tensor as a header describes it: (dtype, shape, (begin, end) byte offsets of its data).
TensorMeta = tuple[str, list[int], tuple[int, int]]


def _read_checkpoint(fetched: _Fetched, spec: ModelSpec) -> StoredCheckpoint | None:
    """Headers -> StoredCheckpoint; None when the repo has no safetensors (only .bin, GGUF, ...)."""
    repo_id, revision = fetched.repo_id, fetched.revision
    if not fetched.online or _offline_mode():
        return _load_cached(repo_id, fetched.commit)
    # Read at the commit config.json came from, so a push in between cannot mix two versions.
    at = fetched.commit or revision
    try:
        files = _fetch_headers(repo_id, at)
    except hf_errors.NotASafetensorsRepoError:
        return None
    except hf_errors.SafetensorsParsingError as exc:
        raise HubError(_parsing_message(exc, f"{repo_id}@{revision}")) from None
    except (AttributeError, TypeError, KeyError, ValueError) as exc:
        # huggingface_hub parsed JSON that is not a safetensors header (a list, an index without
        # weight_map, ...); it only wraps KeyError and JSONDecodeError itself.
        raise HubError(
            f"refusing the safetensors headers of {repo_id}@{revision}: not in the safetensors format "
            f"({type(exc).__name__}: {_first_line(exc)}); pass a local config.json to plan without reading them"
        ) from None
    except Exception as exc:  # as in _fetch_config
        if _unreachable_reason(exc) is not None:
            return _load_cached(repo_id, fetched.commit)
        raise _hub_error(exc, repo_id, revision, "the safetensors headers") from None
    checkpoint = summarize_headers(files, spec, label=f"{repo_id}@{revision}")
    _save_cached(repo_id, fetched.commit, checkpoint)
    return checkpoint


# huggingface_hub words its parsing errors "Failed to parse safetensors header for 'FILE' (CONTEXT): DETAIL".
_HF_PARSING = re.compile(r"^Failed to parse safetensors header for '(?P<file>[^']+)' \([^)]*\): (?P<detail>.*)$")


def _parsing_message(exc: BaseException, label: str) -> str:
    """SafetensorsParsingError -> one line: which file, what is wrong with its header, what to do.

    huggingface_hub refuses a header whose 8-byte length prefix exceeds its
    constants.SAFETENSORS_MAX_HEADER_LENGTH (25,000,000 bytes in 0.2x to 2.x; the safetensors
    format itself caps headers at 100,000,000, crate safetensors src/tensor.rs MAX_HEADER_SIZE)
    before asking for those bytes, and one that is not JSON after reading it.
    """
    text = " ".join(str(exc).split())
    match = _HF_PARSING.match(text)
    where, detail = (f"{match['file']} in {label}", match["detail"]) if match else (label, text)
    return (
        f"refusing the safetensors header of {where}: {detail.rstrip('.')}; the checkpoint is damaged or "
        "not safetensors: pass a local config.json to plan without reading it"
    )


def _fetch_headers(repo_id: str, revision: str) -> dict[str, dict[str, TensorMeta]]:
    """{file name: {tensor name: TensorMeta}} for every safetensors file of the checkpoint."""
    with _no_progress_bars():
        meta = HfApi().get_safetensors_metadata(repo_id, revision=revision)
    return {
        filename: {name: (info.dtype, info.shape, info.data_offsets) for name, info in fm.tensors.items()}
        for filename, fm in meta.files_metadata.items()
    }


# Tensor names that are not weights of the model the config describes. Sources: DeepSeek-V3
# README_WEIGHTS.md (MTP layer 61, fp8 weight_scale_inv per 128x128 block); transformers
# integrations/mxfp4.py (gpt-oss *_blocks / *_scales, U8); AutoGPTQ / AutoAWQ (qweight, qzeros,
# scales, g_idx); compressed-tensors (weight_scale, input_scale); bitsandbytes (absmax, quant_map).
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_VISION = re.compile(r"vision|visual|multi_modal_projector|mm_projector")
_MTP_PREFIXES = ("mtp.", "model.mtp.")
_SCALE_SUFFIXES = ("_scale_inv", "_scale", "_scale_2", "_zero_point")
_QUANT_META = frozenset({"qzeros", "scales", "g_idx", "absmax", "quant_map", "nested_absmax", "nested_quant_map"})


def _category(name: str, dtype: str, layer: int | None, num_layers: int) -> str:
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
    try:
        dtype, shape, (begin, end) = meta
        elements = 1
        for dim in shape:
            if type(dim) is not int or dim < 0:  # exact type: True is not a dimension
                raise ValueError(dim)
            elements *= dim
        if not isinstance(dtype, str) or type(begin) is not int or type(end) is not int or not 0 <= begin <= end:
            raise ValueError(meta)
    except (TypeError, ValueError):
        raise HubError(
            f"refusing the safetensors header of {filename} in {label}: tensor '{name}' has a malformed "
            f"dtype/shape/data_offsets entry ({meta!r:.120}); the checkpoint is damaged"
        ) from None
    return dtype, elements, end - begin


def summarize_headers(
    files: Mapping[str, Mapping[str, Any]], spec: ModelSpec, *, label: str = "checkpoint"
) -> StoredCheckpoint:
    """What the headers store, with notes that reconcile it with count_params(spec).total_params.

    `files` maps each safetensors file to {tensor name: (dtype, shape, (begin, end))}.
    """
    elements_by: dict[tuple[str, str], int] = {}  # (category, dtype) -> elements
    mtp_layers: set[int] = set()
    total_bytes = 0
    names: list[str] = []
    num_layers = spec.num_layers
    for filename, tensors in files.items():
        for name, meta in tensors.items():
            dtype, elements, size = _elements(filename, name, meta, label)
            total_bytes += size  # from data_offsets: exact, also for sub-byte dtypes
            match = _LAYER.search(name)
            layer = int(match.group(1)) if match else None
            category = _category(name, dtype, layer, num_layers)
            key = (category, dtype)
            elements_by[key] = elements_by.get(key, 0) + elements
            if category == "mtp" and layer is not None:
                mtp_layers.add(layer)
            names.append(name)
    by_dtype: Counter[str] = Counter()
    by_category: Counter[str] = Counter()
    dtypes_in: dict[str, set[str]] = {}
    for (category, dtype), elements in elements_by.items():
        by_dtype[dtype] += elements
        by_category[category] += elements
        dtypes_in.setdefault(category, set()).add(dtype)
    notes = _notes(spec, by_category, dtypes_in, mtp_layers, sum(by_dtype.values()))
    return StoredCheckpoint(
        params_by_dtype=dict(sorted(by_dtype.items())),
        total_bytes=total_bytes,
        num_files=len(files),
        tensor_names_sample=tuple(sorted(names)[:8]),
        notes=tuple(notes),
    )


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
        layers = ", ".join(str(i) for i in sorted(mtp_layers)) or "mtp.*"
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
# The summary cache: huggingface_hub's assets cache, one file per (repo, commit)
# ----------------------------------------------------------------------------------------------


def _cache_file(repo_id: str, commit: str) -> Path:
    folder = huggingface_hub.cached_assets_path(library_name=_CACHE_LIBRARY, namespace=repo_id, subfolder=commit)
    return folder / _CACHE_FILE


def _save_cached(repo_id: str, commit: str | None, checkpoint: StoredCheckpoint) -> None:
    if commit is None:
        return
    try:
        payload = {"version": _CACHE_VERSION, "checkpoint": checkpoint.model_dump(mode="json")}
        _cache_file(repo_id, commit).write_text(json.dumps(payload), encoding="utf-8")
    except (OSError, ValueError):
        pass  # a cache that cannot be written only costs the next offline run its checkpoint


def _load_cached(repo_id: str, commit: str | None) -> StoredCheckpoint | None:
    if commit is None:
        return None
    try:
        payload = json.loads(_cache_file(repo_id, commit).read_text(encoding="utf-8"))
        if payload.get("version") != _CACHE_VERSION:
            return None
        return StoredCheckpoint.model_validate(payload["checkpoint"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # never cached, or written by another version: plan without it


# ----------------------------------------------------------------------------------------------
# Errors: huggingface_hub's exceptions -> one actionable line
# ----------------------------------------------------------------------------------------------


def _offline_mode() -> bool:
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _chain(exc: BaseException) -> Iterable[BaseException]:
    """The exception and what caused it (hf wraps connection errors in LocalEntryNotFoundError)."""
    seen: set[int] = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        yield node
        node = node.__cause__ or node.__context__


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


# Transport failures by class name, so this works whichever HTTP stack huggingface_hub uses
# (requests in 0.x, httpx in 1.x, httpx2 in 2.x).
_TRANSPORT_NAMES = {
    "ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "NetworkError", "TransportError",
    "ConnectionError", "Timeout", "ProxyError", "RemoteProtocolError",
}  # fmt: skip


# Raised when the endpoint answers without X-Repo-Commit / ETag (a proxy or captive portal, not the Hub).
_FILE_METADATA_ERROR: type[Exception] | tuple[()] = getattr(hf_errors, "FileMetadataError", ())
_REMOTE_ENTRY_NOT_FOUND: type[Exception] = getattr(hf_errors, "RemoteEntryNotFoundError", hf_errors.EntryNotFoundError)


def _unreachable_reason(exc: BaseException) -> str | None:
    """A short reason when the Hub could not be reached (network, offline mode, 5xx); else None."""
    for node in _chain(exc):
        if isinstance(node, hf_errors.OfflineModeIsEnabled):
            return "offline mode"
        if isinstance(node, hf_errors.HfHubHTTPError):
            status = _status(node)
            return f"HTTP {status}" if status is not None and status >= 500 else None
        names = {cls.__name__ for cls in type(node).__mro__}
        if names & _TRANSPORT_NAMES:
            return type(node).__name__
        if isinstance(node, _FILE_METADATA_ERROR):
            return "the endpoint does not answer like the Hub"
    return None


def _hub_error(exc: BaseException, repo_id: str, revision: str, what: str) -> HubError:
    endpoint = constants.ENDPOINT
    token_hint = "set HF_TOKEN to a read token (https://huggingface.co/settings/tokens) or run `hf auth login`"
    for node in _chain(exc):
        status = _status(node)
        if isinstance(node, hf_errors.GatedRepoError):
            if status == 403:
                return HubError(
                    f"{repo_id} is gated and your token has not been granted access: accept its terms at "
                    f"{endpoint}/{repo_id}, then retry with that account's token (HF_TOKEN or `hf auth login`)"
                )
            return HubError(
                f"{repo_id} is gated and no token was sent (HTTP {status or 401}): {token_hint}, from an "
                f"account that accepted its terms at {endpoint}/{repo_id}"
            )
        if isinstance(node, hf_errors.RepositoryNotFoundError):
            if status == 401:
                return HubError(
                    f"{repo_id} was not found on {endpoint} (HTTP 401): it does not exist, or it is private or "
                    f"gated and no valid token was sent; check the id, or {token_hint}"
                )
            return HubError(
                f"{repo_id} does not exist on {endpoint} (HTTP {status}), or your token cannot see it: check "
                "the org/name spelling (the Hub id is case-sensitive)"
            )
        if isinstance(node, hf_errors.RevisionNotFoundError):
            return HubError(
                f"{repo_id} has no revision '{revision}': give a branch, tag or commit that exists (org/name@main)"
            )
        if isinstance(node, _REMOTE_ENTRY_NOT_FOUND) and not isinstance(node, hf_errors.LocalEntryNotFoundError):
            return HubError(
                f"{repo_id}@{revision} has no {what}: moeplan reads transformers-style repos; "
                "pass a local config.json or write a model card"
            )
        if isinstance(node, hf_errors.HfHubHTTPError):
            if status == 401:
                return HubError(f"the Hub refused the token for {repo_id} (HTTP 401): {token_hint}")
            if status == 403:
                return HubError(
                    f"access to {repo_id} is forbidden (HTTP 403): your token lacks read permission; {token_hint}"
                )
            if status == 429:
                return HubError(
                    f"the Hub is rate-limiting requests for {repo_id} (HTTP 429): retry later, or "
                    f"{token_hint} for higher limits"
                )
            return HubError(f"the Hub answered HTTP {status} for {what} of {repo_id}@{revision}; retry later")
        if isinstance(node, hf_errors.HFValidationError):
            return HubError(f"'{repo_id}' is not a valid Hub repo id: {_first_line(node)}")
    return HubError(
        f"reading {what} of {repo_id}@{revision} from {endpoint} failed: {type(exc).__name__}: {_first_line(exc)}"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

"""Issue 12: every bundled card whose model_type transformers knows, built with transformers' own model
class on torch.device("meta") (nothing allocated), counted tensor by tensor and grouped by component,
must equal moeplan's count per component. Skipped when torch or transformers is not installed.

The grouping follows parameter names the way the shared reference's counted truth does: the router
holds gates, router scales and stored e_score_correction_bias buffers (and Qwen's shared_expert_gate);
a gated MLP inside a MoE layer beside the experts (Gemma 4) is dense_mlp, in a dense layer dense_ffn;
attention holds its internal norms, compressors and indexers.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections import Counter
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moeplan import sources  # noqa: E402
from moeplan.params import count_params  # noqa: E402


def _category(name: str, moe_layer: bool) -> str:
    if re.search(r"(^|\.)(vision_tower|visual|vision_model|embed_vision|multi_modal_projector)\.", name):
        return "vision"
    if re.search(r"embed_tokens_per_layer|per_layer_model_projection|per_layer_projection_norm|per_layer_input_gate"
                 r"|\.per_layer_projection\.", name):
        return "per_layer_embedding"
    if "embed_tokens" in name or name.endswith(".wte.weight"):  # DBRX names it wte
        return "embedding"
    if re.search(r"(^|\.)lm_head\.", name):
        return "lm_head"
    if "_hc." in name or "hc_head" in name:
        return "hyper_connections"
    if re.search(r"\.(self_attn|linear_attn|attention|attn)\.", name):
        return "attention"
    if ".mamba." in name:
        return "mamba"
    if re.search(r"shared_expert_gate|\.gate\.|\.router\.|e_score_correction_bias", name):
        return "router"
    if ".experts." in name:
        return "routed_experts"
    if "shared_expert" in name:
        return "shared_experts"
    if re.search(r"\.(mlp|feed_forward)\.(gate_proj|up_proj|down_proj|gate_up_proj)", name):
        return "dense_mlp" if moe_layer else "dense_ffn"
    if "norm" in name:
        return "norms"
    return "unsorted:" + name


def _meta_counts(config: dict[str, Any]) -> Counter[str]:
    cfg = transformers.AutoConfig.for_model(**config)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        if getattr(cfg, "vision_config", None) is not None:
            model = transformers.AutoModelForImageTextToText.from_config(cfg)
        else:
            model = transformers.AutoModelForCausalLM.from_config(getattr(cfg, "text_config", None) or cfg)
    named = list(model.named_parameters())
    named += [(n, b) for n, b in model.named_buffers() if "e_score_correction_bias" in n]
    moe_layers = {m.group(1) for n, _ in named if ".experts." in n and (m := re.search(r"layers\.(\d+)\.", n))}
    counts: Counter[str] = Counter()
    for n, p in named:
        m = re.search(r"layers\.(\d+)\.", n)
        counts[_category(n, bool(m and m.group(1) in moe_layers))] += p.numel()
    return counts


def _known(card: sources.Card) -> bool:
    config = card.data.get("config")
    if not isinstance(config, dict):
        return False
    try:
        transformers.AutoConfig.for_model(**copy.deepcopy(config))  # it rewrites nested dicts in place
    except Exception:  # an unknown model_type, or a config this transformers version refuses
        return False
    return True


CARDS = [c for c in sources.bundled_cards() if _known(c)]


def test_the_tier_covers_the_2026_models() -> None:
    names = {c.name for c in CARDS}
    assert {"deepseek-v4-pro", "gemma-4-26b-a4b", "qwen3.6-35b-a3b", "qwen3-next-80b-a3b", "glm-5"} <= names


@pytest.mark.parametrize("card", CARDS, ids=[c.name for c in CARDS])
def test_meta_device_counts_match_per_component(card: sources.Card) -> None:
    theirs = _meta_counts(copy.deepcopy(card.data["config"]))  # transformers rewrites nested rope dicts in place
    assert not [k for k in theirs if k.startswith("unsorted:")], theirs
    ours = {c.name: c.total for c in count_params(card.spec()).components}
    assert {k: v for k, v in ours.items() if v} == {k: v for k, v in theirs.items() if v}

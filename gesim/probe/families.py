"""Which Hugging Face causal-LM families the probe measures exactly: the one list.

Every ``model_type`` in transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` is listed here
with its status, checked by ``tests/test_probe_families.py`` on a tiny random-init model
built from the family's default config by :func:`tiny_config` (float64, padded pairs, fast
backend against the two-backward reference, full parameters and LoRA):

* ``EXACT``: fast = reference to 1e-10 (relative), full parameters and LoRA;
* ``REFUSED``: the probe raises a ``GesimError`` naming what it cannot do (the reason);
* ``LORA_REFUSED``: exact on full parameters, LoRA refused with a GesimError;
* ``FAILING``: open, a raw exception from the probe (a strict test notices a fix);
* ``UNBUILT``: transformers cannot build or run a tiny float64 instance here (the reason).

Families not in any list are unchecked (:func:`unchecked`): the session that built this ran
out of time before classifying them; the completeness test lists them.

The README's family table is generated from these lists by :func:`markdown_table`.
"""

from __future__ import annotations

EXACT = (
    "apertus", "apertus1p5_text", "arcee", "aria_text", "bert", "bert-generation", "big_bird", "biogpt", "bitnet",
    "bloom", "camembert", "cohere", "cohere2", "cwm", "data2vec-text", "electra", "emu3", "ernie", "ernie4_5",
    "exaone", "exaone4", "falcon", "fuyu", "gemma", "gemma2", "gemma3", "gemma3_text", "glm", "glm4", "gpt2",
    "lfm2", "llama", "opt", "qwen2_moe", "qwen3", "codegen",
)
# exact to a looser tolerance: these models compute part of their forward in float32 whatever
# the parameters' dtype (attention or router softmax), so batched and one-by-one runs differ by
# float32 rounding; the probe itself is exact for the function the model computes
FLOAT32_PARTS = {"codegen": 1e-6, "dots1": 1e-8}
_PEFT_EXPERTS = ("LoRA on fused MoE experts (PEFT ParamWrapper) mixes rows when re-run: refused by name",
                 "does not reproduce its row")
LORA_REFUSED = {name: _PEFT_EXPERTS for name in ("afmoe", "cohere2_moe", "dots1", "ernie4_5_moe", "exaone_moe",
                                                 "flex_olmo", "mixtral", "qwen3_moe")}
_OFFSET = ("learned positional embedding that adds an offset to the ids (not W[ids] * scale)",
           "returns something other than W\\[ids\\]")
_ROWS = ("an attention module with its own parameters cannot be re-run on one row", "cannot be re-run on one row")
REFUSED = {"bart": _OFFSET, "bigbird_pegasus": _OFFSET, "blenderbot": _OFFSET, "blenderbot-small": _OFFSET,
           "cpmant": ("a position-bias module runs before any embedding", "does not come from the batch's embeddings"),
           "flint": _ROWS, "diffllama": _ROWS, "doge": _ROWS, "dory": _ROWS, "beam": _ROWS,
           "gpt_oss": ("attention sinks: the attention module cannot be re-run on one row",
                       "cannot be re-run on one row")}
# open: a raw exception from the probe (the strict test fails once fixed)
FAILING = {"ctrl": "in-place update of the embedding output", "git": "in-place update of the embedding output"}
_MLA = "tiny multi-head latent attention config not found (rope/nope head dims)"
UNBUILT = {
    "blt": "tiny model did not run within 60 s", "falcon_h1": "tiny model did not run within 60 s",
    "cohere_compass_text": "config layer_types", "dbrx": "config has no rope_theta", "dots3_note": "per-layer config",
    "dots3_note_text": "per-layer config", "gemma3n": "needs timm", "gemma3n_text": "cache layer types",
    "gemma4": "per-layer config", "gemma4_assistant": "config validation", "gemma4_text": "per-layer config",
    "gemma4_unified": "per-layer config", "gemma4_unified_assistant": "per-layer config",
    "gemma4_unified_text": "per-layer config", "xglm": "float64 eager attention overflows in transformers",
    "bamba": "mamba head dims", "axk1": _MLA, "axk2": _MLA, "bailing_hybrid": _MLA, "deepseek_v2": _MLA,
    "deepseek_v3": _MLA, "deepseek_v32": _MLA, "deepseek_v4": _MLA,
}
ALL_LISTS = (EXACT, LORA_REFUSED, REFUSED, FAILING, UNBUILT)


def unchecked() -> list:
    """Families transformers offers that this session's matrix has not classified yet."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - listed())


def listed() -> set:
    return {name for group in ALL_LISTS for name in group}


# transformers config attributes shrunk for a tiny instance (when the config has them)
SMALL = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=128, n_embd=32, n_layer=2, n_head=4,
             n_positions=128, n_inner=64, d_model=32, ffn_dim=64, num_layers=2, n_ctx=128, attention_heads=4,
             num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
             shared_expert_intermediate_size=16, n_shared_experts=1, sliding_window=4, word_embed_proj_dim=32,
             kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, qk_head_dim=8,
             decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64, encoder_layers=2,
             encoder_attention_heads=4, encoder_ffn_dim=64, rotary_dim=4, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
VOCAB = SMALL["vocab_size"]


def _shrink(cfg) -> None:
    for key, value in SMALL.items():
        if hasattr(cfg, key) and not isinstance(getattr(cfg, key), (list, dict)):
            try:
                setattr(cfg, key, value)
            except (AttributeError, TypeError, ValueError):
                pass
    if hasattr(cfg, "qk_rope_head_dim"):
        cfg.head_dim = cfg.qk_rope_head_dim
    if hasattr(cfg, "is_decoder"):
        cfg.is_decoder = True
    types = getattr(cfg, "layer_types", None)
    if types:
        other = [t for t in types if t != types[0]]
        try:
            cfg.layer_types = [types[0], other[0] if other else types[0]]
        except (AttributeError, TypeError, ValueError):
            pass
    for sub in ("text_config", "decoder"):
        if hasattr(getattr(cfg, sub, None), "to_dict"):
            _shrink(getattr(cfg, sub))


def tiny_config(model_type: str):
    """The family's default config with every size shrunk (2 layers, width 32, vocabulary 96,
    sliding windows of 4 so that padded pairs exercise them)."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type)
    _shrink(cfg)
    return cfg


def build_tiny(model_type: str, seed: int = 0):
    """A float64, eager-attention, eval-mode random-init model of the family."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation="eager",
                                             experts_implementation="eager")
    return model.double().eval()


def markdown_table() -> str:
    """The README's table: one row per classified family, its status and the reason."""
    rows = [(n, "exact, full and LoRA" + (f" (float32 parts: {FLOAT32_PARTS[n]:g})" if n in FLOAT32_PARTS else ""), "")
            for n in EXACT]
    rows += [(n, "exact full parameters; LoRA refused", why) for n, (why, _) in LORA_REFUSED.items()]
    rows += [(n, "refused (GesimError)", why) for n, (why, _) in REFUSED.items()]
    rows += [(n, "open failure (raw exception)", why) for n, why in FAILING.items()]
    rows += [(n, "not built tiny here", why) for n, why in UNBUILT.items()]
    lines = ["| family (`model_type`) | probe | reason |", "|---|---|---|"]
    lines += [f"| `{n}` | {s} | {w} |" for n, s, w in sorted(rows)]
    return "\n".join(lines)

"""Which Hugging Face causal-LM families the probe measures exactly: the one list.

Every ``model_type`` in transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` is listed here
with its status, checked by ``tests/test_probe_families.py`` on a tiny random-init model
built from the family's default config by :func:`tiny_config` (float64, padded pairs, fast
backend against the two-backward reference, full parameters and LoRA):

* ``EXACT``: fast = reference to 1e-10 (relative), full parameters and LoRA;
* ``REFUSED``: the probe raises a ``GesimError`` naming what it cannot do (the reason);
* ``UNBUILT``: transformers cannot build or run a tiny float64 instance here (the reason).

The README's family table is generated from these lists by :func:`markdown_table`.
"""

from __future__ import annotations

EXACT = (
    "apertus", "apertus1p5_text", "arcee", "bart", "bert", "bert-generation", "big_bird", "bigbird_pegasus",
    "biogpt", "bitnet", "blenderbot", "blenderbot-small", "bloom", "camembert", "codegen", "cohere", "cohere2",
    "cpmant", "ctrl", "cwm", "data2vec-text", "diffllama", "doge", "dory", "electra", "ernie", "ernie4_5",
    "exaone", "exaone4", "falcon", "flint", "fuyu", "gemma", "gemma2", "gemma3", "gemma3_text", "git", "glm",
    "glm4", "got_ocr2", "gpt-sw3", "gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox", "gpt_neox_japanese", "gptj",
    "granite", "granite_swa", "helium", "hrm_text", "hunyuan_v1_dense", "hyperclovax", "internlm3",
    "iquestcoder", "jais2", "jetmoe", "lfm2", "llama", "marian", "mbart", "megatron-bert", "ministral",
    "ministral3", "mistral", "mllama", "modernbert-decoder", "moshi", "mpt", "mvp", "nanochat", "nemotron",
    "olmo", "olmo2", "olmo3", "openai-gpt", "opt", "pegasus", "persimmon", "phi", "phi3", "plbart", "prophetnet",
    "qwen2", "qwen3", "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "seed_oss", "smollm3",
    "stablelm", "starcoder2", "trocr", "vaultgemma", "whisper", "xlm", "xlm-roberta", "xlm-roberta-xl", "xlnet",
)
REFUSED: dict[str, str] = {}
UNBUILT: dict[str, str] = {}

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
    """The README's table: one row per family, its status and the reason where not exact."""
    rows = [(name, "exact (full and LoRA)", "") for name in EXACT]
    rows += [(name, "refused", why) for name, why in REFUSED.items()]
    rows += [(name, "not built here", why) for name, why in UNBUILT.items()]
    lines = ["| family (`model_type`) | probe | reason |", "|---|---|---|"]
    lines += [f"| `{n}` | {s} | {w} |" for n, s, w in sorted(rows)]
    return "\n".join(lines)

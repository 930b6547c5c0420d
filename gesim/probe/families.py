"""Which Hugging Face causal-LM families the probe measures exactly: the one list.

Every ``model_type`` in transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` is listed here
with its status, checked by ``tests/test_probe_families.py`` on a tiny random-init model
built from the family's default config by :func:`tiny_config` (float64, padded pairs, fast
backend against the two-backward reference, full parameters and LoRA):

* ``EXACT``: fast = reference to 1e-10 (relative), full parameters and LoRA;
* ``REFUSED``: the probe raises a ``GesimError`` naming what it cannot do (the reason);
* ``LORA_REFUSED``: exact on full parameters, LoRA refused with a GesimError;
* ``FULL_ONLY``: exact on full parameters, LoRA not applicable (PEFT refuses or crashes);
* ``FAILING``: open, a raw exception from the probe (a strict test notices a fix);
* ``UNBUILT``: transformers cannot build or run a tiny float64 instance here (the reason).

A family transformers adds later is in no list (:func:`unchecked`) and fails the completeness test.

The README's family table is generated from these lists by :func:`markdown_table`.
"""

from __future__ import annotations

EXACT = (
    "apertus", "apertus1p5_text", "arcee", "aria_text", "axk1", "bailing_hybrid", "bart", "beam", "bert",
    "bert-generation", "big_bird", "bigbird_pegasus", "biogpt", "bitnet", "blenderbot", "blenderbot-small",
    "bloom", "camembert", "codegen", "cohere", "cohere2", "ctrl", "cwm", "data2vec-text", "deepseek_v3",
    "diffllama", "doge", "electra", "emu3", "ernie", "ernie4_5", "exaone", "exaone4", "falcon", "flint", "fuyu",
    "gemma", "gemma2", "gemma3", "gemma3_text", "git", "glm", "glm4", "got_ocr2", "gpt-sw3", "gpt2", "gpt_bigcode",
    "gpt_neo", "gpt_neox", "gpt_neox_japanese", "gpt_oss", "gptj", "granite", "granite_swa", "granitemoe",
    "granitemoe_swa", "granitemoeshared", "helium", "hunyuan_v1_dense", "hy_v3", "hyperclovax", "internlm3",
    "iquestcoder", "jais2", "jamba", "kimi_linear", "kolibri1", "laguna", "lara_mini", "lfm2", "lfm3", "llama",
    "longcat_flash", "marian", "mbart", "megatron-bert", "mimo_v2_flash", "minicpm3", "minimax_m3_vl_text",
    "ministral", "ministral3", "mistral", "mllama", "modernbert-decoder", "moshi", "mpt", "mvp", "nanochat",
    "nemotron", "olmo", "olmo2", "olmo3", "olmo_hybrid", "openai-gpt", "opt", "pegasus", "persimmon", "phi",
    "phi3", "plbart", "qwen2", "qwen2_moe", "qwen3", "qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_5_text",
    "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "rwkv", "sarvam_moe", "seed_oss",
    "smollm3", "stablelm", "starcoder2", "trocr", "vaultgemma", "xlm", "xlm-roberta", "xlm-roberta-xl", "youtu",
)
# exact to a looser tolerance: these models compute part of their forward in float32 whatever
# the parameters' dtype (attention, router or recurrence in float32), so batched and one-by-one
# runs differ by float32 rounding; the probe is exact for the function the model computes
FLOAT32_PARTS = {
    "axk1": 1e-06,
    "bailing_hybrid": 1e-05,
    "codegen": 1e-05,
    "dots1": 1e-08,
    "falcon_mamba": 1e-07,
    "flint": 1e-05,
    "glm4_moe": 1e-07,
    "gpt_neo": 0.0001,
    "gptj": 1e-06,
    "granite_swa": 1e-06,
    "granitemoe_swa": 1e-06,
    "jamba": 1e-06,
    "lara_mini": 1e-06,
    "mimo_v2_flash": 1e-06,
    "minimax_m3_vl_text": 1e-06,
    "mpt": 1e-05,
    "olmo_hybrid": 1e-08,
    "qwen3_5": 1e-08,
    "qwen3_5_moe": 1e-07,
    "qwen3_5_moe_text": 1e-07,
    "qwen3_5_text": 1e-08,
    "qwen3_next": 1e-08,
    "solar_open": 1e-07,
    "vaultgemma": 1e-08,
}
_PEFT_EXPERTS = ("LoRA on fused MoE experts (PEFT ParamWrapper): the wrapped experts re-run on one row do not "
                 "reproduce it", "does not reproduce its row")
LORA_REFUSED = {name: _PEFT_EXPERTS for name in (
    "afmoe", "cohere2_moe", "deepseek_v2", "dots1", "ernie4_5_moe", "exaone_moe", "flex_olmo", "glm4_moe",
    "glm4_moe_lite", "hunyuan_v1_moe", "mellum", "minimax", "minimax_m2", "mixtral", "olmoe", "qwen3_moe",
    "qwen3_next", "sarvam_mla", "solar_open",
)}
FULL_ONLY = {  # exact on full parameters; LoRA not applicable
    "falcon_mamba": "PEFT refuses LoRA on this architecture's modules",
    "mamba": "PEFT refuses LoRA on this architecture's modules",
    "nemotron_h": "PEFT refuses LoRA on this architecture's modules",
    "phimoe": 'LoRA on its router (a Linear returning a tuple) crashes inside PEFT',
}
_NOT_BATCH = ('a module called on an input that is not an activation of the batch (indexer, position '
              'bias, weight computation)',
              "does not come from the batch's embeddings")
_ROWS_DIFFER = ('MoE experts whose row run alone differs from its row in the batch',
                'does not reproduce its row')
_NO_REPLAY = ('a module that cannot be re-run on one row',
              'cannot be re-run on one row')
_NO_LOOKUP = ('a positional embedding that does not look its weight up with F.embedding',
              'did not call F.embedding')
_UNFOLLOWED = ("the fast probe's hooks do not follow its forward (a raw TypeError inside), refused as such",
               'could not follow')
REFUSED = {  # a GesimError naming the module
    "axk2": _NOT_BATCH,
    "cpmant": _NOT_BATCH,
    "deepseek_v32": _NOT_BATCH,
    "dory": _UNFOLLOWED,
    "glm_moe_dsa": _NOT_BATCH,
    "hrm_text": _NOT_BATCH,
    "hy_v4": _NOT_BATCH,
    "inkling_text": _NOT_BATCH,
    "jetmoe": _NO_REPLAY,
    "llama4": _ROWS_DIFFER,
    "llama4_text": _ROWS_DIFFER,
    "recurrent_gemma": _NO_REPLAY,
    "whisper": _NO_LOOKUP,
    "zaya": _NOT_BATCH,
}
FAILING = {  # open: a raw exception from the probe (the strict test notices a fix)
}
UNBUILT = {
    "bamba": "the tiny float64 model itself fails: RuntimeError: shape '[1, 12, 128,",
    "blt": 'tiny model did not build and run within 60 s',
    "cohere_compass_text": "KeyError: 'full_attention'",
    "dbrx": "AttributeError: 'DbrxAttentionConfig' object has no attribute 'rope_th",
    "deepseek_v4": 'the tiny float64 model itself fails: RuntimeError: The size of tensor ',
    "dots3_note": "AmbiguousGlobalPerLayerAttributeError: 'num_attention_heads' is a per-",
    "dots3_note_text": "AmbiguousGlobalPerLayerAttributeError: 'num_attention_heads' is a per-",
    "falcon_h1": 'tiny model did not build and run within 60 s',
    "gemma3n": 'ImportError: ',
    "gemma3n_text": 'ValueError: The set of layer types producing a cache is different than',
    "gemma4": "AmbiguousGlobalPerLayerAttributeError: 'head_dim' is a per-layer attri",
    "gemma4_assistant": 'StrictDataclassClassValidationError: Class validation error for valida',
    "gemma4_text": "AmbiguousGlobalPerLayerAttributeError: 'head_dim' is a per-layer attri",
    "gemma4_unified": "AmbiguousGlobalPerLayerAttributeError: 'head_dim' is a per-layer attri",
    "gemma4_unified_assistant": "AmbiguousGlobalPerLayerAttributeError: 'head_dim' is a per-layer attri",
    "gemma4_unified_text": "AmbiguousGlobalPerLayerAttributeError: 'head_dim' is a per-layer attri",
    "granitemoehybrid": "the tiny float64 model itself fails: RuntimeError: shape '[1, 12, 128,",
    "inkling2_loop_text": 'the tiny float64 model itself fails: RuntimeError: expected m1 and m2 ',
    "inkling2_text": 'the tiny float64 model itself fails: RuntimeError: expected m1 and m2 ',
    "lfm2_moe": "TypeError: 'NoneType' object is not subscriptable",
    "mamba2": "the tiny float64 model itself fails: RuntimeError: shape '[1, 12, 128,",
    "moss_transcribe_diarize": 'tiny model did not build and run within 60 s',
    "musicgen": "AttributeError: 'MusicgenConfig' object has no attribute 'dropout'",
    "musicgen_melody": "AttributeError: 'MusicgenMelodyConfig' object has no attribute 'dropou",
    "phi4_multimodal": 'tiny model did not build and run within 60 s',
    "prophetnet": 'NotImplementedError: This model does not support the setting of `num_h',
    "qwen4_exp": "TypeError: unsupported operand type(s) for //: 'NoneType' and 'NoneTyp",
    "qwen4_exp_text": "TypeError: unsupported operand type(s) for //: 'NoneType' and 'NoneTyp",
    "reformer": 'ValueError: Make sure that config.axial_pos_embds factors: (64, 192) s',
    "xglm": "float64 eager attention overflows in transformers (checked in float32)",
    "xlnet": 'NotImplementedError: The model xlnet is one of the few models that has',
    "xlstm": 'the tiny float64 model itself fails: RuntimeError: The size of tensor ',
    "xmod": 'the tiny float64 model itself fails: ValueError: Input language unknow',
    "zamba": 'ValueError: There is an issue with your definition of `tie_weights_key',
    "zamba2": "the tiny float64 model itself fails: RuntimeError: shape '[1, 12, 8, 6",
}
# the token Gram's layer-wise fast path (gesim.probe.tokens) runs on these, exact against one backward per
# token (tests/test_probe_tokens_families.py); every other built family is refused with a GesimError naming
# the module without a per-token rule, and ``token_gram``'s "auto" backend then runs the per-token loop
TOKEN_FAST = (
    "arcee", "bitnet", "bloom", "codegen", "ctrl", "cwm", "deepseek_v3", "electra", "emu3", "ernie4_5", "exaone",
    "exaone4", "gemma", "gemma3_text", "glm", "glm4", "gpt-sw3", "gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox",
    "gptj", "granite", "helium", "hunyuan_v1_dense", "hyperclovax", "internlm3", "iquestcoder", "jais2", "lfm2",
    "llama", "minicpm3", "ministral", "ministral3", "mistral", "mllama", "modernbert-decoder", "moshi", "mpt",
    "olmo", "olmo2", "olmo3", "openai-gpt", "persimmon", "phi", "phi3", "qwen2", "qwen3", "rembert", "seed_oss",
    "smollm3", "stablelm", "starcoder2", "xlm", "youtu",
)
TOKEN_FLOAT32 = {"mllama": 1e-6}  # its forward returns float32 logits: the loop's softmax rounds in float32
# the training-pair recorder (StepTelemetry, the trl callback) refuses these by name (parameters used
# functionally: recurrent/convolutional mixers; a module returning a tensor the rules cannot split); on every
# other built family its rows equal per-row autograd (tests/test_telemetry_families.py)
TELEMETRY_REFUSED = (
    "bailing_hybrid", "falcon_mamba", "gpt_neox_japanese", "jamba", "kimi_linear", "lara_mini", "lfm3",
    "longcat_flash", "mamba", "nemotron_h", "olmo_hybrid", "qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text",
    "qwen3_5_text", "qwen3_next",
)
SLOW = ("git", "got_ocr2", "kimi_linear")  # over 20 s each on one CPU: marked slow
FUNC = ("gemma", "gemma2", "gpt2", "llama", "mistral", "opt", "phi3", "qwen3")  # func backend checked too
ALL_LISTS = (EXACT, LORA_REFUSED, FULL_ONLY, REFUSED, FAILING, UNBUILT)


def unchecked() -> list:
    """Families transformers offers that this session's matrix has not classified yet."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - listed())


def listed() -> set:
    return {name for group in ALL_LISTS for name in group}


def built() -> list:
    """The families built tiny and probed here (exact, LoRA refused or full parameters only), sorted."""
    return sorted({*EXACT, *LORA_REFUSED, *FULL_ONLY})


# transformers config attributes shrunk for a tiny instance (when the config has them)
SMALL = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=128, n_embd=32, n_layer=2, n_head=4,
             n_positions=128, n_inner=64, d_model=32, ffn_dim=64, num_layers=2, n_ctx=128, attention_heads=4,
             num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
             shared_expert_intermediate_size=16, n_shared_experts=1, sliding_window=4, word_embed_proj_dim=32,
             kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, qk_head_dim=8,
             decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64, encoder_layers=2,
             encoder_attention_heads=4, encoder_ffn_dim=64, rotary_dim=4, pad_token_id=0, bos_token_id=1,
             eos_token_id=2, n_group=1, topk_group=1)
VOCAB = SMALL["vocab_size"]


def _shrink(cfg) -> None:
    for key, value in SMALL.items():
        if hasattr(cfg, key) and not isinstance(getattr(cfg, key), (list, dict)):
            try:
                setattr(cfg, key, value)
            except (AttributeError, TypeError, ValueError):
                pass
    if hasattr(cfg, "qk_rope_head_dim"):  # multi-head latent attention: as many kv heads as heads
        cfg.head_dim = cfg.qk_rope_head_dim
        if hasattr(cfg, "num_key_value_heads"):
            cfg.num_key_value_heads = cfg.num_attention_heads
    for flag in ("is_decoder", "causal"):  # encoder families as causal LMs (XLM is bidirectional unless causal)
        if hasattr(cfg, flag):
            setattr(cfg, flag, True)
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
    def f32(n):
        return f" (float32 parts: {FLOAT32_PARTS[n]:g})" if n in FLOAT32_PARTS else ""
    rows = [(n, "exact, full and LoRA" + f32(n), "") for n in EXACT]
    rows += [(n, "exact full parameters" + f32(n) + "; LoRA refused", why) for n, (why, _) in LORA_REFUSED.items()]
    rows += [(n, "exact full parameters" + f32(n) + "; LoRA not applicable", why) for n, why in FULL_ONLY.items()]
    rows += [(n, "refused (GesimError)", why) for n, (why, _) in REFUSED.items()]
    rows += [(n, "open failure (raw exception)", why) for n, why in FAILING.items()]
    rows += [(n, "not built tiny here", why) for n, why in UNBUILT.items()]
    lines = ["| family (`model_type`) | probe | reason |", "|---|---|---|"]
    lines += [f"| `{n}` | {s} | {w} |" for n, s, w in sorted(rows)]
    return "\n".join(lines)

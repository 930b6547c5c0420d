"""Tiny offline stand-ins for a real checkpoint and data set (tests, notebook, benchmark).

:func:`save_tiny_model` builds a word-level tokenizer locally and a small Hugging Face causal
LM from a config (GPT-2 with a tied head, or Llama-shaped, tied or untied), and writes both
with ``save_pretrained``; nothing is downloaded. :func:`write_toy_pairs` writes a JSONL of
prompt / chosen / rejected strings over the same vocabulary, chosen and rejected sharing a
prefix (the entangled case of docs/theory.md section 4).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = tuple(f"w{k}" for k in range(40)) + ("the", "a", "good", "bad", "answer", "question", "is", "not")


def build_tokenizer():
    """A word-level PreTrainedTokenizerFast over :data:`WORDS` (+ [PAD], [UNK], [EOS])."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: k + 3 for k, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def build_model(arch: str = "gpt2", vocab_size: int = 51, d: int = 32, layers: int = 2, heads: int = 2,
                tied: bool = True, seed: int = 0, positions: int = 128):
    """A random-init HF causal LM from a config: ``arch`` 'gpt2', 'llama' or 'opt' (OPT: learned positions
    offset by 2, biased attention projections, its head always tied)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_positions=positions, n_embd=d, n_layer=layers, n_head=heads,
                         bos_token_id=2, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tied)
        return GPT2LMHeadModel(cfg).eval()
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                          max_position_embeddings=positions, tie_word_embeddings=tied,
                          bos_token_id=2, eos_token_id=2, pad_token_id=0)
        return LlamaForCausalLM(cfg).eval()
    if arch == "opt":
        cfg = OPTConfig(vocab_size=vocab_size, hidden_size=d, ffn_dim=2 * d, num_hidden_layers=layers,
                        num_attention_heads=heads, max_position_embeddings=positions, word_embed_proj_dim=d,
                        bos_token_id=2, eos_token_id=2, pad_token_id=0, dropout=0.0, attention_dropout=0.0)
        return OPTForCausalLM(cfg).eval()
    from gesim.errors import unknown
    raise unknown("toy architecture", arch, ("gpt2", "llama", "opt"))


def save_tiny_model(directory, arch: str = "gpt2", **kwargs) -> Path:
    """Write a tiny model and its tokenizer to ``directory`` (``save_pretrained``); returns it."""
    directory = Path(directory)
    tok = build_tokenizer()
    model = build_model(arch, vocab_size=len(tok), **kwargs)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def toy_rows(n: int, seed: int = 0, prompt_len=(2, 6), response_len=(2, 10), shared=0.5) -> list[dict]:
    """n rows of prompt / chosen / rejected strings; rejected shares about ``shared`` of chosen."""
    rng = random.Random(seed)
    words = lambda k: [rng.choice(WORDS) for _ in range(k)]  # noqa: E731
    rows = []
    for _ in range(n):
        chosen = words(rng.randint(*response_len))
        keep = int(len(chosen) * shared)
        rejected = chosen[:keep] + words(max(1, rng.randint(*response_len) - keep))
        # responses open with a space, as trl expects: trl joins prompt + response as strings, so
        # without it the prompt's last word and the response's first would merge into one token
        rows.append({"prompt": " ".join(words(rng.randint(*prompt_len))), "chosen": " " + " ".join(chosen),
                     "rejected": " " + " ".join(rejected)})
    return rows


def write_toy_pairs(path, n: int = 16, seed: int = 0, **kwargs) -> Path:
    """Write :func:`toy_rows` as JSONL to ``path``; returns it."""
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in toy_rows(n, seed, **kwargs)), encoding="utf-8")
    return path

"""gesim's pair encoding gives, bit for bit, the token ids trl 1.16's DPO data path produces
(``DPOTrainer._prepare_dataset``, trl's own code as the oracle) for standard, conversational
and implicit-prompt rows, on BPE tokenizers built locally: ChatML, a BOS-adding template and
a "thinking" template whose prompt rendering is not a prefix of the full conversation."""

import pytest

pytest.importorskip("trl")

from gesim.encode import encode_rows, trl_token_ids  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
BOS = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% if m['role'] == 'assistant' %}"
       "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
THINK = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}")
TEXT = ["the sky is blue today and the sea is green", "what color is the sky? it is blue.",
        "where is the sun? in the sky, not in the sea.", "a good answer is not a bad answer"] * 20


def _tokenizer(template, bos_post=False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    if bos_post:  # the tokenizer itself adds BOS on plain calls (Llama-style)
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = template
    return fast


def _trl_ids(tok, rows):
    import datasets
    from trl import DPOConfig, DPOTrainer

    class Stub:
        _tokenizer = tok

    args = DPOConfig(output_dir="/tmp/unused", max_length=None, report_to=[], use_cpu=True)
    ds = DPOTrainer._prepare_dataset(Stub(), datasets.Dataset.from_list(rows), tok, args, "train")
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in ds]


def _conv(q, a, b):
    return {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
            "rejected": [{"role": "assistant", "content": b}]}


STANDARD = [{"prompt": "what color is the sky?", "chosen": " it is blue.", "rejected": " it is green."},
            {"prompt": "where is the sun? ", "chosen": "in the sky.", "rejected": "in the sea."}]  # ends in a space
CONV = [_conv("what color is the sky?", "it is blue.", "it is green."),
        _conv("where is the sun?", "in the sky, not in the sea.", "in the sea.")]
IMPLICIT = [{"chosen": [m for m in c["prompt"] + c["chosen"]], "rejected": [m for m in c["prompt"] + c["rejected"]]}
            for c in CONV]
IMPLICIT_TEXT = [{"chosen": "the sky is blue today", "rejected": "the sky is green today"}]


@pytest.mark.parametrize("template,bos_post", [(CHATML, False), (BOS, True), (THINK, False)],
                         ids=["chatml", "bos", "thinking"])
@pytest.mark.parametrize("rows", [STANDARD, CONV, IMPLICIT, IMPLICIT_TEXT], ids=["standard", "conversational",
                                                                                  "implicit", "implicit_text"])
def test_token_ids_equal_trls_own_dpo_data_path(template, bos_post, rows):
    tok = _tokenizer(template, bos_post)
    want = _trl_ids(tok, [dict(r) for r in rows])
    got = [trl_token_ids(tok, r)[:3] for r in rows]
    assert got == [tuple(list(x) for x in w) for w in want]
    enc = encode_rows([dict(r, index=i) for i, r in enumerate(rows)], tok, 512)
    assert [(p.prompt, p.chosen, p.rejected) for p in enc.pairs] == [tuple(list(x) for x in w) for w in want]


def test_thinking_template_rows_are_counted_not_fatal():
    tok = _tokenizer(THINK)
    enc = encode_rows([dict(r, index=i) for i, r in enumerate(CONV)], tok, 512)
    assert enc.prefix_cut == len(CONV) and len(enc.pairs) == len(CONV)


def test_bos_template_has_one_bos():
    tok = _tokenizer(BOS, bos_post=True)
    p, c, r, _ = trl_token_ids(tok, CONV[0])
    assert p.count(tok.bos_token_id) == 1 and tok.eos_token_id not in c[:-1]

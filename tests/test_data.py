"""Reading and validating preference data; tokenising it into pairs."""

import json

import pytest

from gesim import GesimError, data
from gesim.encode import collate, encode_rows
from gesim.probe import toy

GOOD = {"prompt": "the question", "chosen": "good answer", "rejected": "bad answer"}


def _jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("row,reason", [
    ({"prompt": "a", "chosen": "b"}, "missing field rejected"),
    ({"rejected": "c"}, "missing field chosen"),
    ({"prompt": "a", "chosen": " ", "rejected": "c"}, "empty chosen response"),
    ({"prompt": "a", "chosen": "b", "rejected": 3}, "non-string content in rejected"),
    ({"prompt": "a"}, "prompt-only row"),
    ({"prompt": "a", "chosen": "b", "rejected": [{"role": "assistant", "content": "c"}]},
     "mixes strings and message lists"),
    ([1, 2], "not an object"),
])
def test_bad_rows_are_counted_by_reason(tmp_path, row, reason):
    out = data.read_pairs(_jsonl(tmp_path, [GOOD, row, GOOD]))
    assert out.n_read == 3 and len(out.rows) == 2 and out.skipped == {reason: 1}
    assert [r["index"] for r in out.rows] == [0, 2]


def test_no_usable_row_is_an_error(tmp_path):
    with pytest.raises(GesimError, match=r"no usable preference row \(1 prompt-only row\)"):
        data.read_pairs(_jsonl(tmp_path, [{"prompt": "a"}]))


def test_unreadable_files(tmp_path):
    with pytest.raises(GesimError, match="data file not found"):
        data.read_pairs(tmp_path / "none.jsonl")
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(b'{"prompt": "\xff\xfe"}\n')
    with pytest.raises(GesimError, match="not UTF-8 text .*cannot decode"):
        data.read_pairs(bad)
    broken = tmp_path / "c.jsonl"
    broken.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(GesimError, match=r"c.jsonl:2: invalid JSON"):
        data.read_pairs(broken)
    with pytest.raises(GesimError, match="unknown data format '.csv'"):
        data.read_pairs(_jsonl(tmp_path, [GOOD], "d.csv"))
    obj = tmp_path / "o.json"
    obj.write_text(json.dumps(GOOD))
    with pytest.raises(GesimError, match="must hold a list of rows"):
        data.read_pairs(obj)


def test_all_formats_give_the_same_rows(tmp_path):
    import datasets
    rows = toy.toy_rows(5)
    jsonl = data.read_pairs(_jsonl(tmp_path, rows)).rows
    (tmp_path / "d.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for path in ("d.json", "d.parquet", "saved"):
        assert data.read_pairs(tmp_path / path).rows == jsonl


def test_truncation_is_counted_and_respects_max_length():
    rows = [dict(GOOD, index=0), dict(GOOD, chosen="good " * 30, index=1), dict(GOOD, prompt="a " * 40, index=2)]
    enc = encode_rows(rows, toy.build_tokenizer(), max_length=12)
    assert enc.truncated == 1 and dict(enc.skipped) == {"prompt longer than max_length": 1}
    assert [p.index for p in enc.pairs] == [0, 1]
    assert all(len(p.prompt) + len(p.chosen) <= 12 for p in enc.pairs)


def test_masks_cover_response_tokens_only():
    enc = encode_rows([dict(GOOD, index=0)], toy.build_tokenizer(), 32)
    b = collate(enc.pairs)
    pair = enc.pairs[0]
    assert int(b.chosen_mask.sum()) == len(pair.chosen) == 3  # "good answer" + EOS
    assert b.chosen_mask[0, :len(pair.prompt)].sum() == 0
    assert b.chosen_ids[0, len(pair.prompt):].tolist() == pair.chosen


def test_tokenizer_without_pad_token_falls_back_to_eos_and_says_so():
    tok = toy.build_tokenizer()
    tok.pad_token = None
    enc = encode_rows([dict(GOOD, index=0)], tok, 32)
    assert enc.pad_id == tok.eos_token_id and "no pad token" in enc.pad_note


def test_conversational_rows_need_and_use_a_chat_template(tmp_path):
    conv = {"prompt": [{"role": "user", "content": "the question"}],
            "chosen": [{"role": "assistant", "content": "good answer"}],
            "rejected": [{"role": "assistant", "content": "bad answer"}]}
    rows = data.read_pairs(_jsonl(tmp_path, [conv])).rows
    tok = toy.build_tokenizer()
    with pytest.raises(GesimError, match="need a tokenizer with a chat template"):
        encode_rows(rows, tok, 32)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    pair = encode_rows(rows, tok, 32).pairs[0]
    assert tok.decode(pair.chosen) == "good answer"  # as trl: the template's own turn end, no EOS added

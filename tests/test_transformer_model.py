"""The small GPT against a plain reference loop, and the data generator's structures."""

import math

import pytest
import torch

from gesim import lm
from gesim.errors import GesimError
from gesim.transformer import GPT, GPTConfig, data

CFG = GPTConfig(vocab_size=len(data.Language()), block_size=32, n_layer=2, n_head=2, n_embd=16)


def plain_forward(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """The same network written out token by token: explicit causal attention per position."""
    B, T = ids.shape
    C, h = model.config.n_embd, model.config.n_head
    x = model.wte.weight[ids] + model.wpe.weight[:T][None]
    for blk in model.blocks:
        a = torch.nn.functional.layer_norm(x, (C,), blk.ln_1.weight, blk.ln_1.bias)
        qkv = a @ blk.attn.c_attn.weight.T + blk.attn.c_attn.bias
        q, k, v = qkv.split(C, dim=2)
        out = torch.zeros_like(x)
        for b in range(B):
            for t in range(T):
                for head in range(h):
                    sl = slice(head * C // h, (head + 1) * C // h)
                    scores = torch.stack([q[b, t, sl] @ k[b, s, sl] for s in range(t + 1)]) / math.sqrt(C // h)
                    w = torch.softmax(scores, dim=0)
                    out[b, t, sl] = sum(w[s] * v[b, s, sl] for s in range(t + 1))
        x = x + out @ blk.attn.c_proj.weight.T + blk.attn.c_proj.bias
        m = torch.nn.functional.layer_norm(x, (C,), blk.ln_2.weight, blk.ln_2.bias)
        m = torch.nn.functional.gelu(m @ blk.mlp.c_fc.weight.T + blk.mlp.c_fc.bias)
        x = x + m @ blk.mlp.c_proj.weight.T + blk.mlp.c_proj.bias
    x = torch.nn.functional.layer_norm(x, (C,), model.ln_f.weight, model.ln_f.bias)
    return x @ model.wte.weight.T


def test_forward_matches_the_plain_reference_loop():
    torch.manual_seed(0)
    model = GPT(CFG).double()
    for p in model.parameters():  # move away from the tiny init so every term matters
        p.data.normal_(0, 0.3)
    ids = torch.randint(0, CFG.vocab_size, (2, 7))
    torch.testing.assert_close(model(ids), plain_forward(model, ids), rtol=1e-10, atol=1e-10)


def test_per_token_logps_match_a_loop_over_prefixes():
    torch.manual_seed(1)
    model = GPT(CFG).double()
    ids = torch.randint(0, CFG.vocab_size, (1, 9))
    full = lm.token_logps(model(ids), ids)[0]
    for t in range(1, 9):
        logits = model(ids[:, :t])[0, -1]  # causal: the prefix alone predicts token t
        assert float(full[t]) == pytest.approx(float(torch.log_softmax(logits, -1)[ids[0, t]]), abs=1e-12)


def test_head_is_tied_to_the_token_embedding_and_lengths_are_checked():
    model = GPT(CFG)
    assert model.lm_head.weight is model.wte.weight
    assert GPT(GPTConfig(**{**CFG.__dict__, "tie_weights": False})).lm_head.weight is not None
    with pytest.raises(GesimError, match="block_size"):
        model(torch.zeros(1, CFG.block_size + 1, dtype=torch.long))


@pytest.mark.parametrize("structure", data.STRUCTURES)
def test_pair_structures(structure):
    ps = data.pairs(structure, 20, seed=3)
    for w, r in zip(ps.chosen, ps.rejected):
        if structure == "unequal":  # three extra tokens before the rejected <eos>
            assert len(r) == len(w) + 3 and r[-1] == w[-1]
            r = r[: len(w) - 1] + r[-1:]
        differ = [i for i, (a, b) in enumerate(zip(w, r)) if a != b]
        assert len(differ) == 1 and {w[differ[0]], r[differ[0]]} == {"positive", "negative"}
        i = differ[0]
        assert len(w) == len(r) and w[i + 1:] == r[i + 1:]  # the suffix is shared verbatim
        expected = {"1t": 0, "short-suffix": 5, "long-suffix": 27, "mid": 5, "unequal": 5}[structure]
        assert len(w) - i - 2 == expected  # label, suffix, <eos>
    b = ps.batch
    lang = data.Language()
    for row, (ids, mask) in enumerate(zip(b.chosen_ids, b.chosen_mask)):
        assert lang.decode(ids[mask.bool()]) == ps.chosen[row]  # the mask covers the response exactly


def test_pairs_are_deterministic_and_seeds_differ():
    a, b, c = data.pairs("long-suffix", 8, 5), data.pairs("long-suffix", 8, 5), data.pairs("long-suffix", 8, 6)
    assert torch.equal(a.batch.chosen_ids, b.batch.chosen_ids) and a.chosen == b.chosen
    assert a.chosen != c.chosen


def test_labels_follow_the_majority_sentiment():
    lang = data.Language()
    ps = data.pairs("1t", 50, 0, lang)
    for row, label in zip(ps.batch.chosen_ids, ps.chosen):
        words = lang.decode(row)
        pos = sum(w in data.POSITIVE for w in words)
        neg = sum(w in data.NEGATIVE for w in words)
        assert label[0] == ("positive" if pos > neg else "negative")


def test_sft_label_noise_and_errors():
    ids, mask = data.sft_sequences("short-suffix", 400, 0, label_noise=0.2)
    clean, _ = data.sft_sequences("short-suffix", 400, 0, label_noise=0.0)
    flipped = (ids != clean).any(dim=1).float().mean()
    assert 0.15 < float(flipped) < 0.25
    with pytest.raises(GesimError, match="label_noise"):
        data.sft_sequences("1t", 4, 0, label_noise=0.6)
    with pytest.raises(GesimError, match="unknown pair structure"):
        data.pairs("2t", 4, 0)


def test_one_pair_type_pads_takes_and_moves():
    """lm.PairBatch is the one pair type: from_rows pads by hand's rule, take(rows) selects the
    same pairs from every tensor, to() turns the synthetic pairs' numpy arrays into tensors."""
    import numpy as np

    from gesim.lm import PairBatch
    from gesim.policies import pairs as P

    b = PairBatch.from_rows([[5, 6, 7], [5, 8]], [[5, 9], [4, 4, 4, 4]], [1, 2], pad_id=0)
    assert b.chosen_ids.tolist() == [[5, 6, 7], [5, 8, 0]] and b.chosen_mask.tolist() == [[0, 1, 1], [0, 0, 0]]
    assert b.rejected_ids.tolist() == [[5, 9, 0, 0], [4, 4, 4, 4]]
    assert b.rejected_mask.tolist() == [[0, 1, 0, 0], [0, 0, 1, 1]]
    one = b.take(torch.tensor([1]))
    assert all(torch.equal(t, u[1:]) for t, u in zip(one.tensors(), b.tensors()))
    syn = P.blocks(np.random.default_rng(0), 4, 7, differ=1, suffix=2)
    moved = syn.take([0, 2]).to("cpu")
    assert isinstance(moved.chosen_ids, torch.Tensor) and moved.chosen_ids.tolist() == syn.chosen_ids[[0, 2]].tolist()
    assert (P.distance(syn) == 1).all() and (syn.len_w == 3).all()

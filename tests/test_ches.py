"""CHES and length-normalised CHES as Razin et al. (ICLR 2025, eqs. 4-5) define them, checked in
float64 against an independent implementation: one unpadded forward per response through
Hugging Face's ``output_hidden_states``, the authors' formulas written out with numpy."""

import numpy as np
import torch

from gesim import probe
from gesim.encode import collate, encode_rows
from gesim.probe import toy


def _setup(n=5, seed=3):
    tok = toy.build_tokenizer()
    rows = [dict(r, index=i) for i, r in enumerate(toy.toy_rows(n, seed))]
    batch = collate(encode_rows(rows, tok, 64).pairs)
    torch.manual_seed(seed)
    model = toy.build_model("gpt2", vocab_size=len(tok), d=16).double().eval()
    return model, batch


def authors_vectors(model, ids_row, mask_row):
    """Last-layer hidden states (numpy) at the positions predicting the response tokens of one
    unpadded sequence: the sum and the mean over the response."""
    last = int(mask_row.nonzero().max()) + 1
    ids = ids_row[:last][None]
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].numpy()
    resp = mask_row[:last].numpy().astype(bool)
    pos = np.flatnonzero(resp) - 1  # position t - 1 predicts token t
    h = hidden[pos]
    return h.sum(0), h.mean(0)


def test_ln_ches_is_the_authors_length_normalised_ches_to_1e_10():
    model, batch = _setup()
    out = probe.ches(model, batch)
    for i in range(len(batch)):
        s_w, m_w = authors_vectors(model, batch.chosen_ids[i], batch.chosen_mask[i])
        s_l, m_l = authors_vectors(model, batch.rejected_ids[i], batch.rejected_mask[i])
        ches = float(np.dot(s_w, s_l) - np.dot(s_w, s_w))
        ln_ches = float(np.dot(m_w, m_l) - np.dot(m_w, m_w))
        dist2 = float(np.sum((m_w - m_l) ** 2))
        assert abs(float(out["ches"][i]) - ches) <= 1e-10 * max(1.0, abs(ches))
        assert abs(float(out["ln_ches"][i]) - ln_ches) <= 1e-10 * max(1.0, abs(ln_ches))
        assert abs(float(out["mean_dist2"][i]) - dist2) <= 1e-10 * max(1.0, dist2)


def test_ln_ches_and_mean_dist2_are_different_quantities():
    """ln_ches rises as the rejected response's mean hidden state approaches the chosen one's;
    mean_dist2 falls: identical responses give ln_ches = 0 and mean_dist2 = 0, and the identity
    mean_dist2 = ||m_l||^2 - ||m_w||^2 - 2 ln_ches links them."""
    model, batch = _setup()
    same = type(batch)(batch.chosen_ids, batch.chosen_ids, batch.chosen_mask, batch.chosen_mask)
    out_same = probe.ches(model, same)
    assert torch.allclose(out_same["ln_ches"], torch.zeros(len(batch), dtype=torch.float64), atol=1e-12)
    assert torch.allclose(out_same["mean_dist2"], torch.zeros(len(batch), dtype=torch.float64), atol=1e-12)
    out = probe.ches(model, batch)
    for i in range(len(batch)):
        _, m_w = authors_vectors(model, batch.chosen_ids[i], batch.chosen_mask[i])
        _, m_l = authors_vectors(model, batch.rejected_ids[i], batch.rejected_mask[i])
        ident = m_l @ m_l - m_w @ m_w - 2 * float(out["ln_ches"][i])
        assert abs(float(out["mean_dist2"][i]) - ident) <= 1e-10 * max(1.0, abs(ident))

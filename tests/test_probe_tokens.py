"""The fast token Gram (gesim.probe.tokens) against the per-token loop (one backward per
token, gesim.probe.reference) in float64 to 1e-10: HF GPT-2 (tied and untied), Llama, gesim's
own GPT; both exact forms of the per-layer products; the LM head's closed form alone, in
vocabulary chunks; refusals."""

import dataclasses

import pytest
import torch

from gesim import GesimError, probe
from gesim.probe import lmhead, tokens, toy
from gesim.probe.reference import reference_token_gram

RTOL = 1e-10


def _rows(V, N=3, T=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (N, T), generator=g)
    mask = torch.zeros_like(ids)
    mask[:, T // 3:] = 1
    mask[1, T - 4:] = 0  # a shorter row (right padding)
    return ids, mask


def _gap(model, ids, mask, params="all"):
    K, index = tokens.fast_token_gram(model, ids, mask, params)
    R, ref_index = reference_token_gram(model, ids, mask, params)
    assert index == ref_index and K.shape == R.shape
    return float((K - R).abs().max() / R.abs().max())


def _own_gpt(tied):
    model_mod = pytest.importorskip("gesim.transformer.model")
    names = {f.name for f in dataclasses.fields(model_mod.GPTConfig)}
    want = dict(vocab_size=51, block_size=64, n_layer=2, n_head=2, n_embd=16, dropout=0.0, tie_weights=tied)
    return model_mod.GPT(model_mod.GPTConfig(**{k: v for k, v in want.items() if k in names})).double().eval()


@pytest.mark.parametrize("arch,tied", [("gpt2", True), ("gpt2", False), ("llama", True), ("llama", False)])
def test_token_gram_matches_per_token_loop_fp64(arch, tied):
    m = toy.build_model(arch, vocab_size=60, d=16, tied=tied).double()
    assert _gap(m, *_rows(60)) < RTOL


@pytest.mark.parametrize("tied", [True, False])
def test_token_gram_own_gpt_matches_per_token_loop_fp64(tied):
    assert _gap(_own_gpt(tied), *_rows(51, N=2)) < RTOL


@pytest.mark.parametrize("form,cap", [("ghost", 100), ("materialise", 100), ("materialise", tokens.MAT_CAP)])
def test_both_exact_forms_of_the_layer_products_match_the_loop(monkeypatch, form, cap):
    """The cost rule only chooses between two exact forms: force each one; materialised with the d_out
    split (from (M, T, d_out) buffers) and in one piece (streamed per token as the backward runs)."""
    other = "materialise" if form == "ghost" else "ghost"
    monkeypatch.setattr(tokens, "linear_gram_flops", lambda *a: {form: 0, other: 1})
    monkeypatch.setattr(tokens, "MAT_CAP", cap)  # 100: materialised layers split over d_out
    m = toy.build_model("gpt2", vocab_size=60, d=16, tied=True).double()
    assert _gap(m, *_rows(60)) < RTOL


@pytest.mark.parametrize("form", ["ghost", "materialise"])
@pytest.mark.parametrize("step", [1, 2, None])
def test_batched_backward_in_chunks_matches_the_loop(monkeypatch, form, step):
    """The per-token backwards run ``step`` tokens at a time as one vmapped backward (None: as many as
    BWD_CAP allows, here a whole row; 1: plain backwards); chunks of 2 split rows of 13 and 9 tokens, and
    streamed (materialised) layers take each chunk as it comes: all exact against the loop."""
    other = "materialise" if form == "ghost" else "ghost"
    monkeypatch.setattr(tokens, "linear_gram_flops", lambda *a: {form: 0, other: 1})
    if step is not None:
        monkeypatch.setattr(tokens, "backward_step", lambda n, per_token: min(n, step))
    for arch, tied in (("gpt2", True), ("llama", False)):
        m = toy.build_model(arch, vocab_size=60, d=16, tied=tied).double()
        assert _gap(m, *_rows(60)) < RTOL


class _NumpyTanh(torch.autograd.Function):
    """tanh with a backward through numpy: vmap cannot batch it."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return torch.from_numpy(g.detach().numpy() * (1 - y.detach().numpy() ** 2))


def test_a_backward_vmap_cannot_batch_falls_back_to_one_backward_per_token(monkeypatch):
    m = toy.build_model("gpt2", vocab_size=60, d=16, tied=True).double()
    for block in m.transformer.h:
        block.mlp.act = type("NumpyAct", (torch.nn.Module,), {"forward": lambda self, x: _NumpyTanh.apply(x)})()
    calls = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: (calls.append(k.get("is_grads_batched", False)),
                                                                 real(*a, **k))[1])
    ids, mask = _rows(60)
    assert _gap(m, ids, mask) < RTOL
    n_tokens = int(mask[:, 1:].sum())
    assert calls[0] is True and calls[1:1 + n_tokens] == [False] * n_tokens  # refused once, then per token


@pytest.mark.parametrize("select", ["bias", "weight"])
def test_ghost_layers_with_only_biases_or_only_weights_selected(monkeypatch, select):
    """Ghost products fold a selected bias into C = A A^T + 1; with the weight alone, or the bias alone
    (then a vector parameter), the blocks still match the loop."""
    monkeypatch.setattr(tokens, "linear_gram_flops", lambda *a: {"ghost": 0, "materialise": 1})
    m = toy.build_model("gpt2", vocab_size=60, d=16, tied=False).double()
    assert _gap(m, *_rows(60), params=lambda n, p: n.endswith(select) and ("c_" in n)) < RTOL


@pytest.mark.parametrize("M,rows", [(1, 1), (2, 4), (3, 4), (5, 8), (8, 8)])
def test_check_row_pads_the_heads_gemm_to_a_multiple_of_4_rows(M, rows):
    """The model's own head runs on the first m0 = M tokens padded to a multiple of 4 rows (1 stays 1;
    MKL's remainder rows cost a matrix-vector product each); the padding's logits are dropped: exact."""
    m = toy.build_model("gpt2", vocab_size=60, d=16, tied=True).double()
    ids = torch.randint(3, 60, (1, 20), generator=torch.Generator().manual_seed(M))
    mask = torch.zeros_like(ids)
    mask[0, 20 - M:] = 1
    seen = []
    handle = m.get_output_embeddings().register_forward_hook(lambda mod, a, out: seen.append(tuple(out.shape)))
    try:
        K, _ = tokens.fast_token_gram(m, ids, mask)
    finally:
        handle.remove()
    assert seen == [(1, rows, 60)]
    R, _ = reference_token_gram(m, ids, mask)
    assert float((K - R).abs().max() / R.abs().max()) < RTOL


def test_cost_rule_counts_all_pairs_of_the_full_gram():
    """Ghost is cheaper exactly when T < d_in (module docstring): both counts scale with M^2."""
    for T, d_in, d_out in [(48, 128, 512), (48, 512, 128), (256, 128, 512), (32, 16, 64)]:
        c = tokens.linear_gram_flops(64, 1, T, d_in, d_out)
        assert (c["ghost"] < c["materialise"]) == (T < d_in)


@pytest.mark.parametrize("chunk", [lmhead.CHUNK, 7])
def test_head_block_closed_form_matches_the_loop_in_vocabulary_chunks(monkeypatch, chunk):
    """The LM head alone (untied): (h_a . h_b)(1[y_a=y_b] - p_a[y_b] - p_b[y_a] + <p_a, p_b>),
    with the online softmax over chunks of a few vocabulary columns."""
    monkeypatch.setattr(lmhead, "CHUNK", chunk)
    m = toy.build_model("gpt2", vocab_size=300, d=16, tied=False).double()
    head = m.get_output_embeddings().weight
    assert _gap(m, *_rows(300), params=lambda n, p: p is head) < RTOL
    assert _gap(m, *_rows(300)) < RTOL


def test_head_closed_form_by_hand():
    """Independent of the loop: the formula from one full softmax equals (e - p)(e - p)^T h h^T."""
    g = torch.Generator().manual_seed(3)
    H = torch.randn(5, 4, generator=g, dtype=torch.float64)
    W = torch.randn(9, 4, generator=g, dtype=torch.float64)
    y, U = torch.tensor([1, 3, 1, 8, 0]), torch.tensor([0, 2, 3])
    lse, qW, QQ, qU = lmhead.head_pass(H, W, None, y, U)
    q = torch.nn.functional.one_hot(y, 9).double() - torch.softmax(H @ W.T, -1)
    G = torch.stack([torch.outer(q[k], H[k]) for k in range(5)])
    want = torch.einsum("kvd,lvd->kl", G, G)
    assert torch.allclose((H @ H.T) * QQ, want, rtol=1e-12, atol=1e-14)
    assert torch.allclose(qW, q @ W, rtol=1e-12) and torch.allclose(lse, torch.logsumexp(H @ W.T, -1))
    assert torch.allclose(qU, q[:, U], rtol=1e-12)


@pytest.mark.parametrize("m0", [1, 3, 5])
@pytest.mark.parametrize("chunk", [lmhead.CHUNK, 7])
@pytest.mark.parametrize("touch", [lmhead.TOUCH, 2])
def test_head_pass_on_the_models_own_logits_equals_recomputing_them(monkeypatch, m0, chunk, touch):
    """The check forward's logits of the first m0 tokens (Z0, bias included) replace the head pass's
    own GEMM for those tokens: same result, with and without bias, in one chunk or many; with all
    tokens' logits given (m0 = 5) the cotangent runs over sub-chunks of ``touch`` rows read first."""
    monkeypatch.setattr(lmhead, "CHUNK", chunk)
    monkeypatch.setattr(lmhead, "TOUCH", touch)
    g = torch.Generator().manual_seed(4)
    H = torch.randn(5, 4, generator=g, dtype=torch.float64)
    W = torch.randn(9, 4, generator=g, dtype=torch.float64)
    y, U = torch.tensor([1, 3, 1, 8, 0]), torch.tensor([0, 2, 3])
    for b in (None, torch.randn(9, generator=g, dtype=torch.float64)):
        Z0 = torch.nn.functional.linear(H[:m0], W, b)
        for need_pw in (True, False):
            want = lmhead.head_pass(H, W, b, y, U, need_pw=need_pw)
            got = lmhead.head_pass(H, W, b, y, U, need_pw=need_pw, Z0=Z0)
            for w, x in zip(want, got):
                assert torch.allclose(w, x, rtol=1e-12, atol=1e-14)


def test_api_token_gram_uses_the_fast_path_and_refuses_a_post_processed_head():
    m = toy.build_model("gpt2", vocab_size=60, d=16, tied=True).double()
    ids, mask = _rows(60)
    fast = probe.token_gram(m, ids, mask, backend="fast")
    ref = probe.token_gram(m, ids, mask, backend="reference")
    assert float((fast.K - ref.K).abs().max() / ref.K.abs().max()) < RTOL
    handle = m.get_output_embeddings().register_forward_hook(lambda mod, a, out: 3.0 * torch.tanh(out / 3.0))
    try:
        with pytest.raises(GesimError, match="head"):
            probe.token_gram(m, ids, mask, backend="fast")
        auto = probe.token_gram(m, ids, mask)  # falls back to the exact per-token loop
        ref = probe.token_gram(m, ids, mask, backend="reference")
        assert torch.equal(auto.K, ref.K)
    finally:
        handle.remove()


def test_bench_quick_token_part_is_gated_and_counts_its_floor(tmp_path):
    """Smoke run of bench/probe.py --quick --only tokens: parity gate, loop and floor ratios, FLOP counts."""
    import importlib.util
    import json
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / "probe.py"
    spec = importlib.util.spec_from_file_location("bench_probe", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "p.json"
    assert bench.main(["--quick", "--only", "tokens", "--token-reps", "1", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["token_gram"]["rows"][0]
    for part in ("all_params", "head_block"):
        assert row[part]["parity_1e-10"] and row[part]["rel_error_vs_loop"] < RTOL
        assert row[part]["loop_over_fast"] > 0
    counts = row["all_params"]["counted_flops"]
    assert counts["products"] > 0 and counts["head"] > 0 and row["all_params"]["fast_over_floor"] > 0
    for part in ("all_params", "head_block"):  # the head's thin GEMMs at their best measured shape rate
        rates = row[part]["head_gemm_rates"]
        assert rates["logits"]["flop_per_s"] == max(rates["logits"]["tried"].values()) > 0
        assert rates["cotangent"]["flop_per_s"] == max(rates["cotangent"]["tried"].values()) > 0
    assert row["all_params"]["floor_head_at_shape_rates_cpu_s"] > row["all_params"]["sequential_part_cpu_s"]
    a = row["all_params"]  # the sequential part: the faster of per-token and batched backwards; the old floor kept
    assert a["sequential_part_cpu_s"] == min(a["sequential_part_per_token_cpu_s"], a["sequential_part_batched_cpu_s"])
    assert a["floor_cpu_s"] <= a["floor_per_token_backward_cpu_s"] and a["backward_tokens_per_batch"] > 1
    assert row["head_block"]["bound_cpu_s"] > row["head_block"]["forward_to_head_cpu_s"] > 0


@pytest.mark.parametrize("bad", ["5x", "512x32,x8", "512x4"])
def test_bench_token_settings_refuses_bad_input_with_exit_2(bad, capsys):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / "probe.py"
    spec = importlib.util.spec_from_file_location("bench_probe", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--only", "tokens", "--token-settings", bad, "--out", "/nonexistent/never-written.json"])
    assert exc.value.code == 2 and "--token-settings" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_subset_and_a_row_without_response_tokens(arch):
    """params='lora' on a PEFT model (LoRA factors are Linear uses; the frozen head only routes the
    cotangent), and a middle row whose mask selects nothing (no block, no forward)."""
    peft = pytest.importorskip("peft")
    m = toy.build_model(arch, vocab_size=60, d=16, tied=True).double()
    ids, mask = _rows(60)
    mask[1] = 0
    assert _gap(m, ids, mask) < RTOL
    targets = ["c_attn", "c_fc"] if arch == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    pm = peft.get_peft_model(m, peft.LoraConfig(r=2, target_modules=targets, lora_dropout=0.0,
                                                fan_in_fan_out=arch == "gpt2", init_lora_weights=False))
    assert _gap(pm, ids, mask, "lora") < RTOL


def test_token_gram_of_a_confident_model_in_float32_is_exact_to_rounding():
    """Where p_k[y_k] is near 1 the head's factor 1 - p_k[y_l] - p_l[y_k] + <p_k, p_l> and the
    cotangent W_y - p @ W cancel catastrophically in float32 (found on an SFT model: token
    cosines off by 2e-3; here 0.34 before the fix); the fast path sums q = e_y - p, with
    1 - p_k[y_k] as the sum of the other probabilities. Truth: the per-token loop in float64
    (the loop in float32 is off by about 3e-5 here)."""
    torch.manual_seed(0)
    m = _own_gpt(True).float()
    with torch.no_grad():
        m.ln_f.weight.mul_(50.0)  # peaked softmax: a confident model
    ids = torch.randint(3, 51, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # greedy continuation from position 8: every response token is the argmax
        for t in range(8, 24):
            ids[:, t] = m(ids[:, :t])[:, -1].argmax(-1)
        p_y = torch.softmax(m(ids)[:, 7:-1], -1).gather(-1, ids[:, 8:, None])
    assert float(p_y.median()) > 0.95  # the case the test is about
    mask = torch.zeros_like(ids)
    mask[:, 8:] = 1
    truth = probe.token_gram(m.double(), ids, mask, backend="reference").cos()
    fast = probe.token_gram(m.float(), ids, mask, backend="fast").cos().double()
    assert float((fast - truth).abs().max()) < 2e-6

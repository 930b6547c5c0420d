"""Reproducible under a seed (issue 11): the same seed gives the same numbers whatever the
thread count and whatever ran before in the process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gesim.transformer import model as gm
from gesim.transformer import train
from gesim.transformer.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(n_embd=24, sft_steps=60, n_train=96, n_eval=6, batch=16, pref_steps=6, eval_every=5, lr=1e-4)

SCRIPT = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from gesim.transformer.train import TrainConfig, run, sft_model
cfg = TrainConfig.fast(**json.loads(sys.argv[2]))
out = run("long-suffix", "dpo", cfg=cfg)
model, _ = sft_model("long-suffix", cfg)
out["sft_params"] = [p.detach().flatten().tolist() for p in model.parameters()]
out["threads_after"] = torch.get_num_threads()
print(json.dumps(out))
"""


def _run_in_subprocess(threads: int, overrides: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(threads), json.dumps(overrides)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)


def test_same_seed_same_numbers_whatever_the_thread_count():
    """SFT + a few DPO steps with every measurement, in fresh processes with 1, 2 and 3 torch
    threads: bitwise the same SFT model and the same summary (n_embd=24 is a shape where
    MKL's GEMM does change with 3 threads, so the pin is what makes this pass); the
    caller's thread count is restored afterwards."""
    one = _run_in_subprocess(1, TINY)
    for threads in (2, 3):
        other = _run_in_subprocess(threads, TINY)
        assert other["threads_after"] == threads
        assert one["sft_params"] == other["sft_params"]
        for key in ("history", "pairs", "outcomes", "token_cos_last", "pair_confusion"):
            assert one[key] == other[key], key


def test_layernorm_backward_is_thread_count_invariant_and_equals_torchs():
    torch.manual_seed(0)
    x = torch.randn(32, 60, 48, dtype=torch.float32)
    g = torch.randn_like(x)
    ours, ref = gm.LayerNorm(48), torch.nn.LayerNorm(48)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.normal_()
            m.bias.normal_()
        ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    grads = []
    n = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            ours.zero_grad()
            ours(x).backward(g)
            grads.append((ours.weight.grad.clone(), ours.bias.grad.clone()))
    finally:
        torch.set_num_threads(n)
    for w, b in grads[1:]:
        assert torch.equal(w, grads[0][0]) and torch.equal(b, grads[0][1])
    ref(x).backward(g)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)


def test_run_order_and_the_global_rng_do_not_matter(one_thread):
    """Each stage draws from its own (seed, stage) stream: consuming torch's global RNG, or
    running another seed first, leaves a run's numbers unchanged, and a run does not touch
    the global RNG."""
    cfg = TrainConfig.fast(**TINY, seed=5)
    train._SFT_CACHE.clear()
    a = train.run("short-suffix", "dpo", cfg=cfg)
    train._SFT_CACHE.clear()
    torch.rand(100)
    train.run("short-suffix", "dpo", cfg=TrainConfig.fast(**TINY, seed=6))
    state = torch.get_rng_state()
    b = train.run("short-suffix", "dpo", cfg=cfg)
    assert torch.equal(state, torch.get_rng_state())
    assert a["history"] == b["history"] and a["pairs"] == b["pairs"]


def test_stage_streams_differ_across_stages_and_seeds():
    seeds = {train.stage_seed(s, st) for s in range(10) for st in train.STAGES}
    assert len(seeds) == 10 * len(train.STAGES)
    with pytest.raises(Exception, match="random stage"):
        train.stage_seed(0, "nope")


def test_the_loop_draws_the_same_batches_whatever_its_callback_does(one_thread):
    """The one training loop (gesim.transformer.loop): a callback that measures the model and
    consumes torch's global RNG leaves the drawn rows and the trained parameters bitwise equal
    to a run without a callback, and the hooks see every step in order, before then after."""
    from gesim.transformer import loop

    def trained(callback):
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 1)
        x, y = torch.randn(20, 3), torch.randn(20, 1)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(train.stage_seed(0, "pretrain-batches"))
        seen = []
        loop.train_steps(opt, lambda rows: (seen.append(rows) or ((net(x[rows]) - y[rows]) ** 2).mean()), 20, 4, g,
                         range(5), callback=callback)
        return [p.detach().clone() for p in net.parameters()], seen

    class Noisy(loop.Callback):
        calls = []

        def before(self, step, rows):
            self.calls.append(("before", step))
            torch.rand(7)

        def after(self, step, rows, loss):
            self.calls.append(("after", step))
            assert loss.requires_grad

    plain, rows_a = trained(None)
    noisy, rows_b = trained(Noisy())
    assert all(torch.equal(a, b) for a, b in zip(plain, noisy)) and all(map(torch.equal, rows_a, rows_b))
    assert Noisy.calls == [(w, s) for s in range(5) for w in ("before", "after")]

"""Benchmark: the plain method, torch.func and gesim.probe on the same pairs, in one run.

    python bench/probe.py                 # CPU mode, tiny models: bench/results/probe_cpu.json
    python bench/probe.py --mode gpu      # CUDA: GPT-2 small / medium / large shapes from configs,
                                          # fp32 and bf16: bench/results/probe_gpu.json

For each setting (model shape, dtype, B pairs, T tokens): every method's timing is gated on
a correctness check against an fp64 copy of the model on a subset of pairs (the plain method
in fp64 is the truth): per-pair max relative error of ip/nw2/nl2 and absolute cosine error.
Reports ms per pair (median of ``--reps``, methods run round robin after a warm-up), the ratio to the plain method,
the ratio to one plain forward+backward of the same padded batch (the floor), and peak memory
(CUDA ``max_memory_allocated`` above the resident model; not measured on CPU). Also the token
Gram of one response against one backward pass per token. torch.func is skipped (recorded as
such) when it runs out of memory.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: this tree's gesim

from gesim import lm, probe  # noqa: E402
from gesim.output import write_json  # noqa: E402
from gesim.probe import toy  # noqa: E402

GPU_MODELS = {"gpt2-small": dict(d=768, layers=12, heads=12), "gpt2-medium": dict(d=1024, layers=24, heads=16),
              "gpt2-large": dict(d=1280, layers=36, heads=20)}
CPU_MODELS = {"tiny-d64": dict(d=64, layers=2, heads=2), "tiny-d128": dict(d=128, layers=4, heads=4)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def random_batch(B, T, V, seed=0, device="cpu"):
    """B pairs, T tokens padded; prompt T/4, real lengths between T/2 and T."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (2, B, T), generator=g)
    masks = torch.zeros(2, B, T, dtype=torch.long)
    lengths = torch.randint(T // 2, T + 1, (2, B), generator=g)
    for s in range(2):
        for i in range(B):
            masks[s, i, T // 4:int(lengths[s, i])] = 1
    return lm.PairBatch(ids[0], ids[1], masks[0], masks[1]).to(device)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def peak_bytes(fn, device):
    """Peak device memory of one fn() above what was allocated before it (CUDA; None on CPU)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def interleaved(fns: dict, device, reps) -> dict:
    """Median seconds of each fn, the methods run in alternation (round robin) after a warm-up,
    so that load drifts on a shared machine hit every method alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def plain_step(model, batch):
    """One plain forward+backward of the same padded batch (the floor)."""
    model.zero_grad(set_to_none=True)
    lw, ll = lm.pair_logps(model, batch)
    (lw.sum() + ll.sum()).backward()
    model.zero_grad(set_to_none=True)


def errors(got, truth):
    rel = {k: float(((got[k].double().cpu() - truth[k]).abs() / truth[k].abs().clamp_min(1e-30)).max())
           for k in ("ip", "nw2", "nl2")}
    rel["abs_cos"] = float((got["cos"].double().cpu() - truth["cos"]).abs().max())
    return rel


def gate(err, dtype):
    """fp32: cos within 1e-4 and norms within 1e-3; bf16: cos within 2e-2."""
    if dtype == "float32":
        return err["abs_cos"] < 1e-4 and err["nw2"] < 1e-3 and err["nl2"] < 1e-3
    return err["abs_cos"] < 2e-2


def bench_setting(name, shape, dtype, B, T, device, reps, methods, V):
    model = toy.build_model("gpt2", vocab_size=V, positions=max(T, 64), **shape).to(device)
    model = model.to(DTYPES[dtype]).eval()
    batch = random_batch(B, T, V, device=device)
    truth_model = copy.deepcopy(model).double()
    sub = lm.PairBatch(*(t[:2] for t in (batch.chosen_ids, batch.rejected_ids, batch.chosen_mask,
                                         batch.rejected_mask)))
    truth = {k: v.cpu() for k, v in probe.pair_stats(truth_model, sub, backend="reference").items()}
    del truth_model
    row = {"model": name, "dtype": dtype, "B": B, "T": T, "params": sum(p.numel() for p in model.parameters()),
           "padded_fraction": 1 - float((batch.chosen_mask.sum() + batch.rejected_mask.sum()) / (2 * B * (T - T // 4)))}
    fns = {"plain_fwd_bwd": lambda: plain_step(model, batch)}
    for method in methods:
        try:
            err = errors(probe.pair_stats(model, sub, backend=method), truth)
            peak = peak_bytes(lambda m=method: probe.pair_stats(model, batch, backend=m), device)
        except torch.OutOfMemoryError:
            row[method] = {"status": "out of memory"}
            torch.cuda.empty_cache()
            continue
        row[method] = {"peak_bytes": peak, "errors_vs_fp64": err, "correct": gate(err, dtype)}
        fns[method] = lambda m=method: probe.pair_stats(model, batch, backend=m)
    floor_peak = peak_bytes(fns["plain_fwd_bwd"], device)
    if device == "cpu":  # CPU time: other jobs on a shared machine count less than in wall time
        fns["plain_fwd_bwd"]()
        times = cpu_interleaved(fns, reps, rewarm=True)
        row["timing"] = ("CPU seconds (time.process_time), medians of interleaved repetitions, each after an "
                         "untimed call of the same method")
        if dtype == "float32":  # every float32 shape (the fast probe's cost rules differ between them)
            row["cpu_peak_rss_above_model_bytes"] = {m: child_peak(name, B, T, V, m) for m in ("plain_fwd_bwd", "fast")}
            peaks = row["cpu_peak_rss_above_model_bytes"]
            row["fast"]["peak_ratio_to_plain_step"] = peaks["fast"] / max(peaks["plain_fwd_bwd"], 1)
    else:
        times = interleaved(fns, device, reps)
    floor = times["plain_fwd_bwd"]
    row["plain_fwd_bwd_ms"], row["plain_fwd_bwd_peak_bytes"] = 1e3 * floor, floor_peak
    for method in methods:
        if method in times:
            t = times[method]
            row[method].update({"ms_per_pair": 1e3 * t / B, "ms_batch": 1e3 * t, "ratio_to_floor": t / floor})
    ref = row.get("reference", {}).get("ms_per_pair")
    for method in methods:
        if ref and "ms_per_pair" in row[method]:
            row[method]["speedup_vs_plain"] = ref / row[method]["ms_per_pair"]
    if device == "cuda" and floor_peak:
        for method in methods:
            if row[method].get("peak_bytes"):
                row[method]["peak_ratio_to_plain_step"] = row[method]["peak_bytes"] / floor_peak
    print(name, dtype, f"B={B} T={T}", {m: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row[m].items()
                                            if k in ("ms_per_pair", "speedup_vs_plain", "ratio_to_floor", "correct",
                                                     "status")} for m in methods}, file=sys.stderr)
    return row


def child_peak(name, B, T, V, method) -> int:
    """Peak RSS growth (bytes) of a fresh process running ``method`` once on the setting, above its
    RSS after a warm-up step on a one-pair, 8-token batch (libraries and the model loaded; the
    peak is reset through /proc/self/clear_refs first)."""
    import os
    import subprocess
    res = subprocess.run([sys.executable, __file__, "--peak-child", name, str(B), str(T), str(V), method],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return int(res.stdout.split()[-1])


def _status_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_child(name, B, T, V, method):
    torch.set_num_threads(1)
    model = toy.build_model("gpt2", vocab_size=V, positions=max(T, 64), **CPU_MODELS[name]).eval()
    run = (lambda b: plain_step(model, b)) if method == "plain_fwd_bwd" else \
        (lambda b: probe.pair_stats(model, b, backend=method))
    run(random_batch(1, 8, V, seed=1))
    batch = random_batch(B, T, V)
    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS (Linux)
    run(batch)
    print(1024 * (_status_kib("VmHWM") - base))


TOKEN_NOTE = ("CPU seconds (time.process_time), one thread (the machine's load: the JSON's load_average); "
              "medians of interleaved repetitions. floor = measured sequential part (one forward to the "
              "head's input + one activation-only backward per token, the faster of two ways measured in the "
              "same run: one backward after another, sequential_part_per_token_cpu_s, and the same backwards "
              "batched backward_tokens_per_batch at a time as one vmapped backward (is_grads_batched, as "
              "gesim.probe.tokens runs them), sequential_part_batched_cpu_s: the same arithmetic per token "
              "in larger GEMMs, so no exact method needs more than the faster of them; the earlier floor, "
              "per-token backwards only, is kept as floor_per_token_backward_cpu_s) + counted FLOPs of the per-layer "
              "products and the head's closed form at this machine's measured GEMM rate (gemm_flop_per_s); "
              "floor_with_head_W_read also charges the head at least one read of W (V x d) at the measured "
              "read bandwidth (the head's thin GEMMs are memory-bound when few tokens are asked). "
              "SECONDARY floor (floor_head_at_shape_rates_cpu_s; the floor above stays the target): the same, "
              "but the head's two thin float64 GEMMs, logits (M x d)(d x V) and cotangent (M x V)(V x d), are "
              "charged at the best rate this machine's BLAS reaches on exactly those shapes (head_gemm_rates: "
              "the fastest of several layouts and vocabulary chunkings, MKL through torch; OpenBLAS through "
              "numpy measured the same, 10-12 GFLOP/s at M = 8, V = 50257, d = 128). Argument: every exact "
              "method must form all M x V logits (the softmax normaliser needs each of them) and the cotangent "
              "W^T (e_y - p) of each token, 2 M V d multiply-adds each, which is exactly one such GEMM; so no "
              "exact method built on this machine's BLAS does that work faster than those GEMMs at their best "
              "measured rate. It bounds BLAS-based methods, not a hand-written kernel (the machine's peak is "
              "the well-shaped rate gemm_flop_per_s). head_block.bound_cpu_s = the forward to the head's input "
              "(no graph, measured in the same interleaved run) + the logits GEMM at its best shape rate + "
              "2 M^2 V at gemm_flop_per_s: no exact BLAS-based method computes the head block faster, so "
              "loop_over_bound is the largest loop/fast ratio reachable here. The loop pays per token a "
              "(T x V) log-softmax backward and a (V x T)(T x d) weight gradient while the closed form pays "
              "2 V d per token plus fixed costs (the forward, one pass over W), so loop/fast grows with T and, "
              "through the fixed costs, with the number of tokens M.")


def head_gemm_rates(M, V, d, reps=5) -> dict:
    """Best FLOP/s of this machine's BLAS (torch) on the head's two thin float64 GEMMs for M tokens, each
    the fastest of several layouts and vocabulary chunkings (median CPU time): ``logits`` (M x d)(d x V)
    and ``cotangent`` (M x V)(V x d); {"logits": {"flop_per_s", "layout", "tried"}, "cotangent": ...}."""
    g = torch.Generator().manual_seed(0)
    H = torch.randn(M, d, generator=g, dtype=torch.float64)
    W = torch.randn(V, d, generator=g, dtype=torch.float64)
    E = torch.rand(M, V, generator=g, dtype=torch.float64)

    def chunks(rows, f):
        return lambda: [f(v, v + rows) for v in range(0, V, rows)]

    def accumulate(rows):
        def run():
            acc = torch.zeros(M, d, dtype=torch.float64)
            for v in range(0, V, rows):
                acc.addmm_(E[:, v:v + rows], W[v:v + rows])
        return run
    forms = {"logits": {"H @ W.T": lambda: H @ W.T, "W @ H.T": lambda: W @ H.T,
                        "F.linear(H, W)": lambda: torch.nn.functional.linear(H, W)},
             "cotangent": {"E @ W": lambda: E @ W, "(W.T @ E.T).T": lambda: (W.T @ E.T).T}}
    for rows in (512, 2048, 8192):
        forms["logits"][f"W[{rows}-row chunks] @ H.T"] = chunks(rows, lambda a, b: W[a:b] @ H.T)
        forms["logits"][f"H @ W[{rows}-row chunks].T"] = chunks(rows, lambda a, b: H @ W[a:b].T)
        forms["cotangent"][f"sum of E[:, chunk] @ W[{rows}-row chunk]"] = accumulate(rows)
    out = {}
    for name, fns in forms.items():
        rates = {k: 2 * M * V * d / v for k, v in cpu_interleaved(fns, reps, rewarm=True).items()}
        best = max(rates, key=rates.get)
        out[name] = {"flop_per_s": rates[best], "layout": best, "tried": rates}
    return out


def forward_to_head(model, ids):
    """One forward of the row up to the head's input, without a graph (all the head block needs)."""
    def stop(m, a):
        raise StopIteration
    handle = model.get_output_embeddings().register_forward_pre_hook(stop)
    try:
        with torch.no_grad():
            try:
                lm.logits(model, ids)
            except StopIteration:
                pass
    finally:
        handle.remove()


def cpu_interleaved(fns: dict, reps, rewarm=False) -> dict:
    """Median CPU seconds (time.process_time: this process's threads only, so other jobs on a shared
    machine count less than in wall time) of each fn, run round robin; no warm-up (callers have
    already run each fn once for its parity gate). ``rewarm``: each timed call follows an untimed
    call of the same fn, so no method pays for the caches another one left cold."""
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if rewarm:
                fn()
            t0 = time.process_time()
            fn()
            times[name].append(time.process_time() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def gemm_rate(dtype, reps=5) -> float:
    """FLOP/s of one well-shaped GEMM ((256, 1024) x (1024, 1024)) on this machine, median CPU time."""
    a, b = torch.randn(256, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    times = []
    for _ in range(reps + 1):
        t0 = time.process_time()
        a @ b
        times.append(time.process_time() - t0)
    return 2 * 256 * 1024 * 1024 / statistics.median(times[1:])


def read_rate(n, reps=5) -> float:
    """Bytes/s of one pass reading n float64 values (a sum), median CPU time."""
    x = torch.randn(n, dtype=torch.float64)
    times = []
    for _ in range(reps + 1):
        t0 = time.process_time()
        x.sum()
        times.append(time.process_time() - t0)
    return 8 * n / statistics.median(times[1:])


def token_counts(model, T, M, V):
    """Counted FLOPs of the cheapest exact token Gram for one row of T tokens with M response tokens
    (gesim.probe.tokens): ``body_pass`` = the linear GEMMs of one forward of the body (2 T d_in d_out
    per matrix; the activation-only backward of one token costs the same again); ``products`` = per
    matrix the cheaper of ghost and materialised over all M^2 pairs (tokens.linear_gram_flops; the
    bias adds 2 M^2 d_out to the materialised form, nothing to the ghost one: C + 1), plus 2 M^2 x
    (size) for the other vectors and the grouped embeddings (<= T ids); ``head`` = the closed
    form: 2 M V d (logits at the response positions) + 2 M V d (p @ W, the cotangent into the body)
    + 2 M^2 (V + d)."""
    from gesim.probe.tokens import linear_gram_flops
    body = products = 0
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if w is None or mod is model.get_output_embeddings():
            continue
        if type(mod).__name__ == "Conv1D" or isinstance(mod, torch.nn.Linear):
            d_in, d_out = (w.shape[0], w.shape[1]) if type(mod).__name__ == "Conv1D" else (w.shape[1], w.shape[0])
            body += 2 * T * d_in * d_out
            c = linear_gram_flops(M, 1, T, d_in, d_out)  # the bias: free in the ghost form (C + 1), a vector otherwise
            products += min(c.values()) + (0 if c["ghost"] < c["materialise"] else 2 * M * M * d_out)
        elif isinstance(mod, torch.nn.Embedding):
            products += 2 * M * M * min(T, w.shape[0]) * w.shape[1]
        else:
            products += 2 * M * M * w.numel() * 2
    d = model.get_output_embeddings().weight.shape[1]
    return {"body_pass": body, "products": products, "head": 4 * M * V * d + 2 * M * M * (V + d)}


def sequential_part(model, ids, positions, step=1):
    """The part no exact method skips (a token's gradient depends on all earlier positions): one forward
    of the row up to the head's input and one activation-only backward per response token down to the
    embedding output (random cotangents; the values do not matter for the time). ``step`` > 1: the
    per-token backwards run ``step`` tokens at a time as one vmapped backward (``is_grads_batched``:
    the same arithmetic per token, in larger GEMMs), as gesim.probe.tokens runs them."""
    caps, hs = [], []
    emb = model.get_input_embeddings()
    h1 = emb.register_forward_hook(lambda m, a, o: caps.append(o))

    def stop(m, a):
        hs.append(a[0])
        raise StopIteration
    h2 = model.get_output_embeddings().register_forward_pre_hook(stop)
    try:
        with torch.enable_grad():
            try:
                lm.logits(model, ids)
            except StopIteration:
                pass
            h = hs[0]
            for c0 in range(0, len(positions), step):
                chunk = positions[c0:c0 + step]
                seeds = torch.zeros(len(chunk), *h.shape, dtype=h.dtype)
                seeds[torch.arange(len(chunk)), 0, torch.tensor(chunk)] = 1.0
                last = c0 + step >= len(positions)
                if step == 1:
                    torch.autograd.grad(h, caps, seeds[0], retain_graph=not last)
                else:
                    torch.autograd.grad(h, caps, seeds, retain_graph=not last, is_grads_batched=True)
    finally:
        h1.remove()
        h2.remove()


def fast_backward_step(model, ids, K):
    """Tokens per batched backward that gesim.probe.tokens uses on this row with all parameters selected
    (its output-gradient elements per token: the outputs of the modules owning parameters, head excluded)."""
    from gesim.probe.tokens import backward_step
    head, sizes = model.get_output_embeddings(), []
    hooks = [m.register_forward_hook(lambda m, a, o: sizes.append(o.numel())) for m in model.modules()
             if m is not head and any(True for _ in m.parameters(recurse=False))]
    try:
        forward_to_head(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return backward_step(K, sum(sizes))


def bench_token_gram(V, T, reps, d=128, layers=4, heads=4):
    """All-parameter token Gram (tied GPT-2 shape) vs the per-token loop vs the counted floor, and the
    head block alone (untied head, its weight only) vs the loop on the same parameter; float64,
    one row, the last T/4 tokens as the response; each timing gated on parity (1e-10)."""
    from gesim.probe.reference import reference_token_gram
    from gesim.probe.tokens import fast_token_gram
    K = T // 4
    ids = torch.randint(3, V, (1, T), generator=torch.Generator().manual_seed(V + T))
    mask = torch.zeros_like(ids)
    mask[0, T - K:] = 1
    row = {"V": V, "T": T, "tokens": K, "model": f"gpt2 d{d} L{layers}", "dtype": "float64"}
    for part, tied, params in (("all_params", True, "all"), ("head_block", False, None)):
        model = toy.build_model("gpt2", vocab_size=V, positions=max(T, 64), d=d, layers=layers, heads=heads,
                                tied=tied).double().eval()
        if params is None:
            head = model.get_output_embeddings().weight
            params = lambda n, p, head=head: p is head  # noqa: E731
        fast = lambda m=model, p=params: fast_token_gram(m, ids, mask, p)  # noqa: E731
        loop = lambda m=model, p=params: reference_token_gram(m, ids, mask, p)  # noqa: E731
        got, want = fast()[0], loop()[0]
        err = float((got - want).abs().max() / want.abs().max())
        out = {"rel_error_vs_loop": err, "parity_1e-10": err < 1e-10}
        if not out["parity_1e-10"]:
            row[part] = out
            continue
        fns = {"fast": fast, "loop": loop}
        if part == "all_params":
            pos = list(range(T - K - 1, T - 1))
            step = fast_backward_step(model, ids, K)
            fns["sequential_part_per_token"] = lambda m=model, pos=pos: sequential_part(m, ids, pos)
            if step > 1:
                fns["sequential_part_batched"] = lambda m=model, pos=pos, s=step: sequential_part(m, ids, pos, s)
        else:
            fns["forward_to_head"] = lambda m=model: forward_to_head(m, ids)
        t = cpu_interleaved(fns, reps)
        out.update({"fast_cpu_s": t["fast"], "loop_cpu_s": t["loop"], "loop_over_fast": t["loop"] / t["fast"]})
        d_model = model.config.n_embd
        rate = gemm_rate(torch.float64)
        shape_rates = head_gemm_rates(K, V, d_model)
        r_logits, r_cot = shape_rates["logits"]["flop_per_s"], shape_rates["cotangent"]["flop_per_s"]
        if part == "all_params":
            counts = token_counts(model, T, K, V)
            t["sequential_part"] = min(t["sequential_part_per_token"], t.get("sequential_part_batched", 1e9))
            old = t["sequential_part_per_token"] + (counts["products"] + counts["head"]) / rate
            bandwidth = read_rate(V * d_model)
            floor = t["sequential_part"] + (counts["products"] + counts["head"]) / rate
            w_read = 8 * V * d_model / bandwidth  # the head must read W (V x d, float64) once
            roof = t["sequential_part"] + counts["products"] / rate + max(counts["head"] / rate, w_read)
            thin = 2 * K * V * d_model  # each of the head's two thin GEMMs
            at_shape = (t["sequential_part"] + (counts["products"] + counts["head"] - 2 * thin) / rate
                        + thin / r_logits + thin / r_cot)
            out.update({"counted_flops": counts, "gemm_flop_per_s": rate, "sequential_part_cpu_s":
                        t["sequential_part"], "floor_cpu_s": floor, "fast_over_floor": t["fast"] / floor,
                        "read_bytes_per_s": bandwidth, "floor_with_head_W_read_cpu_s": roof,
                        "fast_over_floor_with_W_read": t["fast"] / roof,
                        "loop_over_floor": t["loop"] / floor, "head_gemm_rates": shape_rates,
                        "floor_head_at_shape_rates_cpu_s": at_shape,
                        "fast_over_floor_head_at_shape_rates": t["fast"] / at_shape,
                        "backward_tokens_per_batch": step,
                        "sequential_part_per_token_cpu_s": t["sequential_part_per_token"],
                        "sequential_part_batched_cpu_s": t.get("sequential_part_batched"),
                        "floor_per_token_backward_cpu_s": old,
                        "fast_over_floor_per_token_backward": t["fast"] / old})
        else:
            bound = t["forward_to_head"] + 2 * K * V * d_model / r_logits + 2 * K * K * V / rate
            out.update({"forward_to_head_cpu_s": t["forward_to_head"], "head_gemm_rates": shape_rates,
                        "gemm_flop_per_s": rate, "bound_cpu_s": bound, "fast_over_bound": t["fast"] / bound,
                        "loop_over_bound": t["loop"] / bound})
        row[part] = out
        del model
    print("token gram", {k: (v if not isinstance(v, dict) else {kk: round(vv, 3) for kk, vv in v.items()
                                                                 if kk in ("loop_over_fast", "fast_over_floor",
                                                                           "fast_over_floor_head_at_shape_rates",
                                                                           "loop_over_bound")})
                         for k, v in row.items()}, file=sys.stderr)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", help="JSON path (default bench/results/probe_<mode>.json)")
    ap.add_argument("--quick", action="store_true", help="one small setting per mode (smoke test)")
    ap.add_argument("--token-reps", type=int, default=3)
    ap.add_argument("--token-settings", help="token Gram settings VxT, comma-separated (default "
                    "512x32,512x128,8192x32,8192x128,50257x32,50257x128)")
    ap.add_argument("--only", choices=("pairs", "tokens"), help="run one part (default both)")
    ap.add_argument("--peak-child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peak_child:
        n, B, T, V, m = args.peak_child
        peak_child(n, int(B), int(T), int(V), m)
        return 0
    torch.manual_seed(0)
    device = "cuda" if args.mode == "gpu" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--mode gpu needs CUDA")
    V = 50257 if device == "cuda" else 512
    methods = ("reference", "func", "fast")
    if device == "cpu":
        settings = [("tiny-d64", "float32", B, T) for B in (1, 4, 8) for T in (32, 64)]
        settings += [("tiny-d128", "float32", B, T) for B, T in ((8, 64), (16, 64), (8, 128))]
        settings += [("tiny-d128", "bfloat16", 8, 64)]
        shapes = CPU_MODELS
    else:
        settings = [("gpt2-small", "float32", 8, 256), ("gpt2-small", "bfloat16", 32, 256),
                    ("gpt2-small", "float32", 32, 256), ("gpt2-small", "float32", 8, 128),
                    ("gpt2-small", "float32", 8, 512), ("gpt2-medium", "float32", 8, 256),
                    ("gpt2-medium", "bfloat16", 8, 256), ("gpt2-large", "float32", 8, 256)]
        shapes = GPU_MODELS
    if args.quick:
        settings = settings[:1]
    if args.only == "tokens":
        settings = []
    rows = [bench_setting(n, shapes[n], dt, B, T, device, args.reps, methods, V) for n, dt, B, T in settings]
    result = {"mode": args.mode, "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor()
              or platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "note": "random-init GPT-2-shaped models built from configs",
              "load_average_before": os.getloadavg(), "cpus": os.cpu_count(),
              "settings": rows}
    grams = [(512, 32)] if args.quick else [(v, t) for v in (512, 8192, 50257) for t in (32, 128)]
    if args.token_settings:
        try:
            grams = [(int(v), int(t)) for v, t in (s.split("x") for s in args.token_settings.split(","))]
        except ValueError:
            ap.error(f"--token-settings: expected VxT pairs like 50257x32,512x128, got {args.token_settings!r}")
        if any(v < 4 or t < 8 for v, t in grams):
            ap.error("--token-settings: V >= 4 and T >= 8 (the response is the last T/4 tokens)")
    if device == "cpu" and args.only != "pairs":
        result["token_gram"] = {"note": TOKEN_NOTE, "rows": [bench_token_gram(v, t, args.token_reps)
                                                            for v, t in grams]}
    import transformers
    result["transformers"] = transformers.__version__
    out = Path(args.out or Path(__file__).parent / "results" / f"probe_{args.mode}.json")
    if args.only and out.exists():  # one part rerun: keep the other part of the file
        import json
        kept = json.loads(out.read_text())
        for key in (("settings",) if args.only == "tokens" else ("token_gram",)):
            if key in kept:
                result[key] = kept[key]
        result["runs"] = {**kept.get("runs", {}), args.only: " ".join(sys.argv[1:] if argv is None else argv)}
    write_json(out, result)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

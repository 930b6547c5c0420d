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


def bench_token_gram(shape, T, K, device, V, reps):
    model = toy.build_model("gpt2", vocab_size=V, positions=max(T, 64), **shape).to(device).eval()
    ids = random_batch(1, T, V, device=device).chosen_ids
    mask = torch.zeros_like(ids)
    mask[0, T - K:] = 1
    fast = probe.token_gram(model, ids, mask)
    ref = probe.token_gram(model, ids, mask, backend="reference")
    err = float((fast.K - ref.K).abs().max() / ref.K.abs().max())
    p_fast = peak_bytes(lambda: probe.token_gram(model, ids, mask), device)
    p_ref = peak_bytes(lambda: probe.token_gram(model, ids, mask, backend="reference"), device)
    times = interleaved({"fast": lambda: probe.token_gram(model, ids, mask),
                         "loop": lambda: probe.token_gram(model, ids, mask, backend="reference")}, device, reps)
    t_fast, t_ref = times["fast"], times["loop"]
    return {"T": T, "tokens": K, "fast_s": t_fast, "per_token_backward_s": t_ref, "speedup": t_ref / t_fast,
            "rel_error_vs_loop": err, "fast_peak_bytes": p_fast, "loop_peak_bytes": p_ref}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", help="JSON path (default bench/results/probe_<mode>.json)")
    ap.add_argument("--quick", action="store_true", help="one small setting per mode (smoke test)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    device = "cuda" if args.mode == "gpu" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--mode gpu needs CUDA")
    V = 50257 if device == "cuda" else 512
    methods = ("reference", "func", "fast")
    if device == "cpu":
        settings = [("tiny-d64", "float32", B, T) for B in (1, 4, 8) for T in (32, 64)]
        settings += [("tiny-d128", "float32", 8, 64), ("tiny-d128", "bfloat16", 8, 64)]
        shapes, gram = CPU_MODELS, (CPU_MODELS["tiny-d128"], 48, 32)
    else:
        settings = [("gpt2-small", "float32", 8, 256), ("gpt2-small", "bfloat16", 32, 256),
                    ("gpt2-small", "float32", 32, 256), ("gpt2-small", "float32", 8, 128),
                    ("gpt2-small", "float32", 8, 512), ("gpt2-medium", "float32", 8, 256),
                    ("gpt2-medium", "bfloat16", 8, 256), ("gpt2-large", "float32", 8, 256)]
        shapes, gram = GPU_MODELS, (GPU_MODELS["gpt2-small"], 96, 64)
    if args.quick:
        settings = settings[:1]
    rows = [bench_setting(n, shapes[n], dt, B, T, device, args.reps, methods, V) for n, dt, B, T in settings]
    result = {"mode": args.mode, "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor()
              or platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "note": "random-init GPT-2-shaped models built from configs; CPU shared with other jobs" if
              device == "cpu" else "random-init GPT-2-shaped models built from configs",
              "settings": rows, "token_gram": bench_token_gram(*gram, device, V, args.reps)}
    import transformers
    result["transformers"] = transformers.__version__
    out = Path(args.out or Path(__file__).parent / "results" / f"probe_{args.mode}.json")
    write_json(out, result)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

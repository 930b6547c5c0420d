"""Overhead of the training-step recorder (gesim.probe.StepTelemetry) on CPU.

For each size: one DPO training step (policy forward over the stacked chosen + rejected rows,
loss, backward, AdamW step; the reference log-probs are precomputed, so the denominator is
the policy step alone) timed plain, with the within-pair recorder ("pairs") and with the
full batch Gram ("batch"), on the same batch, model and AdamW optimizer (lr 0: the full
optimizer work, the parameters stay put) in the same process, interleaved (the order of the
three modes rotates every repetition), median over repetitions; the ratio is
median(mode) / median(plain) of the process's CPU time per step (one thread: on a machine shared
with other jobs, CPU time does not count the time the process waits for a core, which made the
wall times of one configuration vary by 1.6x); wall-time ratios are reported next to them.

Gate: before any timing, the recorder's per-pair ip, nw2, nl2 (loss weights by autograd)
are compared with the probe on the same batch and parameters: the reference backend in
float64 for the small sizes (relative error < 1e-10), the fast backend in float32 for the
large ones (relative < 1e-3, float32 rounding of a 124M-long reduction). A size failing its
gate is reported and not timed.

Usage: OMP_NUM_THREADS=1 python bench/telemetry.py [--sizes quick|all|max] [--only NAME,..] [--reps N] [--big-reps N]
       [--out FILE]
Writes bench/results/telemetry_cpu.json by default. Timings on a shared, loaded machine: the
ratios are the result, not the milliseconds.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: this tree's gesim

warnings.filterwarnings("ignore")

# name, arch, layers, width, heads, vocabulary, pairs B, tokens T, float64 gate
SIZES = [
    ("toy-2L", "gesim-gpt", 2, 64, 2, 256, 8, 64, True),
    ("gpt2-2L-d256", "gpt2", 2, 256, 4, 8192, 8, 128, True),
    ("gpt2-6L-d512", "gpt2", 6, 512, 8, 16384, 8, 128, False),
    ("gpt2-small-B8-T64", "gpt2", 12, 768, 12, 50257, 8, 64, False),
    ("gpt2-small-B8-T128", "gpt2", 12, 768, 12, 50257, 8, 128, False),
    ("gpt2-small-B8-T256", "gpt2", 12, 768, 12, 50257, 8, 256, False),
    ("gpt2-small-B16-T256", "gpt2", 12, 768, 12, 50257, 16, 256, False),
]
QUICK = ("toy-2L", "gpt2-2L-d256", "gpt2-small-B8-T64")
MAX_ONLY = ("gpt2-small-B8-T256", "gpt2-small-B16-T256")  # minutes per step on a loaded core: --sizes max


def build(arch, layers, width, heads, vocab, T, dtype):
    torch.manual_seed(0)
    if arch == "gesim-gpt":
        from gesim.transformer.model import GPT, GPTConfig
        model = GPT(GPTConfig(vocab_size=vocab, block_size=T, n_layer=layers, n_head=heads, n_embd=width))
    else:
        from transformers import GPT2Config, GPT2LMHeadModel
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=T, n_embd=width, n_layer=layers,
                                           n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    return model.to(dtype).train()


def batch_of(vocab, B, T, seed=0):
    from gesim import lm
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, B, T), generator=g)
    ids[1, :, : T // 2] = ids[0, :, : T // 2]  # shared prompt
    mask = torch.zeros(2, B, T, dtype=torch.long)
    mask[:, :, T // 2:] = 1
    lengths = torch.randint(T // 2 + 2, T + 1, (2, B), generator=g)  # right padding
    mask[torch.arange(T)[None, None, :].expand(2, B, T) >= lengths[..., None]] = 0
    return lm.PairBatch(ids[0], ids[1], mask[0], mask[1])


def step(model, opt, batch, refs, tel=None):
    """One DPO training step; returns (d_w, d_l, B, RowGram or None)."""
    from gesim import lm, losses
    from gesim.probe import loss_weights
    B = len(batch)
    ctx = tel.record(torch.arange(B), torch.arange(B, 2 * B)) if tel is not None else _null()
    with ctx:
        lw, ll = lm.pair_logps(model, batch)
        L = losses.get("dpo")("torch", lw, ll, *refs).mean()
        d_w, d_l, n = loss_weights(L, lw, ll) if tel is not None else (None, None, B)
        opt.zero_grad(set_to_none=True)
        L.backward()
    opt.step()
    return d_w, d_l, n, (tel.pop() if tel is not None else None)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def refs_of(model, batch):
    from gesim import lm
    with torch.no_grad():
        lw, ll = lm.pair_logps(model, batch)
    return lw - 0.5, ll + 0.5, batch.chosen_mask.sum(1), batch.rejected_mask.sum(1)


def gate(spec) -> dict:
    """Recorder vs probe on one step's parameters (before the optimizer moves them)."""
    from gesim import probe
    from gesim.probe import StepTelemetry
    name, arch, layers, width, heads, vocab, B, T, f64 = spec
    dtype = torch.float64 if f64 else torch.float32
    model = build(arch, layers, width, heads, vocab, T, dtype)
    batch = batch_of(vocab, B, T)
    want = probe.pair_stats(model, batch, backend="reference" if f64 else "fast")
    model.train()
    out = {}
    for mode in ("pairs", "batch"):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        tel = StepTelemetry(model, batch_gram=mode == "batch")
        d_w, d_l, n, rg = step(model, opt, batch, refs_of(model, batch), tel)
        got = rg.pair_stats(d_w, d_l, n)
        out[mode] = max(float((got[k] - want[k]).abs().max() / want[k].abs().max()) for k in ("ip", "nw2", "nl2"))
    tol = 1e-10 if f64 else 1e-3
    return {"against": "reference fp64" if f64 else "fast probe fp32", "max_rel_err": out, "tol": tol,
            "passed": all(v < tol for v in out.values())}


def time_size(spec, reps) -> dict:
    from gesim.probe import StepTelemetry
    name, arch, layers, width, heads, vocab, B, T, _ = spec
    model = build(arch, layers, width, heads, vocab, T, torch.float32)
    batch = batch_of(vocab, B, T)
    refs = refs_of(model, batch)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # the full AdamW work; the parameters stay put
    tels = {"plain": None, "pairs": StepTelemetry(model), "batch": StepTelemetry(model, batch_gram=True)}
    order = ["plain", "pairs", "batch"]
    times = {m: [] for m in order}
    cpu = {m: [] for m in order}
    for m in order:  # warm-up
        step(model, opt, batch, refs, tels[m])
    for r in range(reps):
        for m in order[r % 3:] + order[: r % 3]:
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            step(model, opt, batch, refs, tels[m])
            times[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)
    med = {m: statistics.median(v) for m, v in cpu.items()}
    wall = {m: statistics.median(v) for m, v in times.items()}
    n_params = sum(p.numel() for p in model.parameters())
    return {"size": name, "arch": arch, "layers": layers, "width": width, "vocab": vocab, "pairs": B, "T": T,
            "params": n_params, "reps": reps, "median_cpu_s": med, "cpu_s": cpu, "median_wall_s": wall,
            "wall_s": times, "ratio_pairs": med["pairs"] / med["plain"], "ratio_batch": med["batch"] / med["plain"],
            "wall_ratio_pairs": wall["pairs"] / wall["plain"], "wall_ratio_batch": wall["batch"] / wall["plain"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", choices=("quick", "all", "max"), default="all")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--big-reps", type=int, default=3, help="repetitions for the GPT-2-small sizes")
    ap.add_argument("--only", default=None, metavar="NAME[,NAME]",
                    help="only these sizes, merged into an existing --out file (re-run one size)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "telemetry_cpu.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    only = args.only.split(",") if args.only else None
    if only and Path(args.out).exists():
        rows = [r for r in json.loads(Path(args.out).read_text())["results"] if r["size"] not in only]
    for spec in SIZES:
        if only is not None and spec[0] not in only:
            continue
        if only is None and ((args.sizes == "quick" and spec[0] not in QUICK) or
                             (args.sizes != "max" and spec[0] in MAX_ONLY)):
            continue
        g = gate(spec)
        gc.collect()
        row = {"size": spec[0], "gate": g}
        if g["passed"]:
            row |= time_size(spec, args.big_reps if spec[2] >= 12 else args.reps)
            print(f"{spec[0]:<22} CPU time: pairs x{row['ratio_pairs']:.3f}  batch x{row['ratio_batch']:.3f}  "
                  f"(wall: x{row['wall_ratio_pairs']:.3f}, x{row['wall_ratio_batch']:.3f}; plain "
                  f"{row['median_cpu_s']['plain'] * 1e3:.0f} ms CPU; gate {g['max_rel_err']})", flush=True)
        else:
            print(f"{spec[0]:<22} GATE FAILED {g}", flush=True)
        rows.append(row)
        rows.sort(key=lambda r: [s[0] for s in SIZES].index(r["size"]))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(_meta(args) | {"results": rows}, indent=2) + "\n")


def _meta(args):
    import transformers
    return {"bench": "bench/telemetry.py", "device": "cpu", "threads": 1, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "note": "shared 2-core machine under load from other jobs: ratios of CPU time per step (same run, "
                    "interleaved, medians) are the result, absolute times are not",
            "step": "DPO policy forward + backward + AdamW step, reference log-probs precomputed", "sizes": args.sizes}


if __name__ == "__main__":
    main()

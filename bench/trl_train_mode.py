"""Overhead of TrainEntanglementCallback on trl's DPOTrainer training step (CPU).

One micro-batch, the same batch and parameters for both variants (no optimizer step between
repeats, so every repeat does the same work), timed interleaved: trl's own ``training_step``
(forward of policy and reference, backward) and the callback's step (trl's step unchanged, with
StepTelemetry's hooks, the LM head's use formed from its input and dL/dlogp, and the row
weights read); the step-end bookkeeping (rows, fractions) is timed separately. Median over
repeats of each variant and of the per-repeat ratios. float32, no mixed precision, gradient
checkpointing as trl's default (on). Timings on a shared machine: the ratios (same run,
interleaved) are the result, not the absolute times.

Usage: OMP_NUM_THREADS=1 python bench/trl_train_mode.py [--sizes tiny,small,wide] [--repeats 7] [--out FILE]
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: this tree's gesim

warnings.filterwarnings("ignore")

#: name: (d, layers, heads, vocab, pairs per micro-batch, prompt words, response words)
SIZES = {"tiny": (16, 2, 2, 51, 4, (2, 6), (2, 10)),
         "small": (128, 4, 4, 8192, 8, (16, 32), (24, 48)),
         "wide": (256, 4, 4, 32768, 8, (16, 32), (24, 48))}


def build(size):
    import datasets
    from trl import DPOConfig, DPOTrainer

    from gesim.probe import toy

    d, layers, heads, vocab, B, plen, rlen = SIZES[size]
    tok = toy.build_tokenizer()
    model = toy.build_model("gpt2", vocab_size=vocab, d=d, layers=layers, heads=heads, positions=256)
    rows = toy.toy_rows(4 * B, seed=1, prompt_len=plen, response_len=rlen)
    config = DPOConfig(output_dir=tempfile.mkdtemp(), max_steps=1, per_device_train_batch_size=B, report_to=[],
                       save_strategy="no", use_cpu=True, seed=0, bf16=False, disable_tqdm=True)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model).eval(), args=config,
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1
    if config.gradient_checkpointing:
        trainer.model.gradient_checkpointing_enable(config.gradient_checkpointing_kwargs)
    return trainer, next(iter(trainer.get_train_dataloader()))


def measure(size: str, repeats: int) -> dict:
    from gesim.integrations.trl_train import TrainEntanglementCallback

    trainer, batch = build(size)
    model = trainer.model
    plain = trainer.training_step
    cb = TrainEntanglementCallback(out_dir=False).attach(trainer)
    watched = trainer.training_step

    variants = {"trl": plain, "callback": watched}
    times = {k: [] for k in variants}
    end = []
    for r in range(repeats + 1):  # the first round warms up
        for name, fn in variants.items():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            fn(model, batch)
            dt = time.perf_counter() - t0
            if r:
                times[name].append(dt)
        t0 = time.perf_counter()
        state = type("S", (), {"global_step": r + 1})()
        cb.on_step_end(trainer.args, state, trainer.control)
        if r:
            end.append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = {"callback": statistics.median(a / b for a, b in zip(times["callback"], times["trl"]))}
    d, layers, heads, vocab, B, _, _ = SIZES[size]
    return {"size": size, "d": d, "layers": layers, "vocab": vocab, "pairs": B, "T": int(batch["input_ids"].shape[1]),
            "repeats": repeats, "median_seconds": med, "step_end_seconds": statistics.median(end),
            "ratio_to_trl": ratio,
            "ratio_with_step_end": statistics.median(
                (a + e) / b for a, e, b in zip(times["callback"], end, times["trl"])),
            "rows": int(len(cb.table()["step"]))}


def main(argv=None):
    from gesim.errors import OneLineParser

    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    sizes = args.sizes.split(",")
    bad = [s for s in sizes if s not in SIZES]
    if bad or args.repeats < 1:
        parser.error(f"sizes among {', '.join(SIZES)} and repeats >= 1 (got {args.sizes!r}, {args.repeats})")
    torch.set_num_threads(1)
    out = {"torch_threads": 1, "results": [measure(s, args.repeats) for s in sizes]}
    text = json.dumps(out, indent=1)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.exit(main())

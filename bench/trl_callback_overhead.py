"""Overhead of EntanglementCallback per logged step in a tiny trl DPOTrainer run on CPU.

Interleaved runs with and without the callback (every = logging_steps = 1), median over
repeats of the per-step wall time; also the probe's own time per step (entanglement/seconds).
Usage: OMP_NUM_THREADS=1 python bench/trl_callback_overhead.py [repeats] [steps] [probe_pairs]
"""

import copy
import statistics
import sys
import tempfile
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def run(callback: bool, steps: int, pairs: int):
    import datasets
    from trl import DPOConfig, DPOTrainer

    from gesim.integrations.trl import EntanglementCallback
    from gesim.probe import toy

    torch.manual_seed(0)
    tok = toy.build_tokenizer()
    model = toy.build_model("gpt2", vocab_size=len(tok), d=32)
    rows = toy.toy_rows(64, seed=1)
    config = DPOConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=4,
                       learning_rate=1e-4, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                       disable_tqdm=True)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model).eval(), args=config,
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    cb = EntanglementCallback(rows[:pairs], tok, every=1).attach(trainer) if callback else None
    t0 = time.perf_counter()
    trainer.train()
    per_step = (time.perf_counter() - t0) / steps
    probe = statistics.median(h["entanglement/seconds"] for h in cb.history) if cb else 0.0
    return per_step, probe


def main():
    repeats, steps, pairs = (int(a) for a in (sys.argv[1:] + ["3", "10", "8"][len(sys.argv) - 1:]))
    torch.set_num_threads(1)
    run(False, 2, pairs)  # warm-up
    plain, probed, probe = [], [], []
    for _ in range(repeats):
        plain.append(run(False, steps, pairs)[0])
        a, b = run(True, steps, pairs)
        probed.append(a)
        probe.append(b)
    p, q = statistics.median(plain), statistics.median(probed)
    print(f"steps {steps}, probe pairs {pairs}, repeats {repeats} (under load; ratios are the result)")
    print(f"per logged step: plain {p * 1e3:.1f} ms, with callback {q * 1e3:.1f} ms, ratio {q / p:.2f}; "
          f"probe itself (median) {statistics.median(probe) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()

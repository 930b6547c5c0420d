"""Benchmark: gesim's thread policy against torch's default, on whatever load the machine has now.

    python bench/threads.py                 # writes bench/results/threads.json
    python bench/threads.py --quick

Each setting runs in a fresh process (torch reads its thread count at start-up), interleaved,
``--repeats`` times, medians of wall time:

* ``gpt_step``: one SFT step (forward, backward, AdamW) of gesim's small GPT (4 layers, d 128,
  batch 16 x 48 tokens) with torch's default (one thread per CPU) and with
  :func:`gesim.threads.configure` (one thread);
* ``simulate``: 2000 x 20 instance-steps of the context policy on one single-threaded worker and
  with the policy (single-threaded workers, one per CPU allowed).

Run it on a quiet machine and next to a busy process; the JSON records the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gesim import threads  # noqa: E402
from gesim.output import write_json  # noqa: E402

GPT_STEP = """
import json, sys, time, torch
from gesim.transformer.model import GPT, GPTConfig
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=128))
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
x = torch.randint(0, 256, (16, 48))
def step():
    logits = model(x[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1))
    opt.zero_grad(); loss.backward(); opt.step()
step()
t0 = time.perf_counter()
for _ in range(int(sys.argv[1])):
    step()
print(json.dumps({"s_per_step": (time.perf_counter() - t0) / int(sys.argv[1]), "threads": torch.get_num_threads()}))
"""

SIMULATE = """
import json, sys, time, torch
from gesim.simulate import SimConfig, simulate
cfg = SimConfig(policy="context", vocab=256, dim=64, suffix=31, instances=2000, steps=20, dtype="float32")
simulate(SimConfig(instances=2, steps=1))
workers = None if sys.argv[1] == "auto" else int(sys.argv[1])
t0 = time.perf_counter()
simulate(cfg, workers=workers)
print(json.dumps({"s": time.perf_counter() - t0, "threads": torch.get_num_threads()}))
"""

PRELUDE = "from gesim import threads; threads.configure()\n"


def run(code: str, args: list[str], policy: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (*threads.ENV, threads.AUTO, "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", (PRELUDE if policy else "") + code, *args], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "threads.json"))
    args = ap.parse_args(argv)
    steps = "5" if args.quick else "20"
    cases = {
        "gpt_step torch default": (GPT_STEP, [steps], False),
        "gpt_step gesim policy": (GPT_STEP, [steps], True),
        "simulate one single-threaded worker": (SIMULATE, ["1"], False),
        "simulate gesim policy (workers)": (SIMULATE, ["auto"], True),
    }
    load0 = os.getloadavg()
    raw = {k: [] for k in cases}
    for _ in range(args.repeats):
        for name, (code, a, policy) in cases.items():
            raw[name].append(run(code, a, policy))
    med = {k: statistics.median(d["s_per_step"] if "s_per_step" in d else d["s"] for d in r) for k, r in raw.items()}
    result = {
        "load_average_before": load0, "load_average_after": os.getloadavg(), "cpus": os.cpu_count(),
        "available_cpus": threads.available_cpus(), "repeats": args.repeats, "raw": raw, "median_s": med,
        "gpt_step_speedup": med["gpt_step torch default"] / med["gpt_step gesim policy"],
        "simulate_speedup": med["simulate one single-threaded worker"] / med["simulate gesim policy (workers)"],
        "note": "wall time; the load average says how busy the machine was (2 CPUs: above 2 is a busy machine)"}
    write_json(Path(args.out), result)
    for k, v in med.items():
        print(f"{k}: {v:.4f} s")
    print(f"gpt step x{result['gpt_step_speedup']:.2f}, simulate x{result['simulate_speedup']:.2f} "
          f"(load {load0[0]:.1f}) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

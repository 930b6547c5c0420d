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

``--busy K`` (repeatable; default ``0`` and ``2``) measures every case next to K background
processes of its own making, each one a single-threaded float32 GEMM loop standing in for another
user's job (K = 2 on 2 cores is a fully busy machine), so "quiet" and "busy" are conditions the
bench sets, not whatever the machine happened to be doing; the JSON still records the load average
before and after each condition (other tenants count too).
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

SPIN = """
import torch
torch.set_num_threads(1)
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a)
"""


def run(code: str, args: list[str], policy: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (*threads.ENV, threads.AUTO, "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", (PRELUDE if policy else "") + code, *args], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(cases, repeats) -> dict:
    """Every case ``repeats`` times, round robin, in fresh processes; medians and the two speed-ups."""
    load0 = os.getloadavg()
    raw = {k: [] for k in cases}
    for _ in range(repeats):
        for name, (code, a, policy) in cases.items():
            raw[name].append(run(code, a, policy))
    med = {k: statistics.median(d["s_per_step"] if "s_per_step" in d else d["s"] for d in r) for k, r in raw.items()}
    return {"load_average_before": load0, "load_average_after": os.getloadavg(), "raw": raw, "median_s": med,
            "gpt_step_speedup": med["gpt_step torch default"] / med["gpt_step gesim policy"],
            "simulate_speedup": med["simulate one single-threaded worker"] / med["simulate gesim policy (workers)"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "threads.json"))
    ap.add_argument("--busy", type=int, action="append", metavar="K",
                    help="background single-threaded GEMM loops next to each case (repeatable; default 0 and 2)")
    args = ap.parse_args(argv)
    if any(k < 0 for k in args.busy or []) or args.repeats < 1:
        ap.error("--busy and --repeats take non-negative counts (--repeats at least 1)")
    steps = "5" if args.quick else "20"
    cases = {
        "gpt_step torch default": (GPT_STEP, [steps], False),
        "gpt_step gesim policy": (GPT_STEP, [steps], True),
        "simulate one single-threaded worker": (SIMULATE, ["1"], False),
        "simulate gesim policy (workers)": (SIMULATE, ["auto"], True),
    }
    conditions = {}
    for busy in args.busy or [0, 2]:
        spinners = [subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL) for _ in range(busy)]
        try:
            conditions[f"busy {busy}"] = measure(cases, args.repeats) | {"busy_processes": busy}
        finally:
            for p in spinners:
                p.kill()
                p.wait()
    result = {"cpus": os.cpu_count(), "available_cpus": threads.available_cpus(), "repeats": args.repeats,
              "conditions": conditions,
              "note": "wall time, medians over repeats; 'busy K' = K single-threaded GEMM loops started by the "
                      "bench run next to every case; the load averages say what else the machine was doing "
                      "(2 CPUs: above 2 is a busy machine)"}
    write_json(Path(args.out), result)
    for cond, r in conditions.items():
        print(f"{cond} (load {r['load_average_before'][0]:.1f}): gpt step x{r['gpt_step_speedup']:.2f}, "
              f"simulate x{r['simulate_speedup']:.2f}")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

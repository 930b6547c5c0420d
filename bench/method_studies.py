"""The alignment-tax and mitigation studies over many seeds (issue 12's two tables), fast mode, CPU.

    python bench/method_studies.py tax --seeds 0-10          # bench/results/tax_study.json
    python bench/method_studies.py mitigation --seeds 0-9    # bench/results/mitigation_study.json
    python bench/method_studies.py mitigation --seeds 0-9 --methods dpo   # DPO's chosen only

Each run prints its table as Markdown (means with 95% t intervals over seeds, claims as "k/n")
and writes every per-seed number as JSON. One thread (the studies pin torch to one thread
themselves); about 30 s per seed for the tax study and 10 s per method and seed for the
mitigation study on a quiet core.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: this tree's gesim

RESULTS = Path(__file__).resolve().parent / "results"


def _s(d: dict) -> str:
    from gesim.claims import Spread

    return str(Spread.from_dict(d))


def _k(h: dict) -> str:
    return f"{h['k']}/{h['n']}"


def tax_tables(summary: dict) -> str:
    s = summary
    rows = ["| quantity | mean [95% interval] | claim |", "|---|---|---|",
            f"| SFT reward P(opener = rated) | {_s(s['sft_reward'])} | |",
            f"| AdamW end point step (best validation reward) | {_s(s['end_step'])} | |",
            f"| AdamW end point reward | {_s(s['end_reward'])} | clearly above SFT in {_k(s['reward_rises'])} |",
            f"| end point reward gain | {_s(s['end_reward_gain'])} | |",
            f"| end point tax (SFT suffix NLL, nats/token) | {_s(s['end_tax'])} | tax > 0 in {_k(s['tax_positive'])} |",
            f"| end point pretrain tax (review NLL, nats/token) | {_s(s['end_pretrain_tax'])} | |",
            f"| end point held-out lw change (opener, nats) | {_s(s['end_lw_change'])} | |",
            f"| end point margin change (nats) | {_s(s['end_margin_change'])} | |",
            f"| last step reward | {_s(s['last_reward'])} | gain > 0.05 in {_k(s['last_reward_rises'])} |", "",
            "| method | best reward at tax <= AdamW end point's |", "|---|---|"]
    rows += [f"| {k} | {_s(v)} |" for k, v in s["best_reward_at_tax"].items()]
    rows += ["", "| claim | at | reward difference at equal tax | holds |", "|---|---|---|---|"]
    for key, holds, what in (("avg_vs_es", "avg_beats_es", "averaging > early stopping"),
                             ("hma_vs_avg", "hma_beats_avg", "HMA > averaging (same mean ratio)"),
                             ("omo_vs_adamw", "omo_beats_adamw", "OMO > AdamW (equal tax)")):
        rows += [f"| {what} | {k} | {_s(v)} | {_k(s[holds][k])} |" for k, v in s[key].items()]
    return "\n".join(rows)


def mitigation_table(out: dict) -> str:
    rows = ["| method | dlw (nats) | dll (nats) | ideal fraction (one-pair step) | ideal fraction (batch step) "
            "| margin change (nats) | chosen rises |", "|---|---|---|---|---|---|---|"]
    for m, t in out["table"].items():
        rows.append(f"| {m} | {_s(t['dlw'])} | {_s(t['dll'])} | {_s(t['pair_ideal_fraction'])} | "
                    f"{_s(t['batch_ideal_fraction'])} | {_s(t['margin_change'])} | {_k(out['chosen_rises'][m])} |")
    if "dpo_chosen_falls" in out:
        rows.append(f"\nplain DPO's chosen log-prob falls in {_k(out['dpo_chosen_falls'])} seeds")
    return "\n".join(rows)


def _one_seed(seed: int, methods: tuple, overrides: dict) -> dict:
    from gesim.methods.mitigation import mitigation_study

    return mitigation_study([seed], methods=methods, **overrides)


def _mitigation_by_seed(seeds, methods, workers: int, parts_dir: Path, overrides: dict) -> dict:
    """One fresh process per seed: the trainer's measurements keep about 0.1-0.4 GB per run alive
    in a process (the probe's tensor hooks), which ran a 10-seed study out of memory. Each seed's
    rows are written to ``parts_dir`` as soon as it finishes (``--from-parts`` merges them)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    parts_dir.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, max_tasks_per_child=1) as pool:
        jobs = {pool.submit(_one_seed, s, methods, overrides): s for s in seeds}
        for job in as_completed(jobs):
            (parts_dir / f"seed-{jobs[job]}.json").write_text(json.dumps(job.result(), default=float))
            print(f"seed {jobs[job]} done", file=sys.stderr, flush=True)
    return _merge(parts_dir, seeds)


def _merge(parts_dir: Path, seeds=None) -> dict:
    """The study from the per-seed files in ``parts_dir`` (those of ``seeds``, or all there)."""
    from gesim.errors import GesimError
    from gesim.methods.mitigation import tabulate

    files = {int(f.stem.split("-", 1)[1]): f for f in parts_dir.glob("seed-*.json")}
    seeds = sorted(files) if seeds is None else list(seeds)
    missing = [s for s in seeds if s not in files]
    if missing or not seeds:
        raise GesimError(f"no per-seed results in {parts_dir} for seeds {missing or 'any'}")
    parts = [json.loads(files[s].read_text()) for s in seeds]
    methods = list(parts[0]["per_seed"])
    if any(list(p["per_seed"]) != methods for p in parts):
        raise GesimError(f"the per-seed files in {parts_dir} were run with different methods")
    per = {m: [row for p in parts for row in p["per_seed"][m]] for m in methods}
    return tabulate(per, seeds, parts[0]["config"] | {"seed": seeds})


def main(argv=None) -> int:
    from gesim import claims
    from gesim.errors import GesimError

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study", choices=("tax", "mitigation"))
    p.add_argument("--seeds", default="0-9", help="e.g. 0-9 or 0,3,7 (default 0-9)")
    p.add_argument("--methods", default=None, help="mitigation study: comma-separated methods (default all)")
    p.add_argument("--lr", type=float, default=None, help="mitigation study: the preference lr (default: its config's)")
    p.add_argument("--steps", type=int, default=None, help="mitigation study: preference steps (default: its config's)")
    p.add_argument("--workers", type=int, default=1, help="mitigation study: seeds run in parallel (default 1)")
    p.add_argument("--from-parts", action="store_true",
                   help="mitigation study: merge the per-seed files already written next to --out (no new runs)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/<study>_study.json)")
    args = p.parse_args(argv)
    try:
        seeds = claims.parse_seeds(args.seeds)
        if args.study == "tax":
            from gesim.methods.tax import tax_study

            out = tax_study(seeds=seeds, progress=True)
            text = tax_tables(out["summary"])
        else:
            from gesim.methods.mitigation import METHODS

            methods = tuple(args.methods.split(",")) if args.methods else METHODS
            overrides = {k: v for k, v in (("lr", args.lr), ("pref_steps", args.steps)) if v is not None}
            path = Path(args.out) if args.out else RESULTS / "mitigation_study.json"
            parts = path.with_suffix(".parts")
            out = _merge(parts) if args.from_parts else _mitigation_by_seed(seeds, methods, args.workers, parts,
                                                                                 overrides)
            text = mitigation_table(out)
    except GesimError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = Path(args.out) if args.out else RESULTS / f"{args.study}_study.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out | {"command": " ".join(["python bench/method_studies.py"] + sys.argv[1:]),
                                      "tables": text}, indent=1, default=float))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

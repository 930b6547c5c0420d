"""Run one benchmark several whole times and report every ratio as a distribution over the runs.

    python bench/repeat.py --runs 5 --check 'fast_over_floor<=1.5' \\
        -- python bench/probe.py --only tokens --token-settings 8192x32,50257x32 --token-reps 9

On a shared virtual machine the same code's ratio to its floor moves by 15-30% from one run to the
next (measured: the token Gram at V 8192, T 32 read 1.09 in one quiet run and 1.60 in the next),
more than the medians of repetitions *inside* a run can show, because the state a run starts in
(caches, the host's other tenants, the CPU's clock) is shared by all its repetitions. So a verdict
near a threshold rests on several whole runs: each ratio is reported as its median, range and mean
with its 95% t interval over the runs (:func:`gesim.claims.spread`), and each ``--check`` as
"holds in k/n runs" (:func:`gesim.claims.holds`).

The command is run ``--runs`` times, one after the other, each with ``--out <tmp>/run_<i>.json``
appended (every script in ``bench/`` takes ``--out``); the machine's load average is recorded before
each run. A ratio is a numeric leaf whose key contains ``_over_`` (``fast_over_floor``,
``loop_over_fast``, ...); list entries are named by their identifying fields (``V``, ``T``, ``B``,
``name``, ...) so that the same setting lines up across runs. Writes ``--out`` (atomically) with the
command, the per-run loads, and per ratio: values, median, min, max, the spread, and the checks.
A failed run stops the whole repeat with its exit status (no summary over fewer runs than asked).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gesim.claims import holds, spread  # noqa: E402
from gesim.output import write_json  # noqa: E402

ID_FIELDS = ("name", "setting", "model", "policy", "dtype", "V", "T", "B", "tokens", "size")
CHECK = re.compile(r"^\s*([A-Za-z0-9_.\[\]=,*]+?)\s*(<=|>=|<|>)\s*([0-9.eE+-]+)\s*$")


def ratios(obj, path="") -> dict:
    """{path: value} of every numeric leaf whose key contains ``_over_``."""
    out = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            sub = f"{path}.{key}" if path else str(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "_over_" in str(key):
                out[sub] = float(value)
            elif isinstance(value, (dict, list)):
                out.update(ratios(value, sub))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            label = str(i)
            if isinstance(value, dict):
                ids = [f"{f}={value[f]}" for f in ID_FIELDS if isinstance(value.get(f), (str, int, float))]
                label = ",".join(ids) or label
            out.update(ratios(value, f"{path}[{label}]"))
    return out


def parse_check(text: str):
    """``'fast_over_floor<=1.5'`` -> (key pattern, op, bound); the pattern matches the end of a ratio's
    path (``*`` is a wildcard), so ``all_params.fast_over_floor`` or ``fast_over_floor`` both work."""
    m = CHECK.match(text)
    if not m:
        raise ValueError(f"--check {text!r}: expected KEY<=NUMBER (or <, >=, >), e.g. 'fast_over_floor<=1.5'")
    key, op, bound = m.groups()
    pattern = re.compile(r"(^|\.)" + re.escape(key).replace(r"\*", ".*") + "$")
    return text.strip(), pattern, op, float(bound)


OPS = {"<=": lambda a, b: a <= b, "<": lambda a, b: a < b, ">=": lambda a, b: a >= b, ">": lambda a, b: a > b}


def summarise(runs: list[dict], checks) -> dict:
    """Per ratio path present in every run: its values over the runs and their summary."""
    paths = [p for p in runs[0] if all(p in r for r in runs)]
    out = {}
    for path in paths:
        values = [r[path] for r in runs]
        finite = all(math.isfinite(v) for v in values)
        entry = {"values": values, "median": statistics.median(values), "min": min(values),
                 "max": max(values), "spread": spread(values).as_dict() if finite else None}
        for text, pattern, op, bound in checks:
            if pattern.search(path):
                entry.setdefault("checks", {})[text] = holds([OPS[op](v, bound) for v in values]).as_dict()
        out[path] = entry
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("bench/repeat.py: give the benchmark command after '--' "
              "(e.g. -- python bench/probe.py --only tokens)", file=sys.stderr)
        return 2
    cut = argv.index("--")
    own, command = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="whole runs of the command (default 3)")
    ap.add_argument("--check", action="append", default=[], metavar="KEY<=X",
                    help="a threshold to count over the runs, e.g. 'fast_over_floor<=1.5' (repeatable)")
    ap.add_argument("--out", required=True, help="summary JSON path")
    args = ap.parse_args(own)
    if args.runs < 2:
        print(f"bench/repeat.py: --runs {args.runs}: a spread needs at least 2 runs", file=sys.stderr)
        return 2
    if not command:
        print("bench/repeat.py: the command after '--' is empty", file=sys.stderr)
        return 2
    try:
        checks = [parse_check(c) for c in args.check]
    except ValueError as err:
        print(f"bench/repeat.py: {err}", file=sys.stderr)
        return 2
    loads, found = [], []
    with tempfile.TemporaryDirectory(prefix="gesim-repeat-") as tmp:
        for i in range(args.runs):
            loads.append(os.getloadavg()[0])
            path = Path(tmp) / f"run_{i}.json"
            print(f"run {i + 1}/{args.runs}: {' '.join(command)}", file=sys.stderr, flush=True)
            rc = subprocess.call([*command, "--out", str(path)])
            if rc != 0:
                print(f"bench/repeat.py: run {i + 1} exited with status {rc}; no summary written", file=sys.stderr)
                return rc
            try:
                found.append(ratios(json.loads(path.read_text())))
            except (OSError, json.JSONDecodeError) as err:
                print(f"bench/repeat.py: run {i + 1} wrote no readable JSON at --out ({err})", file=sys.stderr)
                return 1
            if i == 0:  # refuse a useless repeat after the first run, not after all of them
                if not found[0]:
                    print("bench/repeat.py: the command's JSON has no ratio (no key containing '_over_')",
                          file=sys.stderr)
                    return 1
                unmatched = [c[0] for c in checks if not any(c[1].search(p) for p in found[0])]
                if unmatched:
                    print(f"bench/repeat.py: --check {', '.join(unmatched)} matched no ratio of the command's "
                          "JSON", file=sys.stderr)
                    return 2
    summary = summarise(found, checks)
    write_json(args.out, {"command": command, "runs": args.runs, "load_average_before_each_run": loads,
                          "note": __doc__.split("\n\n")[1].replace("\n", " "), "ratios": summary})
    for path, e in summary.items():
        line = f"{path}: median {e['median']:.3g} [{e['min']:.3g}, {e['max']:.3g}]"
        for text, verdict in e.get("checks", {}).items():
            line += f"  {text}: {verdict['k']}/{verdict['n']} runs"
        print(line)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

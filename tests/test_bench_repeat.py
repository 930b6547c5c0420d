"""bench/repeat.py: whole runs of a benchmark summarised as distributions (a fake benchmark stands in)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

FAKE = '''
import argparse, json, sys
from pathlib import Path
ap = argparse.ArgumentParser(); ap.add_argument("--out"); ap.add_argument("--fail", action="store_true")
a = ap.parse_args()
if a.fail:
    sys.exit(3)
counter = Path(sys.argv[0]).with_suffix(".n")
i = int(counter.read_text()) if counter.exists() else 0
counter.write_text(str(i + 1))
json.dump({"rows": [{"V": 512, "T": 32, "all_params": {"fast_over_floor": [1.2, 1.6, 1.4][i % 3], "fast_cpu_s": 0.1}},
                    {"V": 50257, "T": 32, "all_params": {"fast_over_floor": 1.45}}],
           "loop_over_fast": 10.0 + i}, open(a.out, "w"))
'''


def _repeat():
    path = Path(__file__).resolve().parents[1] / "bench" / "repeat.py"
    spec = importlib.util.spec_from_file_location("bench_repeat", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_bench.py"
    script.write_text(FAKE)
    return [sys.executable, str(script)]


def test_repeat_summarises_each_ratio_over_whole_runs_and_counts_checks(fake, tmp_path, capsys):
    out = tmp_path / "summary.json"
    rc = _repeat().main(["--runs", "3", "--check", "fast_over_floor<=1.5", "--out", str(out), "--", *fake])
    assert rc == 0
    got = json.loads(out.read_text())
    r = got["ratios"]
    small = r["rows[V=512,T=32].all_params.fast_over_floor"]
    assert small["values"] == [1.2, 1.6, 1.4]
    assert small["median"] == 1.4 and small["min"] == 1.2 and small["max"] == 1.6
    assert small["spread"]["mean"] == pytest.approx(1.4) and small["spread"]["lo"] < 1.4 < small["spread"]["hi"]
    assert small["checks"]["fast_over_floor<=1.5"] == {"k": 2, "n": 3, "per_seed": [True, False, True]}
    assert r["rows[V=50257,T=32].all_params.fast_over_floor"]["checks"]["fast_over_floor<=1.5"]["k"] == 3
    assert r["loop_over_fast"]["values"] == [10.0, 11.0, 12.0] and "checks" not in r["loop_over_fast"]
    assert not any("fast_cpu_s" in p for p in r)  # only ratios
    assert len(got["load_average_before_each_run"]) == 3
    assert "2/3 runs" in capsys.readouterr().out


@pytest.mark.parametrize("args, rc, says", [
    (["--runs", "2"], 3, "exited with status 3"),
    (["--runs", "1"], 2, "at least 2 runs"),
    (["--runs", "2", "--check", "nothing_over_x<=1"], 2, "matched no ratio"),
    (["--runs", "2", "--check", "fast_over_floor<="], 2, "expected KEY<=NUMBER"),
])
def test_repeat_refuses_bad_input_and_failed_runs_with_one_line(fake, tmp_path, capsys, args, rc, says):
    out = tmp_path / "summary.json"
    cmd = [*fake, "--fail"] if rc == 3 else fake
    assert _repeat().main([*args, "--out", str(out), "--", *cmd]) == rc
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert not out.exists()


def test_repeat_without_a_command_is_refused(tmp_path, capsys):
    assert _repeat().main(["--runs", "2", "--out", str(tmp_path / "s.json")]) == 2
    assert "after '--'" in capsys.readouterr().err

"""Every command, a table of bad inputs: exit code 2, exactly one line on stderr, no traceback.

The cases run in-process (``gesim.cli.main`` and the figure runner's ``main``, stderr captured)
so the table stays fast; none of them trains or draws: each must be refused before the work.
A few run as real subprocesses to check the entry points themselves. Each case also names a
fragment the message must contain (what the user typed: the path, the value, the flag).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gesim.cli import main as gesim_main
from gesim.figures.__main__ import main as figures_main

REGIME = ["regime", "--loss", "dpo", "--lw", "-5", "--ll", "-6", "--ip", "1", "--nw2", "2", "--nl2", "3"]
SIM = ["simulate", "--instances", "20", "--steps", "2"]

# Paths no user can write to, root included: /sys refuses new files, /proc refuses new folders.
UNWRITABLE_FILE = "/sys/gesim-out.csv"
UNWRITABLE_DIR = "/proc/gesim-nowhere/run"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    from gesim.probe import toy

    root = tmp_path_factory.mktemp("bad_input")
    toy.save_tiny_model(root / "model", d=16)
    toy.write_toy_pairs(root / "pairs.jsonl", n=3)
    (root / "a_file.txt").write_text("not a folder\n")
    (root / "empty_dir").mkdir()
    (root / "out_dir").mkdir()
    (root / "broken.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": \n')
    (root / "fields.jsonl").write_text(json.dumps({"prompt": "a", "text": "b"}) + "\n")
    (root / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}\n'.encode("latin-1"))
    return root


def probe(model="{model}", data="{pairs}", *extra):
    return ["probe", "--model", model, "--data", data, *extra]


# (id, entry point, argv with {placeholders} for fixture paths, a fragment the one line must contain)
CASES = [
    # conditions
    ("conditions-unknown-loss", "gesim", ["conditions", "--loss", "nope"], "unknown loss 'nope'"),
    ("conditions-bad-format", "gesim", ["conditions", "--format", "html"], "invalid choice: 'html'"),
    ("conditions-unknown-flag", "gesim", ["conditions", "--colour"],
     "python -m gesim conditions: error: unrecognized arguments: --colour"),
    # regime
    ("regime-unknown-loss", "gesim", ["regime", "--loss", "dpx", *REGIME[3:]], "did you mean 'dpo'"),
    ("regime-unknown-param", "gesim", [*REGIME, "--param", "gamma=1"], "unknown parameter"),
    ("regime-param-out-of-range", "gesim", [*REGIME, "--param", "beta=-1"], "out of range"),
    ("regime-param-no-value", "gesim", [*REGIME, "--param", "beta"], "NAME=VALUE, got beta"),
    ("regime-param-not-number", "gesim", [*REGIME, "--param", "beta=abc"], "not a number: abc"),
    ("regime-negative-nw2", "gesim", [*REGIME[:-4], "--nw2", "-2", "--nl2", "3"], "cannot be negative, got -2"),
    ("regime-negative-nl2", "gesim", [*REGIME[:-2], "--nl2", "-1"], "nl2 is a squared norm"),
    ("regime-cauchy-schwarz", "gesim", [*REGIME[:-6], "--ip", "9", "--nw2", "2", "--nl2", "3"],
     "impossible geometry"),
    ("regime-lw-nan", "gesim", ["regime", "--loss", "dpo", "--lw", "nan", *REGIME[5:]], "must be a finite number"),
    ("regime-ll-inf", "gesim", [*REGIME[:5], "--ll", "inf", *REGIME[7:]], "got inf"),
    ("regime-lw-not-number", "gesim", ["regime", "--loss", "dpo", "--lw", "abc", *REGIME[5:]], "not a number: abc"),
    ("regime-lw-positive", "gesim", ["regime", "--loss", "dpo", "--lw", "0.5", *REGIME[5:]], "must be <= 0, got 0.5"),
    ("regime-ll-positive", "gesim", [*REGIME[:5], "--ll", "1", *REGIME[7:]], "ll is a summed log-probability"),
    ("regime-lw-ref-positive", "gesim", [*REGIME, "--lw-ref", "2"], "lw_ref is a summed log-probability"),
    ("regime-ll-ref-positive", "gesim", [*REGIME, "--ll-ref", "0.1"], "got 0.1"),
    ("regime-len-w-zero", "gesim", [*REGIME, "--len-w", "0"], "len_w is a response length in tokens and must be > 0"),
    ("regime-len-l-negative", "gesim", [*REGIME, "--len-l", "-3"], "got -3"),
    ("regime-eta-zero", "gesim", [*REGIME, "--eta", "0"], "argument --eta: must be > 0, got 0"),
    ("regime-eta-negative", "gesim", [*REGIME, "--eta", "-1"], "must be > 0, got -1"),
    ("regime-eta-nan", "gesim", [*REGIME, "--eta", "nan"], "must be a finite number, got nan"),
    ("regime-overflow", "gesim", [*REGIME[:7], "--ip", "1e200", "--nw2", "1e200", "--nl2", "1e201", "--eta", "1e300"],
     "overflowed to inf/NaN in float64"),
    ("regime-overflow-from-log-prob", "gesim", ["regime", "--loss", "ipo", "--lw", "-1e308", *REGIME[5:]],
     "(the largest is --lw -1e+308)"),
    ("regime-lw-minus-inf", "gesim", ["regime", "--loss", "dpo", "--lw", "-inf", *REGIME[5:]],
     "argument --lw: must be a finite number, got -inf"),
    ("regime-loss-without-symbolic", "gesim", ["regime", "--loss", "aot", *REGIME[3:]], "not supported"),
    ("regime-missing-ip", "gesim", REGIME[:-6] + REGIME[-4:], "--ip"),
    ("regime-bad-format", "gesim", [*REGIME, "--format", "xml"], "invalid choice: 'xml'"),
    # simulate
    ("simulate-unknown-policy", "gesim", [*SIM, "--policy", "nope"], "invalid choice: 'nope'"),
    ("simulate-unknown-rule", "gesim", [*SIM, "--rule", "pngdx"], "invalid choice: 'pngdx'"),
    # --optimizer: the deprecated name of --rule
    ("simulate-unknown-optimizer", "gesim", [*SIM, "--optimizer", "pngdx"], "invalid choice: 'pngdx'"),
    ("simulate-unknown-loss", "gesim", [*SIM, "--loss", "dpoo"], "unknown loss 'dpoo'"),
    ("simulate-eta-zero", "gesim", [*SIM, "--eta", "0"], "argument --eta: must be > 0"),
    ("simulate-eta-negative", "gesim", [*SIM, "--eta", "-0.1"], "got -0.1"),
    ("simulate-steps-zero", "gesim", ["simulate", "--steps", "0"], "argument --steps: must be a positive integer"),
    ("simulate-instances-negative", "gesim", ["simulate", "--instances", "-5"], "argument --instances"),
    ("simulate-suffix-not-integers", "gesim", [*SIM, "--suffix", "1,x"], "got 1,x"),
    ("simulate-suffix-negative", "gesim", [*SIM, "--suffix", "-2"], "suffix lengths must be integers >= 0"),
    ("simulate-single-token-suffix", "gesim", [*SIM, "--policy", "single_token", "--suffix", "4"], "--suffix 0"),
    ("simulate-vocab-zero", "gesim", [*SIM, "--vocab", "0"], "argument --vocab"),
    ("simulate-param-out-of-range", "gesim", [*SIM, "--param", "beta=-1"], "out of range"),
    ("simulate-seed-not-integer", "gesim", [*SIM, "--seed", "abc"], "argument --seed"),
    # transformer: every case is refused before SFT starts
    ("transformer-unknown-structure", "gesim", ["transformer", "--structure", "nope"], "invalid choice: 'nope'"),
    # --dataset: the deprecated name of --structure
    ("transformer-unknown-dataset", "gesim", ["transformer", "--dataset", "nope"], "invalid choice: 'nope'"),
    ("transformer-unknown-loss", "gesim", ["transformer", "--loss", "nope"], "unknown loss 'nope'"),
    ("transformer-param-out-of-range", "gesim", ["transformer", "--param", "beta=-1"], "out of range"),
    ("transformer-steps-zero", "gesim", ["transformer", "--steps", "0"], "argument --steps: must be a positive"),
    ("transformer-lr-zero", "gesim", ["transformer", "--lr", "0"], "argument --lr: must be > 0"),
    ("transformer-lr-nan", "gesim", ["transformer", "--lr", "nan"], "argument --lr: must be a finite number"),
    ("transformer-checkpoint-every-zero", "gesim", ["transformer", "--checkpoint-every", "0"],
     "argument --checkpoint-every"),
    ("transformer-out-is-a-file", "gesim", ["transformer", "--out", "{root}/a_file.txt"],
     "a_file.txt: is a file, not a folder"),
    ("transformer-out-unwritable", "gesim", ["transformer", "--out", UNWRITABLE_DIR], "cannot write in /proc"),
    ("transformer-out-under-a-file", "gesim", ["transformer", "--out", "{root}/a_file.txt/run"], "is a file, not a"),
    ("transformer-resume-without-out", "gesim", ["transformer", "--resume"], "--resume needs --out"),
    ("transformer-resume-empty-dir", "gesim", ["transformer", "--out", "{root}/empty_dir", "--resume"],
     "nothing to resume in"),
    ("transformer-unknown-arch", "gesim", ["transformer", "--arch", "llama"], "invalid choice: 'llama'"),
    ("transformer-unknown-optimizer", "gesim", ["transformer", "--optimizer", "lion"], "invalid choice: 'lion'"),
    # probe: path and argument errors before the model loads, data errors before it too
    ("probe-missing-model-flag", "gesim", ["probe", "--data", "{pairs}"], "--model"),
    ("probe-model-not-a-dir", "gesim", probe("{root}/no_model"), "no_model: not a directory"),
    ("probe-model-not-a-model", "gesim", probe("{root}/empty_dir"), "cannot load model and tokenizer"),
    ("probe-data-missing", "gesim", probe("{model}", "{root}/none.jsonl"), "data file not found"),
    ("probe-data-malformed-jsonl", "gesim", probe("{root}/empty_dir", "{root}/broken.jsonl"), "broken.jsonl:2"),
    ("probe-data-missing-fields", "gesim", probe("{root}/empty_dir", "{root}/fields.jsonl"), "no usable preference"),
    ("probe-data-not-utf8", "gesim", probe("{root}/empty_dir", "{root}/latin1.jsonl"), "not UTF-8"),
    ("probe-data-unknown-format", "gesim", probe("{model}", "{root}/a_file.txt"), "unknown data format"),
    ("probe-out-is-a-dir", "gesim", probe("{model}", "{pairs}", "--out", "{root}/out_dir"), "out_dir: is a folder"),
    ("probe-out-unwritable", "gesim", probe("{model}", "{pairs}", "--out", UNWRITABLE_FILE), "cannot write in /sys"),
    ("probe-out-under-a-file", "gesim", probe("{model}", "{pairs}", "--out", "{root}/a_file.txt/o.csv"),
     "is a file, not a folder"),
    ("probe-token-gram-negative", "gesim", probe("{model}", "{pairs}", "--token-gram", "-3"),
     "argument --token-gram: must be an integer >= 0, got -3"),
    ("probe-batch-size-zero", "gesim", probe("{model}", "{pairs}", "--batch-size", "0"), "argument --batch-size"),
    ("probe-max-length-negative", "gesim", probe("{model}", "{pairs}", "--max-length", "-1"),
     "argument --max-length"),
    ("probe-params-bad-regex", "gesim", probe("{model}", "{pairs}", "--select", "(attn"), "--select (attn: not"),
    ("probe-params-match-nothing", "gesim", probe("{model}", "{pairs}", "--select", "^nothing_here$"),
     "--select ^nothing_here$: selects no parameter"),
    ("probe-unknown-loss", "gesim", probe("{model}", "{pairs}", "--loss", "dpx"), "unknown loss 'dpx'"),
    ("probe-loss-without-per-pair-weights", "gesim", probe("{model}", "{pairs}", "--loss", "aot"), "not supported"),
    ("simulate-loss-without-per-pair-weights", "gesim", [*SIM, "--loss", "aot"], "not supported"),
    ("transformer-loss-without-per-pair-weights", "gesim", ["transformer", "--loss", "aot"], "not supported"),
    ("conditions-loss-without-per-pair-weights", "gesim", ["conditions", "--loss", "aot"], "not supported"),
    ("probe-unknown-dtype", "gesim", probe("{model}", "{pairs}", "--dtype", "float16"), "invalid choice: 'float16'"),
    ("probe-unknown-backend", "gesim", probe("{model}", "{pairs}", "--backend", "magic"), "invalid choice: 'magic'"),
    # the figure runner: refused before any figure is computed
    ("figures-outdir-is-a-file", "figures", ["--only", "condition_phase_diagram", "--outdir", "{root}/a_file.txt"],
     "--outdir {root}/a_file.txt: is a file, not a folder"),
    ("figures-outdir-unwritable", "figures", ["--only", "condition_phase_diagram", "--outdir", UNWRITABLE_DIR],
     "cannot write in /proc"),
    ("figures-outdir-unwritable-folder", "figures", ["--only", "condition_phase_diagram", "--outdir", "/sys"],
     "cannot write in /sys"),
    ("figures-unknown-figure", "figures", ["--only", "no_such_figure*"], "no figure matches 'no_such_figure*'"),
    ("figures-unknown-mode", "figures", ["--mode", "slow"], "invalid choice: 'slow'"),
    ("figures-seed-not-integer", "figures", ["--seed", "abc"], "argument --seed"),
    ("figures-unknown-device", "figures", ["--device", "tpu"], "invalid choice: 'tpu'"),
    ("figures-unknown-flag", "figures", ["--colour"], "unrecognized arguments: --colour"),
    ("figures-jobs-zero", "figures", ["--only", "condition_phase_diagram", "--jobs", "0"],
     "argument --jobs: must be a positive integer, got 0"),
    ("figures-jobs-not-integer", "figures", ["--jobs", "two"], "argument --jobs"),
]
ENTRY = {"gesim": (gesim_main, "python -m gesim"), "figures": (figures_main, "python -m gesim.figures")}


def _fill(argv, paths):
    values = {"root": str(paths), "model": str(paths / "model"), "pairs": str(paths / "pairs.jsonl")}
    return [a.format(**values) for a in argv]


def _call(entry, argv):
    try:
        return entry(argv)
    except SystemExit as stop:  # argparse usage errors
        return stop.code


def test_the_table_covers_every_command_with_at_least_60_cases():
    commands = {argv[0] if entry == "gesim" else "figures" for _, entry, argv, _ in CASES}
    assert commands == {"conditions", "regime", "simulate", "transformer", "probe", "figures"}
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_no_traceback(case, paths, capsys, one_thread):
    _, entry_name, argv, fragment = case
    if any(a.startswith(("/proc", "/sys")) for a in argv) and not sys.platform.startswith("linux"):
        pytest.skip("the unwritable paths of this case are Linux's /proc and /sys")
    entry, prog = ENTRY[entry_name]
    code = _call(entry, _fill(argv, paths))
    out = capsys.readouterr()
    lines = out.err.strip("\n").splitlines()
    assert code == 2, out.err
    assert len(lines) == 1, out.err
    assert "Traceback" not in out.err
    assert lines[0].startswith(f"{prog}"), lines[0]  # one prefix style: "PROG [COMMAND]: error: ..."
    assert ": error: " in lines[0] and "0x" not in lines[0]  # no object reprs
    assert _fill([fragment], paths)[0] in lines[0], lines[0]


def test_device_cuda_without_cuda_is_refused_before_any_work(paths, capsys, monkeypatch):
    if _cuda():
        pytest.skip("a CUDA device is present")
    import gesim.cli.probe_run as runner
    import gesim.transformer.train as train

    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    assert _call(gesim_main, ["transformer", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert _call(gesim_main, _fill(probe("{model}", "{pairs}", "--device", "cuda"), paths)) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_resume_with_an_empty_folder_never_trains(paths, capsys, monkeypatch):
    import gesim.transformer.train as train

    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("trained although nothing could be resumed"))
    assert _call(gesim_main, ["transformer", "--out", str(paths / "empty_dir"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


@pytest.mark.parametrize("args,fragment", [
    (["-m", "gesim", "regime", "--loss", "dpo", "--lw", "0.5", *REGIME[5:]], "python -m gesim regime: error: lw"),
    (["-m", "gesim.figures", "--outdir", "/etc/passwd"], "python -m gesim.figures: error: --outdir /etc/passwd"),
    (["-m", "gesim", "simulate", "--steps", "0"], "python -m gesim simulate: error: argument --steps"),
])
def test_entry_points_as_processes(args, fragment):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and fragment in proc.stderr


def test_figures_help_begins_with_usage_and_a_whole_sentence():
    proc = subprocess.run([sys.executable, "-m", "gesim.figures", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m gesim.figures")
    assert "\nRegenerate gesim's figures" in proc.stdout


POINT = {"lw": -5.0, "ll": -6.0, "ip": 1.0, "nw2": 2.0, "nl2": 3.0}


@pytest.mark.parametrize("change,fragment", [
    ({"lw": 0.5}, "lw is a summed log-probability and must be <= 0, got 0.5"),
    ({"ll_ref": 2.0}, "ll_ref is a summed log-probability and must be <= 0, got 2"),
    ({"len_w": -3.0}, "len_w is a response length in tokens and must be > 0, got -3"),
    ({"nl2": -1.0}, "nl2 is a squared norm and cannot be negative, got -1"),
    ({"eta": -0.1}, "eta is a step size and must be > 0 and finite, got -0.1"),
])
def test_the_python_api_refuses_what_the_cli_refuses(change, fragment):
    from gesim import dynamics
    from gesim.errors import GesimError

    with pytest.raises(GesimError, match=fragment.replace("(", r"\(")):
        dynamics.evaluate("dpo", **{**POINT, **change})
    with pytest.raises(GesimError, match="must be|cannot be"):
        dynamics.predict("simpo", **{**POINT, **change})


def test_the_simulator_refuses_a_non_positive_step_size():
    from gesim.errors import GesimError
    from gesim.simulate import SimConfig, simulate

    for eta in (0.0, -1.0, float("nan")):
        with pytest.raises(GesimError, match="eta is a step size and must be > 0"):
            simulate(SimConfig(eta=eta, instances=2, steps=1))


def test_negative_numbers_in_exponent_form_are_values_not_options(capsys):
    assert gesim_main(["regime", "--loss", "dpo", "--lw", "-1e1", "--ll", "-1.2e1", "--ip", "-2.5e-1", "--nw2", "1",
                       "--nl2", "1", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["regime"] == "ideal"


def test_boundary_values_are_accepted(capsys):
    assert gesim_main(["regime", "--loss", "dpo", "--lw", "0", "--ll", "-1", "--ip", "0", "--nw2", "0",
                       "--nl2", "1", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["regime"] in ("ideal", "stalled", "both_down", "both_up")


def test_a_run_that_stays_finite_is_not_called_diverged():
    import numpy as np

    from gesim.cli.simulate import divergence
    from gesim.simulate import SimConfig, simulate

    ok = simulate(SimConfig(instances=20, steps=3, suffix=8)).arrays
    assert divergence(ok) is None
    bad = {k: v.copy() for k, v in ok.items()}
    bad["ll"][2, 5] = -np.inf
    assert divergence(bad) == (2, "ll is inf/NaN")
    zero = {k: v.copy() for k, v in ok.items()}  # a zero gradient with ip = 0: cos undefined, not divergence
    zero["nw2"][1, 0], zero["ip"][1, 0], zero["cos"][1, 0] = 0.0, 0.0, np.nan
    assert divergence(zero) is None


def test_simulate_divergence_is_reported_not_printed(monkeypatch, capsys):
    # The logit-space engine is exact at any step size (eta 1e6 and 1e300 stay finite, below), so
    # a diverged run is injected: one inf log-prob at step 2 must stop the command in one line.
    import numpy as np

    import gesim.simulate as sim

    real = sim.simulate

    def overflowing(cfg, *args, **kwargs):
        res = real(cfg, *args, **kwargs)
        res.arrays["lw"][1, 3] = -np.inf
        return res

    monkeypatch.setattr(sim, "simulate", overflowing)
    assert gesim_main([*SIM, "--suffix", "2"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1
    assert "diverged at step 2 of 2 (suffix 2): lw is inf/NaN" in out.err and "--eta" in out.err


@pytest.mark.parametrize("eta", ["1e6", "1e300"])
def test_simulate_huge_step_prints_only_possible_numbers(eta, capsys):
    assert gesim_main([*SIM, "--eta", eta, "--suffix", "0,2", "--format", "json"]) == 0
    for row in json.loads(capsys.readouterr().out):
        assert -1 <= row["mean_cos"] <= 1
        assert all(0 <= row[k] <= 1 for k in ("p_chosen_down", "p_rejected_up", "regime_agreement"))


def test_transformer_divergence_is_reported_not_printed(monkeypatch, capsys):
    import gesim.transformer.train as train

    history = [{"step": 0, "loss": 0.69, "lw": -4.0, "ll": -5.0, "cos": 0.5},
               {"step": 10, "loss": float("nan"), "lw": float("-inf"), "ll": -5.0, "cos": float("nan")}]
    monkeypatch.setattr(train, "run", lambda *a, **k: {"history": history, "cos_last": float("nan")})
    assert gesim_main(["transformer", "--lr", "10"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1
    assert "diverged" in out.err and "by step 10" in out.err and "--lr 10" in out.err


def test_probe_overflow_is_reported_not_printed(paths, monkeypatch, capsys):
    from gesim.cli import probe_run as runner

    real = runner.measure

    def overflowing(*args, **kwargs):
        rows = real(*args, **kwargs)
        next(r for r in rows if r["index"] == 1)["nw2"] = float("inf")
        return rows

    monkeypatch.setattr(runner, "measure", overflowing)
    out_csv = paths / "never.csv"
    assert gesim_main(probe(str(paths / "model"), str(paths / "pairs.jsonl"), "--out", str(out_csv))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pair 1:" in err and "overflowed" in err and not out_csv.exists()


def test_simulate_progress_in_logs_is_one_line_per_suffix(capsys):
    assert gesim_main(["simulate", "--instances", "10", "--steps", "1", "--suffix", "0,4", "--progress"]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["[1/2] suffix 0", "[2/2] suffix 4"]


def test_output_checks_accept_missing_folders_without_creating_them(tmp_path):
    from gesim.output import atomic_write_text, check_out_dir, check_out_file

    target = tmp_path / "new" / "deeper" / "o.csv"
    assert check_out_file(target) == target and not (tmp_path / "new").exists()
    assert check_out_dir(tmp_path / "runs" / "a") == tmp_path / "runs" / "a" and not (tmp_path / "runs").exists()
    atomic_write_text(target, "x\n")  # the writer creates the folders, as users expect
    assert target.read_text() == "x\n" and check_out_file(target) == target  # overwriting a file is fine
    assert not [p for p in tmp_path.rglob(".gesim-write-check*")]  # the probe file is gone

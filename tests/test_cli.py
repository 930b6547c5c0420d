"""The command line: tables, one-pair regimes, and one clear line for every bad input."""

import json
import shutil
import subprocess
import sys

import pytest

from gesim import losses
from gesim.cli import main

REGIME = ["regime", "--loss", "dpo", "--lw", "-5", "--ll", "-6", "--ip", "1", "--nw2", "2", "--nl2", "3"]


def run(args):
    return subprocess.run([sys.executable, "-m", "gesim", *args], capture_output=True, text=True, timeout=120)


def test_conditions_json_lists_every_loss_with_its_thresholds(capsys):
    assert main(["conditions", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) >= 20 and [r["name"] for r in rows] == losses.names()
    for row in rows:
        assert {"name", "margin", "source", "d_w", "d_l", "chosen_up", "rejected_down"} <= set(row)
    dpo = next(r for r in rows if r["name"] == "dpo")
    assert dpo["chosen_up"] == "ip < nw2" and dpo["rejected_down"] == "ip < nl2"


def test_conditions_text_and_markdown_for_chosen_losses(capsys):
    assert main(["conditions", "--loss", "simpo", "--loss", "cpo", "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    assert "`simpo`" in out and "`cpo`" in out and "`dpo`" not in out
    assert main(["conditions", "--loss", "simpo"]) == 0
    assert "ip < len_l*nw2/len_w" in capsys.readouterr().out


def test_conditions_latex_compiles(tmp_path):
    from gesim import symbolic

    tex = symbolic.table(fmt="latex")
    assert tex.count(r"\begin{longtable}") == 1 and tex.count("{") == tex.count("}")
    assert tex.count(r"\\") >= len(losses.names())
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex not installed: checked structure only")
    (tmp_path / "table.tex").write_text(tex)
    proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "table.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert (tmp_path / "table.pdf").stat().st_size > 1000


def test_regime_json_is_evaluate_plus_loss(capsys):
    assert main([*REGIME, "--param", "beta=0.5", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"loss", "d_w", "d_l", "delta_lw", "delta_ll", "delta_margin", "regime"}
    assert out["loss"] == "dpo" and out["regime"] == "ideal"
    assert out["delta_lw"] == pytest.approx(out["d_w"] * (2 - 1))


@pytest.mark.parametrize("args,message", [
    (["regime", "--loss", "dpx", *REGIME[3:]], "unknown loss 'dpx'"),
    ([*REGIME, "--param", "gamma=1"], "unknown parameter"),
    ([*REGIME, "--param", "beta=-1"], "out of range"),
    ([*REGIME, "--param", "beta"], "NAME=VALUE"),
    (["regime", "--loss", "dpo", "--lw", "-5", "--ll", "-6", "--ip", "1", "--nw2", "-2", "--nl2", "3"],
     "cannot be negative"),
    (["regime", "--loss", "dpo", "--lw", "-5", "--ll", "-6", "--ip", "9", "--nw2", "2", "--nl2", "3"],
     "impossible geometry"),
    (["regime", "--loss", "dpo", "--lw", "nan", "--ll", "-6", "--ip", "1", "--nw2", "2", "--nl2", "3"],
     "must be a finite number"),
    ([*REGIME, "--len-w", "0"], "must be > 0"),
    (["regime", "--loss", "aot", *REGIME[3:]], "not supported"),
    (["conditions", "--loss", "nope"], "unknown loss 'nope'"),
    (["conditions", "--format", "html"], "invalid choice"),
])
def test_bad_input_gets_one_line_and_exit_code_2(args, message):
    proc = run(args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr


def test_every_command_has_help(capsys):
    from gesim.cli import COMMANDS

    for cmd in COMMANDS:
        with pytest.raises(SystemExit) as stop:
            main([cmd, "--help"])
        out = capsys.readouterr().out
        assert stop.value.code == 0 and out.startswith(f"usage: python -m gesim {cmd}"), cmd

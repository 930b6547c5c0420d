"""The figure runner and the phase diagram figure."""

import json

import numpy as np
import pytest

from gesim import figures
from gesim.figures.__main__ import main
from gesim.figures.conditions import phase_grid


def test_phase_diagram_writes_png_pdf_and_json_with_provenance(tmp_path):
    assert main(["--only", "condition_phase_diagram", "--outdir", str(tmp_path), "--seed", "3"]) == 0
    for ext in ("png", "pdf", "json"):
        assert (tmp_path / f"condition_phase_diagram.{ext}").stat().st_size > 1000
    meta = json.loads((tmp_path / "condition_phase_diagram.json").read_text())
    assert meta["mode"] == "fast" and meta["seed"] == 3 and "numpy" in meta["versions"]
    assert meta["wall_time_s"] >= 0 and set(meta["data"]["losses"]) >= {"dpo", "simpo", "cpo"}
    fr = meta["data"]["losses"]["dpo"]["fractions"]
    assert sum(fr.values()) == pytest.approx(1.0) and fr["both_down"] > 0 and fr["both_up"] > 0


def test_phase_grid_matches_the_dpo_closed_form():
    cos, rho, codes = phase_grid("dpo", 61)
    C, R = np.meshgrid(cos, rho)
    identical = (C == 1) & (R == 1)  # g_w = g_l: nothing moves
    ideal = (C * R <= R**2) & (C * R <= 1) & ~identical  # ip <= nw2 and ip <= nl2 (ties count as ideal)
    both_down = (C * R > R**2) & (C * R < 1)
    assert np.array_equal(codes == 0, ideal)
    assert np.array_equal(codes == 1, both_down)
    assert np.array_equal(codes == 4, identical)


def test_list_and_globs(capsys):
    assert main(["--list"]) == 0
    assert "condition_phase_diagram" in capsys.readouterr().out
    assert [f.name for f in figures.select("condition_*")] == ["condition_phase_diagram"]
    assert main(["--only", "no_such_figure*"]) == 2


def test_figure_seed_depends_on_seed_and_name_only():
    a = figures.Context("x", seed=1).figure_seed
    assert a == figures.Context("x", seed=1, mode="full").figure_seed
    assert a != figures.Context("y", seed=1).figure_seed != figures.Context("x", seed=2).figure_seed


def test_runner_prints_one_line_per_finished_figure_when_stderr_is_not_a_terminal(tmp_path, capsys):
    assert main(["--only", "condition_phase_diagram,first_order_error", "--outdir", str(tmp_path)]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    # two modules run in two workers on a 2-CPU machine: lines come in the order the figures finish
    assert sorted(line.split(":")[0].split("] ")[1] for line in lines) == ["condition_phase_diagram",
                                                                           "first_order_error"]
    assert [line.split("]")[0] for line in lines] == ["[1/2", "[2/2"]
    assert all(str(tmp_path) in line for line in lines)


def test_runner_jobs_give_the_same_figures(tmp_path):
    # one worker and two workers draw the same numbers (each figure's stream is its own)
    import json

    names = "fish_expansion,first_order_error"
    assert main(["--only", names, "--outdir", str(tmp_path / "one"), "--jobs", "1"]) == 0
    assert main(["--only", names, "--outdir", str(tmp_path / "two"), "--jobs", "2"]) == 0
    for name in names.split(","):
        one, two = (json.loads((tmp_path / d / f"{name}.json").read_text())["data"] for d in ("one", "two"))
        assert one == two


def test_outdir_that_is_a_file_is_refused_before_any_figure_is_drawn(tmp_path, capsys, monkeypatch):
    import gesim.figures._run as runner

    monkeypatch.setattr(runner, "run_one", lambda *a: pytest.fail("a figure was drawn"))
    (tmp_path / "f").write_text("")
    assert main(["--only", "condition_phase_diagram", "--outdir", str(tmp_path / "f")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_missing_outdir_is_created(tmp_path):
    assert main(["--only", "condition_phase_diagram", "--outdir", str(tmp_path / "a" / "b")]) == 0
    assert (tmp_path / "a" / "b" / "condition_phase_diagram.png").exists()


def test_loss_colours_never_repeat_however_many_losses():
    from gesim import losses, plotting

    colours = [plotting.loss_color(n)[:3] for n in losses.names()]
    assert len(set(colours)) == len(colours)
    endless = [plotting.palette_color(i)[:3] for i in range(1000)]
    assert len(set(endless)) == 1000
    assert plotting.loss_color("not_a_loss") == plotting.loss_color("not_a_loss")


def test_workers_run_under_python_dash_m(tmp_path):
    # spawned workers must find their function outside the package's __main__ (it is not re-imported)
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "gesim.figures", "--only", "fish_expansion,first_order_error",
                           "--jobs", "2", "--outdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert all((tmp_path / f"{n}.json").is_file() for n in ("fish_expansion", "first_order_error"))

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

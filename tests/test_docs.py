"""The docs live in the repository and say what the code does: every section the package cites
exists, every output column is in the glossary, and nothing points outside the repository."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SOURCES = [*sorted((ROOT / "gesim").rglob("*.py")), *sorted((ROOT / "notebooks").glob("*.ipynb")), ROOT / "README.md"]


def _text(path):
    return path.read_text(encoding="utf-8")


def test_docs_exist_and_the_readme_links_them():
    readme = _text(ROOT / "README.md")
    for name in ("theory.md", "glossary.md", "commands.md"):
        assert (DOCS / name).stat().st_size > 2000, name
        assert f"](docs/{name})" in readme, name


def test_no_reference_to_documents_outside_the_repository():
    outside = re.compile(r"shared folder|shared/docs|\.\./seeds|probe\.md|seed-methods\.md|anchors\.md|design\.md")
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in SOURCES for n, line in enumerate(_text(p).splitlines(), 1)
            if outside.search(line)]
    assert hits == []


def _headings():
    """Section numbers of docs/theory.md ("2", "6.4", ...) and its prediction numbers."""
    theory = _text(DOCS / "theory.md")
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", theory, flags=re.M))
    predictions_part = theory.split("## 7.", 1)[1].split("\n## ", 1)[0]
    predictions = set(re.findall(r"^(\d+)\. ", predictions_part, flags=re.M))
    return sections, predictions


def test_every_cited_section_and_prediction_exists():
    sections, predictions = _headings()
    cited = re.compile(r"theory\.md (sections?|predictions?) ((?:\d+(?:\.\d+)?(?:, | and |-)?)+)")
    missing = []
    for path in SOURCES:
        for kind, numbers in cited.findall(_text(path)):
            for number in re.findall(r"\d+(?:\.\d+)?", numbers):
                known = predictions if kind.startswith("prediction") else sections
                if number not in known:
                    missing.append(f"{path.relative_to(ROOT)}: theory.md {kind} {number}")
    assert missing == []
    assert {"1", "2", "3", "4", "5", "6", "7", "8", "6.4", "8.2"} <= sections and len(predictions) >= 12


def _columns():
    from gesim.cli.probe_run import COLUMNS
    from gesim.simulate import FIELDS
    from gesim.transformer.train import SCALARS

    summary_fields = ("structure", "loss", "params", "steps", "sft_loss_first", "sft_loss_last", "cos_first",
                      "cos_last", "cos_mean", "lw_start", "lw_end", "ll_start", "ll_end", "regime_agreement",
                      "pair_agreement", "regimes", "pair_confusion", "batch_confusion", "token_cos_first",
                      "token_cos_last", "history", "config")
    probe_summary = ("pairs", "rows_read", "skipped", "truncated", "pad_token", "processes", "means",
                     "regime_fractions", "token_gram", "mean_cos_chosen", "mean_cos_rejected", "mean_cos_cross",
                     "backend", "fast_refused")
    simulate = ("suffix", "mean_cos", "p_chosen_down", "p_rejected_up", "predicted_regimes", "realised_regimes")
    regime = ("d_w", "d_l", "delta_lw", "delta_ll", "delta_margin", "regime")
    conditions = ("name", "margin", "source", "params", "d_w", "d_l", "k", "chosen_up", "rejected_down")
    figures = ("figure", "description", "mode", "seed", "figure_seed", "device", "gpu", "command", "wall_time_s",
               "versions", "data")
    return {*COLUMNS, *FIELDS, *SCALARS, *summary_fields, *probe_summary, *simulate, *regime, *conditions, *figures}


def test_every_output_column_and_field_is_in_the_glossary():
    glossary = _text(DOCS / "glossary.md")
    missing = sorted(c for c in _columns() if f"`{c}`" not in glossary)
    assert missing == []


@pytest.mark.parametrize("field", ["pair_agreement", "regime_agreement", "ches", "ln_ches"])
def test_the_glossary_explains_the_fields_newcomers_ask_about(field):
    glossary = _text(DOCS / "glossary.md")
    rows = [line for line in glossary.splitlines() if line.startswith(f"| `{field}` |")]
    assert rows and len(rows[0]) > 60, field

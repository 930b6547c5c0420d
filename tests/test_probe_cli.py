"""``python -m gesim probe``: numbers equal two separate backward passes per pair; errors;
sharding over two gloo processes gives the same CSV."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from gesim import data, probe
from gesim.cli import main
from gesim.cli.probe_run import load_model
from gesim.encode import collate, encode_rows
from gesim.probe import toy


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_cli")
    toy.save_tiny_model(root / "model", d=16)
    toy.write_toy_pairs(root / "pairs.jsonl", n=7)
    return root


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cli_json_matches_two_backward_passes_per_pair(tiny, tmp_path, capsys):
    out = tmp_path / "o.csv"
    rc = main(["probe", "--model", str(tiny / "model"), "--data", str(tiny / "pairs.jsonl"), "--out", str(out),
               "--format", "json", "--dtype", "float64", "--batch-size", "3", "--loss", "dpo", "--loss", "simpo",
               "--token-gram", "1"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs"] == 7 and summary["truncated"] == 0 and summary["skipped"] == {}
    assert abs(sum(summary["regime_fractions"]["simpo"].values()) - 1) < 1e-12
    rows = _csv(out)
    assert [int(r["index"]) for r in rows] == list(range(7))
    assert {"ip", "nw2", "nl2", "cos", "ches", "len_w", "len_l", "regime_dpo", "regime_simpo"} <= set(rows[0])
    model, tok = load_model(tiny / "model", "float64")
    pairs = encode_rows(data.read_pairs(tiny / "pairs.jsonl").rows, tok, 512).pairs
    ref = probe.pair_stats(model, collate(pairs), backend="reference")
    for k in ("ip", "nw2", "nl2", "cos", "lw", "ll"):
        got = torch.tensor([float(r[k]) for r in rows], dtype=torch.float64)
        assert float((got - ref[k]).abs().max() / ref[k].abs().max()) < 1e-10, k
    assert (tmp_path / "o.tokengram.npz").exists() and len(summary["token_gram"]) == 1
    assert summary["token_gram"][0]["backend"] == "fast" and "fast_refused" not in summary["token_gram"][0]


def test_cli_text_summary_and_counts(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    rows = toy.toy_rows(3) + [{"prompt": "a"}, {"prompt": "a", "chosen": "", "rejected": "b"}]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["probe", "--model", str(tiny / "model"), "--data", str(bad), "--max-length", "8"]) == 0
    text = capsys.readouterr().out
    assert "pairs 3 of 5 rows" in text and "prompt-only row" in text and "empty chosen response" in text
    assert "truncated" in text and "dpo" in text


@pytest.mark.parametrize("extra,message", [
    (["--loss", "dpoo"], "unknown loss 'dpoo'"),
    (["--select", "("], "--select (: not 'all', 'lora' or a valid regular expression"),
    (["--select", "nomatch"], "selects no parameter"),
])
def test_cli_errors_are_one_line_exit_2(tiny, capsys, extra, message):
    rc = main(["probe", "--model", str(tiny / "model"), "--data", str(tiny / "pairs.jsonl"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and message in err[-1] and err[-1].startswith("python -m gesim probe: error:")


def test_old_params_flag_is_an_alias_of_select(tiny, capsys):
    """``--params`` (the old name) selects exactly what ``--select`` selects."""
    rc = main(["probe", "--model", str(tiny / "model"), "--data", str(tiny / "pairs.jsonl"), "--params", "nomatch"])
    assert rc == 2 and "--select nomatch: selects no parameter" in capsys.readouterr().err


def test_cli_missing_model_dir(tmp_path, capsys):
    rc = main(["probe", "--model", str(tmp_path / "none"), "--data", str(tmp_path / "x.jsonl")])
    assert rc == 2 and "not a directory written by save_pretrained" in capsys.readouterr().err


@pytest.mark.slow
def test_two_gloo_processes_give_the_same_csv(tiny, tmp_path):
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    args = ["--model", str(tiny / "model"), "--data", str(tiny / "pairs.jsonl"), "--batch-size", "2",
            "--format", "json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "gesim", "probe", *args, "--out", str(one)], check=True, env=env,
                   capture_output=True)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", "29533", "-m", "gesim", "probe", *args, "--out", str(two)],
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["processes"] == 2
    a, b = _csv(one), _csv(two)
    assert [r["index"] for r in a] == [r["index"] for r in b]
    for ra, rb in zip(a, b):
        for k in ("ip", "nw2", "nl2", "cos"):
            assert abs(float(ra[k]) - float(rb[k])) <= 1e-5 * abs(float(ra[k])) + 1e-6

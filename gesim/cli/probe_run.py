"""The probe job behind ``python -m gesim probe``: load, read, batch, measure, predict, write.

Sharded under ``torch.distributed`` (env ``WORLD_SIZE`` > 1): rank r takes pairs r, r + K, ...
(gloo on CPU, nccl on CUDA), and rank 0 gathers the rows and writes one CSV and the summary.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

from gesim import data, dynamics, losses, output, regimes
from gesim.encode import buckets, collate, encode_rows
from gesim.errors import GesimError
from gesim.probe import api
from gesim.probe.reference import selected_named

COLUMNS = ("index", "len_w", "len_l", "lw", "ll", "ip", "nw2", "nl2", "cos", "ches", "ln_ches")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def load_model(directory, dtype="float32", device="cpu"):
    """(model, tokenizer) from a save_pretrained directory, offline; a PEFT adapter directory
    (adapter_config.json) loads its base model (also local) with trainable LoRA factors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(directory)
    if not path.is_dir():
        raise GesimError(f"--model {directory}: not a directory written by save_pretrained")
    try:
        if (path / "adapter_config.json").exists():
            from peft import AutoPeftModelForCausalLM
            model = AutoPeftModelForCausalLM.from_pretrained(str(path), is_trainable=True, local_files_only=True,
                                                             dtype=DTYPES[dtype])
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=DTYPES[dtype])
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise GesimError(f"--model {directory}: cannot load model and tokenizer offline ({first})") from None
    if device == "cuda" and not torch.cuda.is_available():
        raise GesimError("--device cuda: no CUDA device is available")
    return model.to(device).eval(), tokenizer


def param_selector(spec: str):
    """'all', 'lora' or a regular expression over parameter names."""
    if spec in ("all", "lora"):
        return spec
    try:
        pattern = re.compile(spec)
    except re.error as err:
        raise GesimError(f"--select {spec}: not 'all', 'lora' or a valid regular expression ({err})") from None
    return lambda name, p: bool(pattern.search(name))


def _dist():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and os.environ.get("GESIM_NCCL") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def measure(model, batches, pad_id, select, backend, device, progress=True):
    """Per-pair dicts (COLUMNS) for lists of EncodedPair batches."""
    from tqdm import tqdm
    rows = []
    for group in tqdm(batches, desc="probe", unit="batch", file=sys.stderr, disable=None if progress else True):
        batch = collate(group, pad_id).to(device)
        st = api.pair_stats(model, batch, select=select, backend=backend)
        ch = api.ches(model, batch)
        len_w, len_l = batch.chosen_mask.sum(1), batch.rejected_mask.sum(1)
        for i, pair in enumerate(group):
            rows.append({"index": pair.index, "len_w": int(len_w[i]), "len_l": int(len_l[i]),
                         **{k: float(st[k][i]) for k in ("lw", "ll", "ip", "nw2", "nl2", "cos")},
                         **{k: float(ch[k][i]) for k in ("ches", "ln_ches")}})
    return rows


def predict_regimes(rows, loss_names):
    """Adds ``regime_<loss>`` to each row (policy = reference: lw_ref = lw, ll_ref = ll)."""
    col = {k: np.array([r[k] for r in rows], float) for k in ("lw", "ll", "ip", "nw2", "nl2", "len_w", "len_l")}
    fractions = {}
    for name in loss_names:
        pred = dynamics.predict(name, lw=col["lw"], ll=col["ll"], ip=col["ip"], nw2=col["nw2"], nl2=col["nl2"],
                                             lw_ref=col["lw"], ll_ref=col["ll"], len_w=col["len_w"],
                                             len_l=col["len_l"], check=False)
        for r, regime in zip(rows, pred["regime"]):
            r[f"regime_{name}"] = str(regime)
        fractions[name] = {k: float(np.mean(pred["regime"] == k)) for k in regimes.REGIMES}
    return fractions


def token_gram_summary(model, pairs, pad_id, select, device, out_path=None):
    """Token Grams (chosen + rejected rows) of the given pairs: mean off-diagonal cosines."""
    summary, arrays = [], {}
    for pair in pairs:
        batch = collate([pair], pad_id).to(device)
        ids, mask = batch.stacked(pad_id)
        gram = api.token_gram(model, ids, mask, select=select)
        C = gram.cos().double().cpu()
        rows = torch.tensor([r for r, _ in gram.index])
        on_w, on_l = rows == 0, rows == 1
        off = lambda M: float((M.sum() - M.diagonal().sum()) / max(M.numel() - len(M), 1))  # noqa: E731
        summary.append({"index": pair.index, "mean_cos_chosen": off(C[on_w][:, on_w]),
                        "mean_cos_rejected": off(C[on_l][:, on_l]),
                        "mean_cos_cross": float(C[on_w][:, on_l].mean()), "backend": gram.backend,
                        **({"fast_refused": gram.why} if gram.why else {})})
        arrays[f"K_{pair.index}"] = gram.K.double().cpu().numpy()
        arrays[f"index_{pair.index}"] = np.array(gram.index)
    if out_path is not None and arrays:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        output.atomic_write_bytes(Path(out_path).with_suffix(".tokengram.npz"), buf.getvalue())
    return summary


def run_probe(args) -> int:
    loss_names = args.loss or ["dpo"]
    for name in loss_names:
        losses.get(name)  # an unknown name gets "did you mean", a batch-coupled loss says why it is unsupported
    rank, world = _dist()
    device = args.device if world == 1 or args.device == "cpu" else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    select = param_selector(args.select)
    read = data.read_pairs(args.data)  # bad data is refused before the model loads
    model, tokenizer = load_model(args.model, args.dtype, device)
    try:
        selected_named(model, select)
    except GesimError:
        names = [n for n, _ in model.named_parameters()][:3]
        raise GesimError(f"--select {args.select}: selects no parameter of the model (names look like "
                         f"{', '.join(names)}, ...)") from None
    enc = encode_rows(read.rows, tokenizer, args.max_length)
    if not enc.pairs:
        raise GesimError(f"{args.data}: every row was skipped ({dict(enc.skipped)})")
    shard = enc.pairs[rank::world]
    rows = measure(model, buckets(shard, args.batch_size), enc.pad_id, select, args.backend, device,
                   progress=rank == 0)
    if world > 1:
        import torch.distributed as dist
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(rows, gathered, dst=0)
        if rank != 0:
            dist.barrier()
            return 0
        rows = [r for part in gathered for r in part]
    rows.sort(key=lambda r: r["index"])
    bad = next((r for r in rows if not all(np.isfinite(r[k]) for k in ("lw", "ll", "ip", "nw2", "nl2"))), None)
    if bad is not None:  # never print an overflowed number as a measurement
        hint = ("try --dtype float32 or float64" if args.dtype == "bfloat16" else
                "the model's outputs are not finite there (check its weights), or try --dtype float64")
        raise GesimError(f"pair {bad['index']}: lw, ll, ip, nw2 or nl2 overflowed to inf/NaN in --dtype {args.dtype}; "
                         f"{hint}")
    fractions = predict_regimes(rows, loss_names)
    first = sorted(enc.pairs, key=lambda p: p.index)[:max(args.token_gram, 0)]
    grams = token_gram_summary(model, first, enc.pad_id, select, device, args.out) if first else []
    if args.out:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(COLUMNS) + [f"regime_{n}" for n in loss_names])
        writer.writeheader()
        writer.writerows({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
        output.atomic_write_text(args.out, buf.getvalue())
    summary = {
        "model": str(args.model), "data": str(args.data), "pairs": len(rows), "rows_read": read.n_read,
        "skipped": {**dict(read.skipped), **dict(enc.skipped)}, "truncated": enc.truncated,
        "prompt_not_prefix": enc.prefix_cut,
        "pad_token": enc.pad_note or "tokenizer pad token", "processes": world,
        "means": {k: float(np.mean([r[k] for r in rows])) for k in ("ip", "nw2", "nl2", "cos", "ches", "ln_ches")},
        "regime_fractions": fractions, "token_gram": grams, "out": args.out,
    }
    if args.format == "json":
        print(json.dumps(output.to_jsonable(summary), indent=2))
    else:
        print(f"pairs {summary['pairs']} of {read.n_read} rows; skipped {summary['skipped'] or 0}; "
              f"truncated {enc.truncated}; prompt not a prefix of prompt + response (trl's rule) {enc.prefix_cut}")
        print("means  " + "  ".join(f"{k} {v:.6g}" for k, v in summary["means"].items()))
        for name, fr in fractions.items():
            print(f"{name:<10} " + "  ".join(f"{k} {v:.3f}" for k, v in fr.items()))
        for g in grams:
            print(f"token gram pair {g['index']}: mean cos chosen {g['mean_cos_chosen']:.4f}, rejected "
                  f"{g['mean_cos_rejected']:.4f}, cross {g['mean_cos_cross']:.4f}")
        if enc.pad_note:
            print(enc.pad_note)
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
    return 0

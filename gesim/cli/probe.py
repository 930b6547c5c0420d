"""``python -m gesim probe``: exact per-pair gradient geometry of a saved model on preference data.

One CSV row per pair (index, len_w, len_l, lw, ll, ip, nw2, nl2, cos, ches, ln_ches and the
predicted regime under each ``--loss``, policy = reference); a summary (means, regime
fractions, skip and truncation counts) as text or JSON. Under ``torch.distributed.run`` the
pairs are sharded over the processes and rank 0 gathers and writes everything.

Scaling out
-----------
* Several processes (CPU, gloo)::

      python -m torch.distributed.run --nproc-per-node 2 -m gesim probe --model DIR --data pairs.jsonl --out o.csv

* Several GPUs (one process per GPU; each loads the model on ``cuda:LOCAL_RANK``; set
  ``GESIM_NCCL=1`` to use NCCL for the final gather, gloo works too, the gather is tiny)::

      GESIM_NCCL=1 python -m torch.distributed.run --nproc-per-node 8 -m gesim probe \
          --model DIR --data pairs.jsonl --device cuda --dtype bfloat16 --batch-size 16 --out o.csv

  ``accelerate launch -m gesim probe ...`` sets the same environment variables and works alike.
* Models too large for one GPU at full parameters: probe a subset (``--select lora`` on a PEFT
  adapter directory, or ``--select REGEX`` for, e.g., the last blocks), use ``--dtype bfloat16``
  (the Grams are still accumulated in fp32), and lower ``--batch-size``/``--max-length``. The
  probe keeps no per-sample parameter gradients (no B x P tensor) and no weight gradients, so
  its peak memory is close to one training step; a model that does not fit for one training step
  on one device needs model sharding, which this command does not do.
"""

from __future__ import annotations

from gesim import registries
from gesim.cli.options import add_format_option, nonnegative_int, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("probe", help="measure <g_w,g_l>, |g_w|^2, |g_l|^2 per pair on a real model",
                       description="Exact per-pair gradient geometry (one forward, one backward per batch) "
                       "and the predicted regime per loss. MODEL is a save_pretrained directory (model and "
                       "tokenizer, or a PEFT adapter), loaded offline. Under torch.distributed.run the pairs are "
                       "sharded over processes and one CSV is gathered.")
    p.add_argument("--model", required=True, metavar="DIR", help="directory written by save_pretrained")
    p.add_argument("--data", required=True, metavar="FILE", help="JSONL, JSON, Parquet or a saved datasets dir")
    p.add_argument("--out", metavar="FILE.csv", help="write the per-pair CSV here (atomically)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="pairs per batch (default 8)")
    p.add_argument("--max-length", type=positive_int, default=512, help="truncate responses beyond this (default 512)")
    p.add_argument("--select", "--params", dest="select", default="all", metavar="all|lora|REGEX",
                   help="parameters: all trainable, LoRA factors, or names matching REGEX (default all)")
    p.add_argument("--dtype", choices=registries.DTYPES, default="float32",
                   help="dtype the model is loaded in (default float32)")
    p.add_argument("--device", choices=registries.DEVICES, default="cpu", help="device (default cpu)")
    p.add_argument("--loss", action="append", metavar="NAME", help="loss(es) to predict regimes for (default dpo)")
    p.add_argument("--token-gram", type=nonnegative_int, default=0, metavar="K",
                   help="also compute token Grams for the first K pairs (summary; .npz next to --out)")
    p.add_argument("--backend", choices=registries.PROBE_BACKENDS, default="fast",
                   help="probe backend (default fast; auto picks fast where supported)")
    add_format_option(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import sys
    from pathlib import Path

    from gesim.errors import GesimError
    from gesim.output import check_out_file

    # paths first, then the data (in run_probe), and only then the model loads
    if not Path(args.model).is_dir():
        raise GesimError(f"--model {args.model}: not a directory written by save_pretrained")
    check_out_file(args.out, "--out")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise GesimError("--device cuda was asked for but no CUDA device is available")
    if not sys.stderr.isatty():  # logs get our lines, not transformers' loading bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    from gesim.cli.probe_run import run_probe

    return run_probe(args)

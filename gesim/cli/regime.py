"""``python -m gesim regime``: the first-order changes and regime of one pair under one loss."""

from __future__ import annotations

import math

import numpy as np

from gesim import dynamics, losses
from gesim.cli.options import add_format_option, add_param_option, dump_json, finite_float, parse_params, positive_float
from gesim.errors import GesimError


def add_parser(sub) -> None:
    p = sub.add_parser("regime", help="first-order changes and regime of one pair",
                       description="Evaluate d_w, d_l, delta_lw = eta (d_w nw2 - d_l ip), "
                       "delta_ll = eta (d_w ip - d_l nl2) and the regime for one pair.")
    p.add_argument("--loss", required=True, metavar="NAME", help="a registered loss (see `conditions`)")
    add_param_option(p)
    for name, help_ in (("--lw", "summed chosen log-prob, <= 0"), ("--ll", "summed rejected log-prob, <= 0")):
        p.add_argument(name, type=finite_float, required=True, help=help_)
    p.add_argument("--lw-ref", type=finite_float, default=0.0, help="reference chosen log-prob, <= 0 (default 0)")
    p.add_argument("--ll-ref", type=finite_float, default=0.0, help="reference rejected log-prob, <= 0 (default 0)")
    p.add_argument("--len-w", type=finite_float, default=1.0, help="chosen length in tokens, > 0 (default 1)")
    p.add_argument("--len-l", type=finite_float, default=1.0, help="rejected length in tokens, > 0 (default 1)")
    p.add_argument("--ip", type=finite_float, required=True, help="<g_w, g_l>, |ip| <= sqrt(nw2 nl2)")
    p.add_argument("--nw2", type=finite_float, required=True, help="||g_w||^2, >= 0")
    p.add_argument("--nl2", type=finite_float, required=True, help="||g_l||^2, >= 0")
    p.add_argument("--eta", type=positive_float, default=1.0, help="step size, > 0 (default 1)")
    add_format_option(p)
    p.set_defaults(func=run)


def run(args) -> int:
    loss = losses.get(args.loss)
    params = parse_params(args.param)
    loss.params(**params)  # validate before deriving
    with np.errstate(all="ignore"):  # an overflow is reported below, in one line, not as warnings
        out = dynamics.evaluate(loss,
            lw=args.lw, ll=args.ll, lw_ref=args.lw_ref, ll_ref=args.ll_ref, len_w=args.len_w, len_l=args.len_l,
            ip=args.ip, nw2=args.nw2, nl2=args.nl2, eta=args.eta, **params)
    bad = [k for k, v in out.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        flag, value = max(((f, getattr(args, f)) for f in ("lw", "ll", "lw_ref", "ll_ref", "len_w", "len_l", "ip",
                                                           "nw2", "nl2", "eta")), key=lambda fv: abs(fv[1]))
        raise GesimError(f"{', '.join(bad)} overflowed to inf/NaN in float64: the inputs are too large to evaluate "
                         f"(the largest is --{flag.replace('_', '-')} {value:g})")
    out = {"loss": loss.name, **out}
    if args.format == "json":
        print(dump_json(out))
    else:
        width = max(map(len, out))
        print("\n".join(f"{k:<{width}}  {v:.6g}" if isinstance(v, float) else f"{k:<{width}}  {v}"
                        for k, v in out.items()))
    return 0

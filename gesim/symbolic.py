"""Exact entanglement conditions for any registered loss, derived with sympy.

For a loss L(lw, ll; lw_ref, ll_ref, len_w, len_l, params) (theory.md sections 1-2):

    d_w = -dL/dlw,   d_l = dL/dll
    delta_lw = eta (d_w nw2 - d_l ip),   delta_ll = eta (d_w ip - d_l nl2)

With k = d_w / d_l, the chosen log-prob rises iff ip < k nw2 (when d_l > 0) and the rejected
one falls iff ip < nl2 / k (when d_w > 0). :func:`derive` returns all of it as sympy
expressions, with fast numpy evaluators, cached per loss::

    d = gesim.symbolic.derive("simpo")
    d.k                       # len_l/len_w: SimPO's thresholds move with the length ratio
    gesim.dynamics.evaluate(d, lw=-5, ll=-6, len_w=10, len_l=12, ip=1.0, nw2=2.0, nl2=3.0)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import sympy as sp

from gesim import losses
from gesim.backends import LAMBDIFY_NUMPY, sympy_ops
from gesim.errors import GesimError

lw, ll, lw_ref, ll_ref = sp.symbols("lw ll lw_ref ll_ref", real=True)
len_w, len_l = sp.symbols("len_w len_l", positive=True)
ip = sp.Symbol("ip", real=True)
nw2, nl2 = sp.symbols("nw2 nl2", nonnegative=True)
eta = sp.Symbol("eta", positive=True)

#: The data arguments of every loss, in the registry's order.
DATA = (lw, ll, lw_ref, ll_ref, len_w, len_l)
DATA_DEFAULTS = {"lw_ref": 0.0, "ll_ref": 0.0, "len_w": 1.0, "len_l": 1.0}

#: How the paper's symbols print in LaTeX.
LATEX_NAMES = {
    lw: r"\ell_w", ll: r"\ell_l", lw_ref: r"\ell_w^{\mathrm{ref}}", ll_ref: r"\ell_l^{\mathrm{ref}}",
    len_w: r"|y_w|", len_l: r"|y_l|", ip: r"\langle g_w, g_l \rangle", nw2: r"\|g_w\|^2",
    nl2: r"\|g_l\|^2", eta: r"\eta",
}


def _param_symbol(name: str, rng: losses.Range) -> sp.Symbol:
    if rng.low >= 0 and not rng.low_closed:
        return sp.Symbol(name, positive=True)
    if rng.low >= 0:
        return sp.Symbol(name, nonnegative=True)
    return sp.Symbol(name, real=True)


@dataclass(frozen=True, eq=False)
class Derivation:
    """The symbolic first-order analysis of one loss; build it with :func:`derive`."""

    loss: losses.Loss
    params: tuple[sp.Symbol, ...]
    L: sp.Expr
    d_w: sp.Expr
    d_l: sp.Expr

    # ---- symbolic results ----------------------------------------------------------------
    @property
    def delta_lw(self) -> sp.Expr:
        """First-order change of the chosen log-prob: eta (d_w nw2 - d_l ip)."""
        return eta * (self.d_w * nw2 - self.d_l * ip)

    @property
    def delta_ll(self) -> sp.Expr:
        """First-order change of the rejected log-prob: eta (d_w ip - d_l nl2)."""
        return eta * (self.d_w * ip - self.d_l * nl2)

    @cached_property
    def k(self) -> sp.Expr:
        """k = d_w / d_l, simplified: chosen up iff ip < k nw2, rejected down iff ip < nl2 / k."""
        if self.d_l == 0:
            return sp.zoo
        return _simplify(self.d_w / self.d_l)

    @cached_property
    def chosen_up(self) -> sp.Basic:
        """Condition for delta_lw > 0, as a threshold on ip when d_l > 0."""
        if self.d_l == 0:
            return sp.StrictGreaterThan(self.d_w * nw2, 0)
        return sp.StrictLessThan(ip, self.k * nw2)

    @cached_property
    def rejected_down(self) -> sp.Basic:
        """Condition for delta_ll < 0, as a threshold on ip when d_w > 0."""
        if self.d_w == 0:
            return sp.StrictGreaterThan(self.d_l * nl2, 0)
        return sp.StrictLessThan(ip, _simplify(self.d_l / self.d_w) * nl2)

    # ---- numbers -------------------------------------------------------------------------
    @cached_property
    def _weights_fn(self):
        fn = sp.lambdify([*DATA, *self.params], [self.d_w, self.d_l], modules=[LAMBDIFY_NUMPY, "numpy"])
        return fn

    def weights(self, lw, ll, lw_ref=0.0, ll_ref=0.0, len_w=1.0, len_l=1.0, check=True, **params):
        """Numeric (d_w, d_l), vectorised over numpy arrays; parameters override defaults.

        ``check=False`` skips the data checks (finite, log-probs <= 0, lengths > 0): for a
        caller that produces such data by construction and calls this once per step
        (the simulator), where the checks cost several times the formula."""
        values = self.loss.params(**params)
        args = [np.asarray(a, dtype=float) for a in (lw, ll, lw_ref, ll_ref, len_w, len_l)]
        if check:
            _check_data(args)
        with np.errstate(over="ignore"):
            d_w, d_l = self._weights_fn(*args, *(values[p.name] for p in self.params))
        shape = np.broadcast(*args).shape
        return np.broadcast_to(np.asarray(d_w, float), shape), np.broadcast_to(np.asarray(d_l, float), shape)

    # ---- tables --------------------------------------------------------------------------
    def row(self) -> dict:
        """One row of the loss table, as strings (sympy syntax) and flags."""
        return {
            "name": self.loss.name, "margin": self.loss.margin, "source": self.loss.source,
            "params": dict(self.loss.defaults), "loss": sp.sstr(self.L), "d_w": sp.sstr(self.d_w),
            "d_l": sp.sstr(self.d_l), "k": sp.sstr(self.k), "chosen_up": sp.sstr(self.chosen_up),
            "rejected_down": sp.sstr(self.rejected_down), "trl": _trl_row(self.loss.trl),
        }

    def latex(self) -> dict:
        """The same row as LaTeX snippets."""
        tex = lambda e: sp.latex(e, symbol_names=LATEX_NAMES)  # noqa: E731
        return {"loss": tex(self.L), "d_w": tex(self.d_w), "d_l": tex(self.d_l), "k": tex(self.k),
                "chosen_up": tex(self.chosen_up), "rejected_down": tex(self.rejected_down)}


def _trl_row(trl) -> dict | None:
    """The loss's trl record as plain JSON values (None without a trl counterpart)."""
    if trl is None:
        return None
    loss_type = list(trl.loss_type) if isinstance(trl.loss_type, tuple) else trl.loss_type
    return {"trainer": trl.trainer, "loss_type": loss_type, "params": dict(trl.params), "fixed": dict(trl.fixed),
            "requires": dict(trl.requires), "scale": trl.scale, "batch": trl.batch, "version": trl.version}


def _check_data(args):
    """Refuse data no pair can have: NaN/inf, a log-probability above 0, a length <= 0."""
    for name, a in zip(("lw", "ll", "lw_ref", "ll_ref", "len_w", "len_l"), args):
        if not np.all(np.isfinite(a)):
            raise GesimError(f"{name} must be finite, got {_first(a, ~np.isfinite(a))}")
    for name, a in zip(("lw", "ll", "lw_ref", "ll_ref"), args):
        if np.any(a > 0):
            raise GesimError(f"{name} is a summed log-probability and must be <= 0, got {_first(a, a > 0):g}")
    for name, a in zip(("len_w", "len_l"), args[4:]):
        if np.any(a <= 0):
            raise GesimError(f"{name} is a response length in tokens and must be > 0, got {_first(a, a <= 0):g}")


def _first(a, mask):
    """The first entry of ``a`` where ``mask`` holds (for messages)."""
    return float(np.broadcast_to(a, np.shape(mask))[mask].flat[0]) if np.ndim(mask) else float(a)


def _simplify(expr: sp.Expr) -> sp.Expr:
    """A cheap, readable normal form: cancel, factor common terms, keep the shorter of that
    and its expansion. gesim's sigmoid functions stay opaque, so this is fast (full
    ``sympy.simplify`` costs seconds per loss and reads no better)."""
    cancelled = sp.factor_terms(sp.cancel(sp.together(expr)))
    return min((cancelled, sp.expand(cancelled)), key=sp.count_ops)


_CACHE: dict[tuple[str, int], Derivation] = {}


def derive(name) -> Derivation:
    """Derive d_w, d_l, the first-order changes and the thresholds of loss ``name`` (cached)."""
    loss = losses.get(name)
    key = (loss.name, id(loss))
    if key not in _CACHE:
        params = tuple(_param_symbol(p, loss.ranges[p]) for p in loss.defaults)
        L = loss.fn(sympy_ops, *DATA, **{p.name: p for p in params})
        if not isinstance(L, sp.Basic):
            raise GesimError(f"loss {loss.name!r} did not build a sympy expression; write it with ops.* "
                             "and arithmetic only")
        _CACHE[key] = Derivation(loss, params, L, _simplify(-sp.diff(L, lw)), _simplify(sp.diff(L, ll)))
    return _CACHE[key]


# --------------------------------------------------------------------------------------------
# The loss table (README, --format markdown|latex|json|text).

TABLE_FORMATS = ("text", "markdown", "latex", "json")


def table(names=None, fmt: str = "markdown") -> str:
    """The conditions of the given losses (default: all) as text, Markdown, LaTeX or JSON."""
    if fmt not in TABLE_FORMATS:
        raise GesimError(f"unknown format {fmt!r}; choose from: {', '.join(TABLE_FORMATS)}")
    ds = [derive(n) for n in (names or losses.names())]
    return {"text": _text, "markdown": _markdown, "latex": _latex, "json": _json}[fmt](ds)


def _json(ds) -> str:
    return json.dumps([d.row() for d in ds], indent=2)


def _text(ds) -> str:
    blocks = []
    for d in ds:
        r = d.row()
        blocks.append("\n".join([
            f"{r['name']}  ({'margin' if r['margin'] else 'non-margin'}; {r['source']})",
            f"  L             = {r['loss']}", f"  d_w           = {r['d_w']}", f"  d_l           = {r['d_l']}",
            f"  chosen up     : {r['chosen_up']}", f"  rejected down : {r['rejected_down']}"]))
    return "\n\n".join(blocks)


def _markdown(ds) -> str:
    head = ("| loss | margin | d_w | d_l | chosen up iff | rejected down iff | source |\n"
            "|---|---|---|---|---|---|---|")
    rows = []
    for d in ds:
        r = d.row()
        cells = [f"`{r['name']}`", "yes" if r["margin"] else "no", f"`{r['d_w']}`", f"`{r['d_l']}`",
                 f"`{r['chosen_up']}`", f"`{r['rejected_down']}`", r["source"].replace("|", "/")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, *rows])


def _latex(ds) -> str:
    lines = [r"\documentclass{article}", r"\usepackage[landscape,margin=1cm]{geometry}",
             r"\usepackage{amsmath,amssymb,longtable}", r"\begin{document}", r"\small",
             r"\begin{longtable}{p{2.2cm}p{5.5cm}p{4.2cm}p{4.2cm}p{2.8cm}p{2.8cm}}",
             r"loss & $L$ & $d_w$ & $d_l$ & chosen up iff & rejected down iff \\ \hline \endhead"]
    for d in ds:
        t = d.latex()
        name = d.loss.name.replace("_", r"\_")
        lines.append(rf"\texttt{{{name}}} & ${t['loss']}$ & ${t['d_w']}$ & ${t['d_l']}$ & "
                     rf"${t['chosen_up']}$ & ${t['rejected_down']}$ \\")
    lines += [r"\end{longtable}", r"\end{document}", ""]
    return "\n".join(lines)


__all__ = ["Derivation", "derive", "table", "TABLE_FORMATS", "DATA", "lw", "ll", "lw_ref", "ll_ref",
           "len_w", "len_l", "ip", "nw2", "nl2", "eta"]

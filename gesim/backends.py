"""Tiny ``Ops`` adapters: the few non-arithmetic primitives a loss may use, per backend.

A loss is written once, as a function of an ``ops`` object and its arguments, with ordinary
arithmetic (``+ - * / **``) and these primitives. The same function then evaluates with
numpy arrays, torch tensors (autograd flows through) or sympy symbols (an expression comes
out). This is einops' pattern: one operation, tiny backend adapters, every backend tested
against numpy.

Primitives: ``exp, log, log1p, expm1, sigmoid, log_sigmoid, relu, maximum, minimum, abs,
square, sqrt, stop_gradient``.

``stop_gradient(x)`` is ``x`` in value with zero derivative (torch ``detach``): a loss uses it
for a detached per-pair weight, e.g. WPO's ``exp(mean log-prob)``.

In sympy, ``sigmoid``, ``log_sigmoid`` and ``relu`` are functions with known derivatives
(``sigma' = sigma(x) sigma(-x)``, ``(log sigma)' = sigma(-x)``, ``relu' = H(x)`` with
``H(0) = 0`` as torch), so derived weights print as the papers write them.
"""

from __future__ import annotations

import numpy as np
import sympy as sp
from scipy.special import expit


class sigmoid(sp.Function):
    """The logistic function sigma(x) = 1 / (1 + exp(-x))."""

    def fdiff(self, argindex=1):
        (x,) = self.args
        return sigmoid(x) * sigmoid(-x)

    @classmethod
    def eval(cls, x):
        if x.is_zero:
            return sp.Rational(1, 2)

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return 1 / (1 + sp.exp(-x))

    def _eval_evalf(self, prec):
        return (1 / (1 + sp.exp(-self.args[0])))._eval_evalf(prec)

    def _latex(self, printer):
        return rf"\sigma\left({printer._print(self.args[0])}\right)"


class log_sigmoid(sp.Function):
    """log sigma(x) = -log(1 + exp(-x))."""

    def fdiff(self, argindex=1):
        (x,) = self.args
        return sigmoid(-x)

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return -sp.log(1 + sp.exp(-x))

    def _eval_evalf(self, prec):
        return (-sp.log(1 + sp.exp(-self.args[0])))._eval_evalf(prec)

    def _latex(self, printer):
        return rf"\log\sigma\left({printer._print(self.args[0])}\right)"


class relu(sp.Function):
    """max(0, x), with derivative H(x) and H(0) = 0 (the convention of torch)."""

    def fdiff(self, argindex=1):
        (x,) = self.args
        return sp.Heaviside(x, 0)

    def _eval_rewrite_as_Max(self, x, **kwargs):
        return sp.Max(0, x)

    def _eval_evalf(self, prec):
        return sp.Max(0, self.args[0])._eval_evalf(prec)

    def _latex(self, printer):
        return rf"\left[{printer._print(self.args[0])}\right]_+"


class stop_gradient(sp.Function):
    """x in value, zero derivative (torch ``x.detach()``)."""

    def fdiff(self, argindex=1):
        return sp.S.Zero

    def _eval_evalf(self, prec):
        return self.args[0]._eval_evalf(prec)

    def _latex(self, printer):
        return rf"\operatorname{{sg}}\left({printer._print(self.args[0])}\right)"


class Ops:
    """Base adapter. Subclasses set the primitives; ``name`` identifies the backend."""

    name = "abstract"


class NumpyOps(Ops):
    """numpy, numerically stable where it matters (log_sigmoid via logaddexp)."""

    name = "numpy"
    exp = staticmethod(np.exp)
    log = staticmethod(np.log)
    log1p = staticmethod(np.log1p)
    expm1 = staticmethod(np.expm1)
    maximum = staticmethod(np.maximum)
    minimum = staticmethod(np.minimum)
    abs = staticmethod(np.abs)
    square = staticmethod(np.square)
    sqrt = staticmethod(np.sqrt)

    @staticmethod
    def sigmoid(x):
        return expit(np.asarray(x, dtype=float))  # accurate in both tails, e.g. expit(-70) = 4e-31

    @staticmethod
    def log_sigmoid(x):
        return -np.logaddexp(0.0, -np.asarray(x, dtype=float))

    @staticmethod
    def relu(x):
        return np.maximum(x, 0.0)

    @staticmethod
    def stop_gradient(x):
        return x


class TorchOps(Ops):
    """torch; imported lazily so that ``import gesim`` never loads torch.

    Python numbers are accepted (as 0-d float64 tensors, which never up-cast a float32
    argument), so a loss may apply ``ops.log`` to a hyper-parameter.
    """

    name = "torch"
    _NAMES = {"exp": "exp", "log": "log", "log1p": "log1p", "expm1": "expm1", "sigmoid": "sigmoid",
              "relu": "relu", "maximum": "maximum", "minimum": "minimum", "abs": "abs",
              "square": "square", "sqrt": "sqrt"}

    def __getattr__(self, item):
        import torch
        import torch.nn.functional as F

        if item == "stop_gradient":
            return lambda x: x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float64)
        fn = F.logsigmoid if item == "log_sigmoid" else getattr(torch, self._NAMES.get(item, "_missing"), None)
        if fn is None:
            raise AttributeError(item)

        def op(*xs):
            return fn(*(x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float64)
                        for x in xs))
        return op


class SympyOps(Ops):
    """sympy: symbols in, expressions out."""

    name = "sympy"
    exp = staticmethod(sp.exp)
    log = staticmethod(sp.log)
    sigmoid = sigmoid
    log_sigmoid = log_sigmoid
    relu = relu
    stop_gradient = stop_gradient
    maximum = staticmethod(sp.Max)
    minimum = staticmethod(sp.Min)
    abs = staticmethod(sp.Abs)
    sqrt = staticmethod(sp.sqrt)

    @staticmethod
    def log1p(x):
        return sp.log(1 + x)

    @staticmethod
    def expm1(x):
        return sp.exp(x) - 1

    @staticmethod
    def square(x):
        return x**2


numpy_ops = NumpyOps()
torch_ops = TorchOps()
sympy_ops = SympyOps()

BACKENDS = {"numpy": numpy_ops, "torch": torch_ops, "sympy": sympy_ops}

#: How sympy's own functions print to numpy in lambdify (the custom ones above).
LAMBDIFY_NUMPY = {
    "sigmoid": NumpyOps.sigmoid,
    "log_sigmoid": NumpyOps.log_sigmoid,
    "relu": NumpyOps.relu,
    "Heaviside": lambda x, h0=0.0: np.heaviside(x, h0),
    "stop_gradient": NumpyOps.stop_gradient,
}

__all__ = ["Ops", "BACKENDS", "numpy_ops", "torch_ops", "sympy_ops", "LAMBDIFY_NUMPY"]

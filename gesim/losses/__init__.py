"""THE loss registry: every preference loss gesim knows, each defined exactly once.

A loss is one function ``fn(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, **params)`` of the
summed response log-probs (``lw``, ``ll``), the reference log-probs, the response lengths
and its hyper-parameters, written with ordinary arithmetic and the primitives of ``ops``
(:mod:`gesim.backends`). The same function evaluates with numpy, torch and sympy, so the
symbolic weights ``d_w = -dL/dlw``, ``d_l = dL/dll``, the loss tables, the command line and
the tests all derive from this one definition.

Register your own loss in five lines::

    import gesim

    @gesim.losses.register("my_loss", margin=True, source="my paper, Eq. (3)", beta=0.5)
    def my_loss(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
        return -ops.log_sigmoid(beta * (lw - ll))

Notation (theory.md section 1): ``rw = lw - lw_ref``, ``rl = ll - ll_ref``,
``h = rw - rl`` (the DPO log-ratio margin).
"""

from gesim.losses.registry import (  # noqa: F401  (the public API)
    ARGS,
    LEN_BAR,
    NONNEG,
    POSITIVE,
    REAL,
    TRL_VERSION,
    UNSUPPORTED,
    Loss,
    Range,
    Trl,
    backend,
    get,
    names,
    register,
    trl_batch_params,
    unregister,
)

# The catalogue registers itself on import, in this order (names() keeps it).
# isort: off
from gesim.losses import paper, trl_pairwise, batch_forms, literature  # noqa: F401, E402
# isort: on
from gesim.losses.aot import aot_weights  # noqa: F401, E402

"""Preference optimisation on synthetic policies, many independent instances at once.

Each instance is one policy (its own W) trained on one pair with a registered loss. Per step
the engine records (theory.md sections 2-3):

* lw, ll, the margin lw - ll, the loss weights d_w, d_l (from :func:`gesim.symbolic.derive`);
* the geometry ip, nw2, nl2 (P-weighted by the optimiser's preconditioner, as the prediction
  needs) and cos of the plain gradients (a P-weighted cosine is dominated by coordinates
  where Adam's second moment vanishes, so it says little);
* the predicted first-order changes delta_lw = eta (d_w nw2 - d_l ip) + <g_w, rest>,
  delta_ll = eta (d_w ip - d_l nl2) + <g_l, rest> (:func:`gesim.regimes.first_order`);
* the realised changes (log-probs recomputed after the step) and both regimes.

Two exact paths, batched in torch over instances: SGD-family rules run in logit space
(:mod:`gesim.simulate.logit`: no W, no gradients formed), any other rule (Adam) in weight
space with the closed-form gradients of :mod:`gesim.policies.linear`. Data come in chunks of
``chunk`` instances (deterministic in (seed, start)); the work runs in blocks on parallel
single-threaded workers (:mod:`gesim.threads`). :func:`simulate_loop` is the plain
per-instance reference (torch autograd, the registry's torch loss), used by the tests and
the benchmark.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from gesim import dynamics, losses, policies, regimes, symbolic
from gesim.errors import GesimError, unknown
from gesim.simulate import logit, optim

FIELDS = ("lw", "ll", "margin", "d_w", "d_l", "ip", "nw2", "nl2", "cos", "pred_dlw", "pred_dll",
          "real_dlw", "real_dll", "pred_regime", "real_regime")


@dataclass(frozen=True)
class SimConfig:
    """One simulation: policy, pair structure, loss, update rule (``rule``: a name in
    :data:`gesim.registries.RULES`, not a torch optimiser), size and seed."""

    policy: str = "context"
    loss: str = "dpo"
    params: dict = field(default_factory=dict)
    instances: int = 400
    steps: int = 5
    eta: float = 0.1
    rule: str = "sgd"
    seed: int = 0
    vocab: int = 64
    dim: int = 32
    prefix: int = 0
    differ: int = 1
    differ_w: int | None = None
    differ_l: int | None = None
    suffix: int = 0
    tail_w: int = 0
    tail_l: int = 0
    chunk: int = 500
    dtype: str = "float64"
    optimizer: dataclasses.InitVar[str | None] = None  # deprecated: the former name of ``rule``

    def __post_init__(self, optimizer):
        if optimizer is not None:
            warnings.warn("SimConfig(optimizer=...) is deprecated: the simulator's update rule is `rule`",
                          DeprecationWarning, stacklevel=3)
            object.__setattr__(self, "rule", optimizer)

    @classmethod
    def fast(cls, **overrides) -> SimConfig:
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def full(cls, **overrides) -> SimConfig:
        return dataclasses.replace(cls(instances=4000, steps=20, vocab=256, dim=64), **overrides)

    def make_policy(self):
        if self.policy == "context":
            return policies.make("context", vocab=self.vocab, dim=self.dim)
        if self.policy == "single_token":
            return policies.make("single_token", vocab=self.vocab, dim=self.dim)
        return policies.make(self.policy, vocab=self.vocab)

    def check(self) -> None:
        losses.get(self.loss).params(**self.params)
        optim.make(self.rule, self.eta)
        self.make_policy()
        for name in ("instances", "steps", "chunk"):
            if int(getattr(self, name)) < 1:
                raise GesimError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.dtype not in ("float64", "float32"):
            raise GesimError(f"dtype must be float64 or float32, got {self.dtype!r}")
        if self.policy == "single_token" and (self.prefix or self.suffix or self.differ != 1 or self.tail_w
                                              or self.tail_l
                                              or (self.differ_w or 1) != 1 or (self.differ_l or 1) != 1):
            raise GesimError("the single_token policy has one-token responses: use prefix=0, differ=1, "
                             "suffix=0")


@dataclass
class SimResult:
    """Arrays (steps, N) for every name in :data:`FIELDS`, plus the config."""

    config: SimConfig
    arrays: dict

    def summary(self) -> dict:
        """Fractions over instance-steps: mean cos, P(chosen down), P(rejected up), agreement."""
        a = self.arrays
        return {
            "instances": self.config.instances, "steps": self.config.steps,
            "mean_cos": float(np.nanmean(a["cos"])),
            "p_chosen_down": float(np.mean(a["real_dlw"] < 0)),
            "p_rejected_up": float(np.mean(a["real_dll"] > 0)),
            "regime_agreement": float(np.mean(a["pred_regime"] == a["real_regime"])),
            "predicted_regimes": regimes.fractions(a["pred_regime"]),
            "realised_regimes": regimes.fractions(a["real_regime"]),
        }

    def records(self) -> list[dict]:
        """Tidy records, one per (step, instance): pandas.DataFrame(result.records())."""
        a = self.arrays
        S, N = a["lw"].shape
        names = np.asarray(regimes.REGIMES)
        cols = {k: (names[a[k]] if k.endswith("regime") else a[k]).ravel().tolist() for k in FIELDS}
        step, inst = np.meshgrid(np.arange(S), np.arange(N), indexing="ij")
        cols = {"step": step.ravel().tolist(), "instance": inst.ravel().tolist(), **cols}
        return [dict(zip(cols, row)) for row in zip(*cols.values())]


def make_data(cfg: SimConfig, start: int, n: int):
    """Policy instances and pairs for instances [start, start + n): deterministic in (seed, start)."""
    rng = np.random.default_rng([cfg.seed, start])
    shared = np.random.default_rng([cfg.seed, 2**31 - 1])
    pol = cfg.make_policy()
    pairs = policies.pairs.blocks(rng, n, cfg.vocab, prefix=cfg.prefix, differ=cfg.differ, suffix=cfg.suffix,
                                  differ_w=cfg.differ_w, differ_l=cfg.differ_l, tail_w=cfg.tail_w,
                                  tail_l=cfg.tail_l)
    inst = pol.init(rng, n, pairs.chosen_ids.shape[1], dtype=getattr(torch, cfg.dtype), shared_rng=shared)
    return pol, inst, pairs


def _tensors(pairs, dtype):
    t = lambda a, dt: torch.as_tensor(a, dtype=dt)  # noqa: E731
    return (t(pairs.chosen_ids, torch.long), t(pairs.chosen_mask, dtype), t(pairs.rejected_ids, torch.long),
            t(pairs.rejected_mask, dtype))


def run_chunk(cfg: SimConfig, pol, inst, pairs, bar=None, engine: str = "auto") -> dict:
    """Simulate the instances ``inst`` on ``pairs`` (vectorised); arrays (steps, n).

    ``engine``: "logit" (:mod:`gesim.simulate.logit`, SGD-family rules), "weights" (the
    weight-space path below, any rule) or "auto" (logit space when the rule allows it).
    """
    dtype = inst.W0.dtype
    yw, mw, yl, ml = _tensors(pairs, dtype)
    H_w, H_l = pol.features(inst, yw), pol.features(inst, yl)  # (n, T, d)
    rule = optim.make(cfg.rule, cfg.eta)
    if _path(engine, rule) == "logit":
        return logit.run_block(cfg, H_w, H_l, inst.W0, yw, mw, yl, ml, pairs.len_w, pairs.len_l, rule, bar)
    W = inst.W0.clone()
    deriv, params = symbolic.derive(cfg.loss), losses.get(cfg.loss).params(**cfg.params)
    len_w, len_l = pairs.len_w, pairs.len_l
    lw, g_w = policies.grad(W, H_w, yw, mw)
    ll, g_l = policies.grad(W, H_l, yl, ml)
    lw_ref, ll_ref = lw.double().numpy().copy(), ll.double().numpy().copy()
    out = {k: [] for k in FIELDS}
    for _ in range(cfg.steps):
        lw_np, ll_np = lw.double().numpy(), ll.double().numpy()
        d_w, d_l = (np.array(x) for x in deriv.weights(lw_np, ll_np, lw_ref, ll_ref, len_w, len_l, **params))
        tw, tl = torch.as_tensor(d_w, dtype=dtype), torch.as_tensor(d_l, dtype=dtype)
        upd = rule.step(g_w, g_l, tw, tl)
        ip, nw2, nl2 = (x.double().numpy() for x in optim.geometry(g_w, g_l, upd.precond))
        raw = (ip, nw2, nl2) if upd.precond is None else (x.double().numpy() for x in optim.geometry(g_w, g_l))
        cos = dynamics.cos_rho(*raw)["cos"]
        ew = d_w if upd.d_w is None else upd.d_w.double().numpy()
        el = d_l if upd.d_l is None else upd.d_l.double().numpy()
        pred_dlw, pred_dll = regimes.first_order(ew, el, ip, nw2, nl2, cfg.eta)
        if upd.rest is not None:
            dims = tuple(range(1, g_w.dim()))
            pred_dlw = pred_dlw + (g_w * upd.rest).sum(dims).double().numpy()
            pred_dll = pred_dll + (g_l * upd.rest).sum(dims).double().numpy()
        W += upd.u
        lw_new, g_w = policies.grad(W, H_w, yw, mw)
        ll_new, g_l = policies.grad(W, H_l, yl, ml)
        real_dlw = (lw_new - lw).double().numpy()
        real_dll = (ll_new - ll).double().numpy()
        row = {"lw": lw_np, "ll": ll_np, "margin": lw_np - ll_np, "d_w": d_w, "d_l": d_l, "ip": ip,
               "nw2": nw2, "nl2": nl2, "cos": cos, "pred_dlw": pred_dlw, "pred_dll": pred_dll,
               "real_dlw": real_dlw, "real_dll": real_dll,
               "pred_regime": regimes.regime_codes(pred_dlw, pred_dll, d_w, d_l),
               "real_regime": regimes.regime_codes(real_dlw, real_dll, d_w, d_l)}
        for k in FIELDS:
            out[k].append(np.array(row[k], copy=True))
        lw, ll = lw_new, ll_new
        if bar is not None:
            bar.update(len(lw))
    return {k: np.stack(v) for k, v in out.items()}


ENGINES = ("auto", "logit", "weights")
#: Bytes of logits per block of the logit path (n x 2T x V): per-step Python overhead (loss
#: weights, a dozen torch calls) is paid once per block; the GEMM, geometry and update run in
#: tiles inside it (:data:`gesim.simulate.logit.TILE_BYTES`).
BLOCK_BYTES = 2**23


def block_size(cfg: SimConfig, path: str = "logit") -> int:
    """Instances per work unit of ``path`` (at least 8, at most ``cfg.chunk``)."""
    if path != "logit":
        return cfg.chunk
    T = cfg.prefix + max(cfg.differ_w or cfg.differ, cfg.differ_l or cfg.differ) + cfg.suffix
    T += max(cfg.tail_w, cfg.tail_l)
    itemsize = 8 if cfg.dtype == "float64" else 4
    return max(1, min(cfg.chunk, max(8, BLOCK_BYTES // (2 * T * cfg.vocab * itemsize))))


def _path(engine: str, rule) -> str:
    if engine not in ENGINES:
        raise unknown("engine", engine, ENGINES)
    if engine == "auto":
        return "logit" if logit.supports(rule) else "weights"
    if engine == "logit" and not logit.supports(rule):
        raise GesimError(f"the logit-space engine needs an SGD-family rule (one with weights()); "
                         f"{type(rule).__name__} has none: use engine='weights' or 'auto'")
    return engine


def simulate(cfg: SimConfig, progress: bool = False, engine: str = "auto", workers: int | None = None) -> SimResult:
    """Run ``cfg``: all instances, vectorised in blocks; a tqdm bar on stderr if ``progress``.

    Data come in chunks of ``cfg.chunk`` instances (deterministic in (seed, start)); each chunk
    is cut into blocks of :func:`block_size` instances, run by ``workers`` parallel single-threaded
    workers (default :func:`gesim.threads.workers`). Results do not depend on the number of
    workers (every block runs on one thread). ``engine``: see :func:`run_chunk`.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from gesim import threads

    cfg.check()
    block = block_size(cfg, _path(engine, optim.make(cfg.rule, cfg.eta)))
    units = []
    for start in range(0, cfg.instances, cfg.chunk):
        n = min(cfg.chunk, cfg.instances - start)
        units.append((start, n))
    n_units = sum(-(-n // block) for _, n in units)
    workers = threads.workers(n_units) if workers is None else max(1, min(int(workers), n_units))

    def chunk_jobs(start, n):
        pol, inst, pairs = make_data(cfg, start, n)
        return [(pol, inst.take(slice(i, i + block)), pairs.take(slice(i, i + block))) for i in range(0, n, block)]

    with torch.no_grad(), threads.single(), tqdm(total=cfg.instances * cfg.steps, disable=not progress,
                                                 unit="inst-step", desc=f"simulate {cfg.policy}/{cfg.loss}") as bar:
        def job(args):
            with torch.no_grad():
                return run_chunk(cfg, *args, bar=bar, engine=engine)

        if workers == 1:
            parts = [job(j) for start, n in units for j in chunk_jobs(start, n)]
        else:  # at most two data chunks alive: memory stays bounded, the workers never wait for data
            with ThreadPoolExecutor(workers, initializer=threads.set_torch_threads, initargs=(1,)) as pool:
                futures, parts = [], []
                for start, n in units:
                    if len(futures) > 1:
                        parts += [f.result() for f in futures[0]]
                        futures.pop(0)
                    futures.append([pool.submit(job, j) for j in chunk_jobs(start, n)])
                parts += [f.result() for fs in futures for f in fs]
    return SimResult(cfg, {k: np.concatenate([p[k] for p in parts], axis=1) for k in FIELDS})


def simulate_loop(cfg: SimConfig, instances=None) -> SimResult:
    """The plain reference: one instance at a time, torch autograd through the registry's loss.

    Same data as :func:`simulate` (same chunks), but every gradient comes from autograd of
    log_softmax and every weight d_w = -dL/dlw, d_l = dL/dll from autograd of
    ``gesim.losses.get(loss)("torch", ...)``. ``instances``: how many to run (default all): the
    first ones of :func:`simulate`'s run, on the same data.
    """
    cfg.check()
    total = cfg.instances if instances is None else min(instances, cfg.instances)
    loss = losses.get(cfg.loss)
    params = loss.params(**cfg.params)
    cols = []
    for start in range(0, total, cfg.chunk):
        pol, inst, pairs = make_data(cfg, start, min(cfg.chunk, cfg.instances - start))  # simulate's chunks
        for i in range(min(cfg.chunk, total - start)):
            cols.append(_one(cfg, pol, inst.take([i]), pairs.take([i]), loss, params))
    return SimResult(dataclasses.replace(cfg, instances=total),
                     {k: np.stack([c[k] for c in cols], axis=1) for k in FIELDS})


def _one(cfg, pol, inst, pair, loss, params) -> dict:
    dtype = inst.W0.dtype
    yw, mw, yl, ml = _tensors(pair, dtype)
    H_w, H_l = pol.features(inst, yw), pol.features(inst, yl)
    W = inst.W0.clone().requires_grad_(True)
    rule = optim.make(cfg.rule, cfg.eta)
    len_w, len_l = float(pair.len_w[0]), float(pair.len_l[0])

    def forward(W):
        W = W.detach().requires_grad_(True)
        lw = policies.logps(W, H_w, yw, mw)[0]
        ll = policies.logps(W, H_l, yl, ml)[0]
        g_w, = torch.autograd.grad(lw, W)
        g_l, = torch.autograd.grad(ll, W)
        return lw.detach(), ll.detach(), g_w, g_l

    lw, ll, g_w, g_l = forward(W)
    lw_ref, ll_ref = float(lw), float(ll)
    rows = []
    for _ in range(cfg.steps):
        d_w, d_l = (float(d) for d in loss.weights(lw, ll, lw_ref, ll_ref, len_w, len_l, **params))
        upd = rule.step(g_w, g_l, torch.tensor([d_w], dtype=dtype), torch.tensor([d_l], dtype=dtype))
        P = torch.ones_like(g_w) if upd.precond is None else upd.precond
        rest = torch.zeros_like(g_w) if upd.rest is None else upd.rest
        ip, nw2, nl2 = float((P * g_w * g_l).sum()), float((P * g_w * g_w).sum()), float((P * g_l * g_l).sum())
        ip0, nw20, nl20 = float((g_w * g_l).sum()), float((g_w * g_w).sum()), float((g_l * g_l).sum())
        ew = d_w if upd.d_w is None else float(upd.d_w[0])
        el = d_l if upd.d_l is None else float(upd.d_l[0])
        pred_dlw = cfg.eta * (ew * nw2 - el * ip) + float((g_w * rest).sum())
        pred_dll = cfg.eta * (ew * ip - el * nl2) + float((g_l * rest).sum())
        lw_new, ll_new, g_w, g_l = forward(W.detach() + upd.u)
        W = W.detach() + upd.u
        real_dlw, real_dll = float(lw_new - lw), float(ll_new - ll)
        rows.append({"lw": float(lw), "ll": float(ll), "margin": float(lw - ll), "d_w": d_w, "d_l": d_l,
                     "ip": ip, "nw2": nw2, "nl2": nl2, "cos": ip0 / np.sqrt(nw20 * nl20) if nw20 * nl20 > 0 else np.nan,
                     "pred_dlw": pred_dlw, "pred_dll": pred_dll, "real_dlw": real_dlw, "real_dll": real_dll,
                     "pred_regime": int(regimes.regime_codes(pred_dlw, pred_dll, d_w, d_l)),
                     "real_regime": int(regimes.regime_codes(real_dlw, real_dll, d_w, d_l))})
        lw, ll = lw_new, ll_new
    return {k: np.array([r[k] for r in rows]) for k in FIELDS}

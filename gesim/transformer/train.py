"""SFT, then preference optimisation, with the entanglement measurements of theory.md section 5.

On a fixed eval set of pairs, every ``eval_every`` steps (:mod:`gesim.transformer.measure`):

* mean lw, ll (summed response log-probs, and per token) and the margin;
* per pair ip, nw2, nl2 and cos over all parameters (:func:`gesim.probe.pair_stats`);
* the **whole-batch check**: the realised change of every eval pair's lw and ll over the
  optimizer's actual step u, next to the first-order prediction <grad f, u> (theory.md
  section 3: this holds for any update, AdamW's preconditioned steps included);
  ``regime_agreement`` is the fraction of eval pairs whose realised signs match;
* the **one-pair check**: the symbolic prediction for a step on each pair alone (with Adam's
  preconditioned ip, nw2, nl2) against that step's realised signs (``pair_agreement``);
* token cosine matrices (chosen x rejected tokens) of a few pairs at the first and last
  measured step, and confusion matrices of predicted against realised regimes.

Long runs write ``checkpoint.pt`` every ``checkpoint_every`` steps when given an ``out``
folder and resume from it; metrics go to ``metrics.csv`` and ``summary.json`` there (all
written atomically). With ``amp="auto"`` the training forward runs under bf16 autocast on
CUDA; every measurement runs in float32 (the one-pair check in float64) outside autocast.

Reproducible under a seed (CPU): every random draw comes from its own stream
:func:`stage_seed` (seed, stage) (model init, SFT data, SFT batches, preference train and
eval pairs, preference batches), never from torch's global generator, so the numbers do not
depend on what ran before in the process. Threads: the model's LayerNorm backward is made
thread-count invariant (:mod:`gesim.transformer.model`), but MKL's GEMM kernels still split
rows differently with the thread count for some shapes (measured: n_embd=24 at 3 threads
changes attention's c_proj output in the last bit, and 60 SFT steps turn that into a different
model). So a CPU run pins torch to ``cfg.threads`` intra-op threads (default 1; restored
afterwards, :func:`pinned`): the numbers are then the same whatever ``torch.get_num_threads()``
the caller had. With ``threads=None`` the caller's count is kept and invariance holds only
where MKL's kernels agree (they did for the fast preset at 1-8 threads).

``light=True`` (the suffix sweep and the cross-loss comparison) skips the token cosines and
runs the one-pair check at the start only, but checks every step to first order and keeps
per-pair results (:func:`measure.pair_outcomes`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gesim import lm, losses, probe, regimes
from gesim.errors import GesimError, unknown
from gesim.output import atomic_write_bytes, atomic_write_text, write_json
from gesim.transformer import data, loop, measure
from gesim.transformer import telemetry as train_telemetry
from gesim.transformer.model import GPT, GPTConfig

ARCHS = ("gpt", "hf-gpt2")
AMP = ("auto", "bf16", "off")
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    """One experiment: model size, SFT, preference optimisation, measurement."""

    arch: str = "gpt"
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 48
    block_size: int = 64
    sft_steps: int = 300
    sft_lr: float = 3e-3
    label_noise: float = 0.15
    n_train: int = 512
    n_eval: int = 16
    batch: int = 32
    pref_steps: int = 60
    lr: float = 1e-5
    optimizer: str = "adamw"
    eval_every: int = 10
    token_pairs: int = 2
    checkpoint_every: int = 20
    amp: str = "auto"
    seed: int = 0
    device: str = "cpu"
    threads: int | None = 1  # CPU: torch intra-op threads for the run (restored after); None: the caller's
    suffix_len: int | None = None  # preference pairs cut to label + this many suffix tokens (suffix sweep)
    light: bool = False  # one-pair check at the start only, every step checked to first order
    telemetry: str = "off"  # every training pair of every step: "pairs" (own step) or "batch" (+ batch step)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise unknown("architecture", self.arch, ARCHS)
        if self.amp not in AMP:
            raise unknown("amp setting", self.amp, AMP)
        if self.optimizer not in OPTIMIZERS:
            raise unknown("optimizer", self.optimizer, OPTIMIZERS)
        if self.telemetry not in train_telemetry.MODES:
            raise unknown("telemetry mode", self.telemetry, train_telemetry.MODES)
        if self.threads is not None and self.threads < 1:
            raise GesimError(f"threads must be a positive integer or None, got {self.threads}")
        if self.suffix_len is not None and not 0 <= self.suffix_len <= max(data.SUFFIX.values()):
            raise GesimError(f"suffix_len must be in [0, {max(data.SUFFIX.values())}], got {self.suffix_len}")
        for name in ("sft_steps", "pref_steps", "eval_every", "checkpoint_every", "batch", "n_train", "n_eval"):
            if getattr(self, name) < (0 if name == "sft_steps" else 1):
                raise GesimError(f"{name} must be a positive integer, got {getattr(self, name)}")

    @classmethod
    def fast(cls, **overrides) -> TrainConfig:
        """CPU, a tiny model (116k parameters): about twenty seconds per structure."""
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def full(cls, **overrides) -> TrainConfig:
        """GPU: a model of a few million parameters, paper-sized preference phase."""
        return dataclasses.replace(cls(n_layer=4, n_head=4, n_embd=256, sft_steps=1500, n_train=4096, n_eval=64,
                                       pref_steps=200, eval_every=10), **overrides)

    def autocast(self):
        """The context the training forward runs in: bf16 autocast on CUDA ("auto") or anywhere ("bf16")."""
        device_type = torch.device(self.device).type
        on = self.amp == "bf16" or (self.amp == "auto" and device_type == "cuda")
        return torch.autocast(device_type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


@contextlib.contextmanager
def pinned(cfg: TrainConfig):
    """Run the block with ``cfg.threads`` torch intra-op threads on CPU (see the module docstring)."""
    if cfg.threads is None or torch.device(cfg.device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


#: The random streams of a run, one per stage; append only (a stream's seed hashes its index).
#: The named random streams of a run. Append only: a stage's index is part of its stream, so
#: reordering would change every number. The last eight are the method harness's
#: (:mod:`gesim.methods.harness`: pretraining data, preference pairs, the test and validation
#: splits, HMA's sampled prompts and draws).
STAGES = ("init", "sft-data", "sft-batches", "pref-train", "pref-eval", "pref-batches", "pretrain-batches",
          "pretrain-data", "style-train", "test-sft", "test-style", "val-sft", "val-style", "sample-prompts",
          "sample-draws")


def stage_seed(seed: int, stage: str) -> int:
    """The seed of one random stream of a run: a hash of (seed, stage) by numpy's SeedSequence,
    so streams of different stages and different seeds never coincide (seed + k offsets made
    seed 0's eval pairs seed 2's SFT data)."""
    if stage not in STAGES:
        raise unknown("random stage", stage, STAGES)
    return int(np.random.SeedSequence([int(seed), STAGES.index(stage)]).generate_state(1)[0])


def build_model(cfg: TrainConfig, vocab_size: int) -> torch.nn.Module:
    """The small GPT of :mod:`gesim.transformer.model`, or a Hugging Face GPT-2 built from a config."""
    if cfg.arch == "gpt":
        return GPT(GPTConfig(vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                             n_head=cfg.n_head, n_embd=cfg.n_embd)).to(cfg.device)
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise GesimError("arch 'hf-gpt2' needs transformers: pip install transformers") from None
    config = GPT2Config(vocab_size=vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                        eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(config).to(cfg.device)


def init_model(cfg: TrainConfig) -> torch.nn.Module:
    """:func:`build_model` drawn from the run's "init" stream; the global RNG is left alone."""
    with torch.random.fork_rng(devices=[]), pinned(cfg):
        torch.manual_seed(stage_seed(cfg.seed, "init"))
        return build_model(cfg, len(data.Language()))


def _optimizer(name, params, lr):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return torch.optim.SGD(params, lr=lr)


def sft(model, cfg: TrainConfig, structure: str) -> list[float]:
    """Train on prompt + (noisy) label + suffix; returns the loss per step (mean token NLL)."""
    with pinned(cfg):
        return _sft(model, cfg, structure)


def _sft(model, cfg: TrainConfig, structure: str) -> list[float]:
    ids, mask = data.sft_sequences(structure, cfg.n_train, stage_seed(cfg.seed, "sft-data"), cfg.label_noise)
    ids, mask = ids.to(cfg.device), mask.to(cfg.device).clone()
    mask[:, 0] = 0
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr)
    g = torch.Generator().manual_seed(stage_seed(cfg.seed, "sft-batches"))
    history = loop.LossHistory()
    loop.train_steps(opt, lambda rows: token_nll(model, ids[rows], mask[rows]), len(ids), cfg.batch, g,
                     range(cfg.sft_steps), device=cfg.device, autocast=cfg.autocast, callback=history)
    return history.losses


def token_nll(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over the tokens ``mask`` (N, T) selects (pretraining, SFT)."""
    return -(lm.token_logps(lm.logits(model, ids, mask), ids) * mask).sum() / mask.sum()


def pair_objective(loss: str, params: dict) -> Callable:
    """The plain preference objective: mean over the batch of the registered ``loss``."""
    lossfn = losses.get(loss)

    def objective(model, batch, lw_ref, ll_ref, len_w, len_l):
        lw, ll = lm.pair_logps(model, batch)
        return lossfn("torch", lw, ll, lw_ref, ll_ref, len_w, len_l, **params).mean()

    return objective


def _save(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _measure(model, opt, cfg, evals, loss, params, ref_eval, step, tokens: bool, objective=None,
             one_pair: bool = True):
    """Before the step: geometry, the one-pair check (unless ``one_pair`` is False) and
    (optionally) token cosines.

    With a custom ``objective`` (a mitigation), the one-pair check is that objective's plain
    gradient step on each pair alone (:func:`measure.method_pair_check`)."""
    stats = probe.pair_stats(model, evals)
    row = {"step": step, "lw": float(stats["lw"].mean()), "ll": float(stats["ll"].mean()),
           "lw_per_token": float((stats["lw"] / evals.chosen_mask.sum(1)).mean()),
           "ll_per_token": float((stats["ll"] / evals.rejected_mask.sum(1)).mean()),
           "margin": float((stats["lw"] - stats["ll"]).mean()),
           "cos": float(stats["cos"].mean()), "ip": float(stats["ip"].mean()),
           "nw2": float(stats["nw2"].mean()), "nl2": float(stats["nl2"].mean())}
    if not one_pair:
        return stats, row, {}
    if objective is None:
        one = measure.pair_check(model, evals, loss, params, ref_eval, measure.adam_precond(opt, model))
    else:
        one = measure.method_pair_check(model, evals, objective, ref_eval)
    row |= {"pair_agreement": float(np.mean(one["pred"] == one["real"])),
            "pair_ideal_fraction": float(np.mean(one["real"] == regimes.IDEAL)),
            "pair_confusion": measure.confusion(one["pred"], one["real"]).tolist(),
            "one_pair": {"pred_start_dlw": one["pred_dlw"].tolist(), "pred_start_dll": one["pred_dll"].tolist(),
                         "pred_start_regime": one["pred"].tolist()}}
    extra = {"token_cos": measure.token_cosines(model, evals, range(cfg.token_pairs))} if tokens else {}
    return stats, row, extra


def preference_data(structure: str, cfg: TrainConfig):
    """The preference training and eval pairs of a run (:class:`lm.PairBatch` each, on ``cfg.device``):
    their own random streams, cut to ``cfg.suffix_len`` suffix tokens when that is set."""
    train = data.pairs(structure, cfg.n_train, stage_seed(cfg.seed, "pref-train"), suffix_len=cfg.suffix_len)
    evals = data.pairs(structure, cfg.n_eval, stage_seed(cfg.seed, "pref-eval"), suffix_len=cfg.suffix_len)
    return train.batch.to(cfg.device), evals.batch.to(cfg.device)


def preference(model, cfg: TrainConfig, structure: str, loss: str, params: dict, progress=False, *,
               objective: Callable | None = None, make_optimizer: Callable | None = None,
               out: Path | None = None, resume: bool = False, until: int | None = None) -> dict:
    """Preference optimisation against the model as it is now (the SFT model) as reference.

    ``objective(model, batch, lw_ref, ll_ref, len_w, len_l) -> scalar`` replaces the plain loss
    (mitigations: :mod:`gesim.methods`); ``make_optimizer(model) -> Optimizer`` replaces
    ``cfg.optimizer``. With ``out``, checkpoints go to ``out/checkpoint.pt`` (and ``resume``
    continues from there); ``until`` stops after that many steps (a later call resumes).
    The result's ``pairs`` holds per eval pair: lw, ll and cos at the start, lw and ll after
    the last step, the one-pair prediction at the start and (``cfg.light``) the first-order
    prediction summed over every step.
    """
    with pinned(cfg):
        return _preference(model, cfg, structure, loss, params, progress, objective=objective,
                           make_optimizer=make_optimizer, out=out, resume=resume, until=until)


def _preference(model, cfg, structure, loss, params, progress, *, objective, make_optimizer, out, resume, until):
    losses.get(loss).params(**params)
    custom = objective
    objective = objective or pair_objective(loss, params)
    train, evals = preference_data(structure, cfg)
    opt = make_optimizer(model) if make_optimizer else _optimizer(cfg.optimizer, model.parameters(), cfg.lr)
    g = torch.Generator().manual_seed(stage_seed(cfg.seed, "pref-batches"))
    ckpt = Path(out) / "checkpoint.pt" if out else None
    meter = _Meter(model, opt, cfg, evals, loss, params, custom)
    if resume and ckpt and ckpt.exists():
        state = torch.load(ckpt, map_location=cfg.device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        g.set_state(state["generator"])
        start, ref = state["step"], state["ref"]
        meter.history, meter.extra, meter.acc = state["history"], state["extra"], state["acc"]
    else:
        with torch.no_grad():
            ref = {"train": lm.pair_logps(model, train), "eval": lm.pair_logps(model, evals)}
        start = 0
    (lw_ref, ll_ref), len_w, len_l = ref["train"], train.chosen_mask.sum(1), train.rejected_mask.sum(1)
    tel = train_telemetry.recorder(model, cfg.telemetry, custom is not None)
    stop = cfg.pref_steps if until is None else min(until, cfg.pref_steps)
    meter.ref_eval, meter.stop = ref["eval"], stop
    if ckpt:  # everything a resumed run needs, the batch stream's state included
        meter.checkpoint = lambda step: _save(ckpt, {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "generator": g.get_state(), "step": step,
            "history": meter.history, "extra": meter.extra, "ref": ref, "acc": meter.acc})
    steps = range(start, stop)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"{structure} {loss}", unit="step", initial=start, total=cfg.pref_steps)
    def loss_of(rows):
        return objective(model, train.take(rows), lw_ref[rows], ll_ref[rows], len_w[rows], len_l[rows])

    backward = None
    if tel is not None:
        def backward(step, rows):  # the same loss and gradients, recorded pair by pair
            L, pair_rows = train_telemetry.step(tel, model, opt, train.take(rows), loss, params, (
                lw_ref[rows], ll_ref[rows], len_w[rows], len_l[rows]), cfg.autocast())
            train_telemetry.log(meter.extra, step, structure, pair_rows, rows, out)
            return L

    loop.train_steps(opt, loss_of, len(train), cfg.batch, g, steps, device=cfg.device, autocast=cfg.autocast,
                     callback=meter, backward=backward)
    done = stop == cfg.pref_steps
    extra = meter.extra
    if done:
        with torch.no_grad():
            lw_final, ll_final = lm.pair_logps(model, evals)
        extra["pairs"].update({"lw_final": lw_final.tolist(), "ll_final": ll_final.tolist(),
                               "cos_end": extra.pop("pairs_cos_end")})
        if cfg.light:
            extra["pairs"].update({k: v.tolist() for k, v in meter.acc.items()})
    return {"history": meter.history, "done": done, **extra}


class _Meter(loop.Callback):
    """The preference stage's measurements (the module docstring) as a callback of the loop.

    ``before``: at step 0, the last step and every ``eval_every`` steps (``cfg.light``: the
    first and last only) the geometry, the one-pair check and the token cosines of the eval
    pairs (:func:`_measure`); a snapshot of the parameters. ``after``: the whole-batch check of
    the step just taken (first-order prediction against the realised change), the history
    row, and a checkpoint every ``checkpoint_every`` steps and at the stop.
    """

    def __init__(self, model, opt, cfg, evals, loss, params, custom):
        self.model, self.opt, self.cfg, self.evals, self.loss, self.params, self.custom = \
            model, opt, cfg, evals, loss, params, custom
        self.history, self.extra, self.checkpoint, self.stop = [], {}, None, None
        self.acc = {"pred_sum_dlw": torch.zeros(len(evals), dtype=torch.float64),
                    "pred_sum_dll": torch.zeros(len(evals), dtype=torch.float64)}

    def before(self, step, rows):
        cfg, extra = self.cfg, self.extra
        last = step == cfg.pref_steps - 1
        self.measured = step == 0 or last or (not cfg.light and step % cfg.eval_every == 0)
        if self.measured:
            self.stats, self.row, tokens = _measure(self.model, self.opt, cfg, self.evals, self.loss, self.params,
                                                    self.ref_eval, step, tokens=not cfg.light and (step == 0 or last),
                                                    objective=self.custom, one_pair=not cfg.light or step == 0)
            extra.update({("token_cos_first" if step == 0 else "token_cos_last"): v for v in tokens.values()})
            if step == 0:
                extra["pairs"] = {"lw_start": self.stats["lw"].tolist(), "ll_start": self.stats["ll"].tolist(),
                                  "cos_start": self.stats["cos"].tolist(), **self.row.pop("one_pair")}
            else:
                self.row.pop("one_pair", None)
            if last:
                extra["pairs_cos_end"] = self.stats["cos"].tolist()
        if self.measured or cfg.light:
            self.theta = {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def after(self, step, rows, loss):
        model, evals = self.model, self.evals
        if self.measured or self.cfg.light:
            u = {n: p.detach() - self.theta[n] for n, p in model.named_parameters()}
            pred_w, pred_l = measure.step_check(model, self.theta, evals, u)
            self.acc["pred_sum_dlw"] += pred_w.detach().double().cpu()
            self.acc["pred_sum_dll"] += pred_l.detach().double().cpu()
        if self.measured:
            with torch.no_grad():
                after_w, after_l = lm.pair_logps(model, evals)
            real_w, real_l = after_w - self.stats["lw"], after_l - self.stats["ll"]
            pred = regimes.regime_codes(pred_w.cpu().numpy(), pred_l.cpu().numpy())
            real = regimes.regime_codes(real_w.cpu().numpy(), real_l.cpu().numpy())
            self.row.update({"loss": float(loss.detach()), "regime_agreement": float(np.mean(pred == real)),
                             "ideal_fraction": float(np.mean(real == regimes.IDEAL)),
                             "batch_confusion": measure.confusion(pred, real).tolist(),
                             "pred_dlw": float(pred_w.mean()), "real_dlw": float(real_w.mean()),
                             "pred_dll": float(pred_l.mean()), "real_dll": float(real_l.mean())})
            self.history.append(self.row)
        if self.checkpoint and ((step + 1) % self.cfg.checkpoint_every == 0 or step + 1 == self.stop):
            self.checkpoint(step + 1)


_SFT_CACHE: dict = {}


def sft_model(structure: str, cfg: TrainConfig, out: Path | None = None):
    """The model after SFT on ``structure`` and the SFT loss history.

    Cached in memory per (structure, everything in ``cfg`` that SFT depends on), and on disk
    as ``out/sft.pt`` when ``out`` is given, so several losses share one SFT run.
    """
    key = (structure, cfg.arch, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.sft_steps, cfg.sft_lr,
           cfg.label_noise, cfg.n_train, cfg.batch, cfg.amp, cfg.seed, cfg.device, cfg.threads)
    model = init_model(cfg)
    path = Path(out) / "sft.pt" if out else None
    saved = torch.load(path, map_location=cfg.device, weights_only=False) if path and path.exists() else None
    if saved is not None and saved["key"] == key:
        state, history = saved["model"], saved["history"]
    elif key in _SFT_CACHE:
        state, history = _SFT_CACHE[key]
    else:
        history = sft(model, cfg, structure)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if path and (saved is None or saved["key"] != key):
        _save(path, {"key": key, "model": state, "history": history})
    _SFT_CACHE[key] = (state, history)
    model.load_state_dict(state)
    model.eval()
    return model, history


def summary(structure: str, loss: str, params: dict, cfg: TrainConfig, sft_loss: list, out: dict) -> dict:
    """The run's headline numbers (the CLI's JSON) plus the history and the config."""
    h = out["history"]
    pair_c = np.sum([r["pair_confusion"] for r in h if "pair_confusion" in r], axis=0)
    batch_c = np.sum([r["batch_confusion"] for r in h], axis=0)
    return {"structure": structure, "loss": loss, "params": params, "steps": cfg.pref_steps,
            "sft_loss_first": sft_loss[0] if sft_loss else None, "sft_loss_last": sft_loss[-1] if sft_loss else None,
            "cos_first": h[0]["cos"], "cos_last": h[-1]["cos"], "cos_mean": float(np.mean([r["cos"] for r in h])),
            "lw_start": h[0]["lw"], "lw_end": h[-1]["lw"], "ll_start": h[0]["ll"], "ll_end": h[-1]["ll"],
            "regime_agreement": float(np.mean([r["regime_agreement"] for r in h])),
            "pair_agreement": float(np.trace(pair_c) / pair_c.sum()),
            "regimes": list(regimes.REGIMES), "pair_confusion": pair_c.tolist(), "batch_confusion": batch_c.tolist(),
            "token_cos_first": out.get("token_cos_first", []), "token_cos_last": out.get("token_cos_last", []),
            "outcomes": measure.pair_outcomes(out["pairs"]), "pairs": out["pairs"], "history": h,
            "config": dataclasses.asdict(cfg),
            **{k: out[k] for k in ("train_telemetry", "train_pairs") if k in out}}


SCALARS = ("step", "lw", "ll", "lw_per_token", "ll_per_token", "margin", "cos", "ip", "nw2", "nl2", "loss",
           "regime_agreement", "ideal_fraction", "pair_ideal_fraction", "pair_agreement", "pred_dlw", "real_dlw",
           "pred_dll", "real_dll")


def write_metrics(out: Path, result: dict) -> None:
    """``metrics.csv`` (one row per measured step) and ``summary.json`` in ``out``, atomically."""
    buf = io.StringIO()
    rows, fields = result["history"], SCALARS
    if result.get("train_telemetry"):  # every step's training-pair fractions (gesim.transformer.telemetry)
        rows = train_telemetry.metrics_rows(rows, result["train_telemetry"])
        fields = SCALARS + train_telemetry.FRACTION_KEYS
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(Path(out) / "metrics.csv", buf.getvalue())
    write_json(Path(out) / "summary.json", result)


def run(structure: str, loss: str = "dpo", params: dict | None = None, cfg: TrainConfig | None = None,
        progress: bool = False, *, out=None, resume: bool = False, until: int | None = None, **hooks) -> dict:
    """SFT then preference optimisation on one pair structure: the :func:`summary` of the run.

    ``out``: a folder for ``sft.pt``, ``checkpoint.pt``, ``metrics.csv`` and ``summary.json``;
    ``resume`` continues an interrupted run there; ``until`` stops early (resumable);
    ``hooks``: ``objective`` / ``make_optimizer`` for :func:`preference`.
    """
    cfg = cfg or TrainConfig.fast()
    params = params or {}
    if out and not resume and (Path(out) / "checkpoint.pt").exists():
        (Path(out) / "checkpoint.pt").unlink()
    model, sft_loss = sft_model(structure, cfg, out)
    result = preference(model, cfg, structure, loss, params, progress, out=out, resume=resume, until=until, **hooks)
    if not result["done"]:
        return {"structure": structure, "loss": loss, "done": False, "history": result["history"]}
    final = summary(structure, loss, params, cfg, sft_loss, result)
    if out:
        write_metrics(out, final)
    return final

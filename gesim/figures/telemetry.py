"""Entanglement of the training batches themselves, step by step (issue 15): gesim's trainer
with ``telemetry="pairs"`` reads every training pair's own-step regime and cos(g_w, g_l) from
the training step's own backward pass (:mod:`gesim.transformer.telemetry`).

Fast mode: one seed, a shortened SFT (150 steps) and 30 DPO steps per structure; full mode:
3 seeds, the full preset.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gesim.figures import figure

DATASETS = ("1t", "short-suffix", "long-suffix")
COLORS = {"ideal": "C2", "both_down": "C3", "both_up": "C0", "unknown": "0.6"}
SHOWN = ("ideal", "both_down", "both_up")


def config(ctx):
    from gesim.transformer.train import TrainConfig

    if ctx.fast:
        return TrainConfig.fast(sft_steps=150, pref_steps=30, eval_every=30, token_pairs=0, n_eval=4,
                                device=ctx.device, telemetry="pairs")
    return TrainConfig.full(device=ctx.device, telemetry="pairs", token_pairs=0)


def runs(ctx) -> list[dict]:
    """Per (seed, structure): the per-step fractions and the per-pair cos of the training batches."""
    from gesim.transformer.train import run

    n = 1 if ctx.fast else 3
    cfg = config(ctx)
    rows = []
    for k in range(n):
        seed = ctx.figure_seed + k
        for name in DATASETS:
            out = run(name, "dpo", cfg=dataclasses.replace(cfg, seed=seed))
            pairs = out["train_pairs"]
            rows.append({"seed": seed, "dataset": name, "steps": [t["step"] for t in out["train_telemetry"]],
                         "fractions": {r: [t[f"train_frac_{r}"] for t in out["train_telemetry"]]
                                       for r in (*SHOWN, "unknown")},
                         "mean_cos": [t["train_mean_cos"] for t in out["train_telemetry"]],
                         "pair_step": pairs["step"], "pair_cos": pairs["cos"]})
    return rows


@figure("training_telemetry",
        "Small GPT, DPO after SFT, every training pair of every step read from the training step's own backward "
        "(StepTelemetry): per-step fractions of the batch's pairs whose own step is ideal / both down / both up "
        "(stacked, mean over seeds) and the distribution of cos(g_w, g_l) over the trained pairs, for the 1t, "
        "short-suffix and long-suffix datasets")
def training_telemetry(ctx):
    from gesim import plotting

    rows = runs(ctx)
    fig, axes = plotting.figure(1, 4, width=15, height=3.6)
    summary = {}
    for ax, name in zip(axes[:3], DATASETS):
        mine = [r for r in rows if r["dataset"] == name]
        steps = mine[0]["steps"]
        mean = {g: np.mean([r["fractions"][g] for r in mine], axis=0) for g in (*SHOWN, "unknown")}
        rest = 1 - sum(mean[g] for g in SHOWN)  # chosen down & rejected up, stalled, unknown (0 for DPO)
        ax.stackplot(steps, *(mean[g] for g in SHOWN), rest, colors=[COLORS[g] for g in SHOWN] + ["0.6"],
                     labels=[g.replace("_", " ") for g in SHOWN] + ["other"], alpha=0.85)
        ax.set_title(f"{name}: regime of each pair's own step")
        ax.set_xlabel("DPO step")
        ax.set_ylabel("fraction of the batch's pairs (stacked)")
        ax.set_ylim(-0.02, 1.02)
        cos = np.concatenate([np.asarray(r["pair_cos"], float) for r in mine])
        summary[name] = {"both_down": float(np.mean([np.mean(r["fractions"]["both_down"]) for r in mine])),
                         "ideal": float(np.mean([np.mean(r["fractions"]["ideal"]) for r in mine])),
                         "mean_cos": float(np.mean(cos)), "cos_q10": float(np.quantile(cos, 0.1)),
                         "cos_q90": float(np.quantile(cos, 0.9)), "pairs": int(cos.size)}
        axes[3].hist(cos, bins=np.linspace(-1, 1, 41), histtype="step", lw=1.6, color=plotting_color(name),
                     label=f"{name} (mean {summary[name]['mean_cos']:+.2f})")
    axes[0].legend(loc="lower left")
    axes[3].set_title(r"$\cos(g_w, g_l)$ over trained pairs, all steps")
    axes[3].set_xlabel(r"$\cos(g_w, g_l)$")
    axes[3].set_ylabel("pairs x steps")
    axes[3].legend(loc="upper left", fontsize=8)
    n_seeds = len({r["seed"] for r in rows})
    fig.suptitle("Training batches, DPO: pairs whose own step is 'both down' " + ", ".join(
        f"{n} {100 * summary[n]['both_down']:.0f}%" for n in DATASETS) + "; mean cos " + ", ".join(
        f"{n} {summary[n]['mean_cos']:+.2f}" for n in DATASETS) + f" ({n_seeds} seed{'s' * (n_seeds > 1)})")
    fig.tight_layout()
    return fig, {"config": dataclasses.asdict(config(ctx)), "summary": summary, "per_run": rows}


def plotting_color(name: str) -> str:
    from gesim.figures.transformer import COLORS as STRUCTURE_COLORS

    return STRUCTURE_COLORS[name]

"""Figures from the small Transformer (theory.md section 5): the paper's sentiment study offline."""

from __future__ import annotations

from gesim.figures import figure

DATASETS = ("1t", "short-suffix", "long-suffix")


@figure("transformer_dynamics",
        "Small GPT, DPO after SFT: chosen and rejected log-probs and the gradient cosine over training, "
        "for the 1t, short-suffix and long-suffix datasets")
def transformer_dynamics(ctx):
    from gesim import plotting
    from gesim.transformer.train import TrainConfig, run

    preset = TrainConfig.fast if ctx.fast else TrainConfig.full
    cfg = preset(seed=ctx.seed, device=ctx.device)
    fig, axes = plotting.figure(1, 3, width=12, height=3.4)
    data = {"config": None, "datasets": {}}
    for name in DATASETS:
        out = run(name, "dpo", cfg=cfg)
        h = out["history"]
        steps = [r["step"] for r in h]
        dlw = [r["lw"] - h[0]["lw"] for r in h]
        dll = [r["ll"] - h[0]["ll"] for r in h]
        axes[0].plot(steps, dlw, label=name)
        axes[1].plot(steps, dll, label=name)
        axes[2].plot(steps, [r["cos"] for r in h], label=name)
        data["config"] = out["config"]
        data["datasets"][name] = {k: out[k] for k in ("cos_first", "cos_last", "cos_mean", "lw_start", "lw_end",
                                                      "ll_start", "ll_end", "regime_agreement")}
        data["datasets"][name]["history"] = h
    for ax, title in zip(axes, ("chosen: lw - lw(start)", "rejected: ll - ll(start)", "mean cos(g_w, g_l)")):
        ax.set_title(title)
        ax.set_xlabel("DPO step")
        ax.axhline(0, color="0.7", lw=0.8)
    axes[2].legend()
    fig.suptitle("Shared suffixes entangle: 1t has cos < 0 and chosen up; the long suffix has cos near 1 and "
                 "chosen down (DPO, AdamW)")
    fig.tight_layout()
    return fig, data

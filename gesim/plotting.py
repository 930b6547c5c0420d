"""House style for gesim's figures: regime and loss colours, deterministic saving.

Imports matplotlib with the non-interactive Agg backend; nothing below this module in the
layering imports matplotlib.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from gesim import losses, regimes  # noqa: E402
from gesim.output import atomic_write_bytes  # noqa: E402

#: One colour per regime, in the order of :data:`gesim.regimes.REGIMES`.
REGIME_COLORS = {
    "ideal": "#4c9f70",
    "both_down": "#d1495b",
    "both_up": "#edae49",
    "chosen_down_rejected_up": "#5b4b8a",
    "stalled": "#bdbdbd",
}
REGIME_CMAP = ListedColormap([REGIME_COLORS[r] for r in regimes.REGIMES])

STYLE = {
    "figure.dpi": 110, "savefig.dpi": 150, "font.size": 9, "axes.titlesize": 9,
    "axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False,
    "svg.hashsalt": "gesim", "pdf.fonttype": 42,
}


#: Palettes :func:`palette_color` walks through, in order: 60 distinct colours.
PALETTES = ("tab20", "tab20b", "tab20c")


def palette_color(index: int):
    """The ``index``-th colour of an endless sequence whose colours never repeat.

    The first 60 come from tab20, tab20b and tab20c; beyond them hues step by the golden
    ratio (never returning to the same hue) at alternating saturation and value."""
    import colorsys

    if index < 20 * len(PALETTES):
        return plt.get_cmap(PALETTES[index // 20])(index % 20)
    k = index - 20 * len(PALETTES)
    hue = (k * 0.6180339887498949) % 1.0
    sat, val = (0.85, 0.55, 0.7)[k % 3], (0.6, 0.85, 0.95)[(k // 3) % 3]
    return (*colorsys.hsv_to_rgb(hue, sat, val), 1.0)


def loss_color(name: str):
    """A stable colour per loss: registry order through :func:`palette_color`, so no two
    registered losses share a colour however many there are (an unregistered name gets a
    colour from a hash of its name that is the same in every process)."""
    import zlib

    names = losses.names()
    index = names.index(name) if name in names else len(names) + zlib.crc32(name.encode()) % 997
    return palette_color(index)


def nested_styles(n: int) -> list[dict]:
    """Line styles for ``n`` curves that may coincide: each later curve is drawn on top,
    thinner and with a smaller marker of another shape, so a curve identical to an earlier
    one shows as a line inside a line instead of hiding it."""
    markers = "osD^vp*h<>"
    out = []
    for i in range(n):
        f = 1 - 0.8 * i / max(n - 1, 1)
        out.append({"marker": markers[i % len(markers)], "markersize": 9 * f + 2,
                    "linewidth": 4.5 * f + 0.3, "zorder": 2 + i})
    return out


def same_as(label: str, y, drawn: dict, rtol: float = 1e-9) -> str:
    """``label``, plus " (= OTHER)" when the series ``y`` equals an already ``drawn`` one
    (``drawn``: label -> series), so a legend says which curves lie on top of each other."""
    import numpy as np

    for other, z in drawn.items():
        if len(z) == len(y) and np.allclose(np.asarray(y, float), np.asarray(z, float), rtol=rtol, atol=1e-12,
                                            equal_nan=True):
            return f"{label} (= {other})"
    return label


def figure(nrows=1, ncols=1, width=6.0, height=4.0, **kwargs):
    """A new figure in the house style: ``(fig, axes)``."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), **kwargs)
    return fig, axes


def save(fig, stem) -> list[Path]:
    """Save ``fig`` as ``stem.png`` and ``stem.pdf``, atomically and without timestamps."""
    paths = []
    with plt.rc_context(STYLE):
        for ext, meta in (("png", {"Software": None}), ("pdf", {"CreationDate": None, "Producer": None})):
            buf = io.BytesIO()
            fig.savefig(buf, format=ext, metadata=meta, bbox_inches="tight")
            paths.append(atomic_write_bytes(Path(f"{stem}.{ext}"), buf.getvalue()))
    plt.close(fig)
    return paths


def regime_legend(ax, **kwargs) -> None:
    """A legend of the regime colours."""
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=r.replace("_", " ")) for r, c in REGIME_COLORS.items()]
    ax.legend(handles=handles, **kwargs)

"""Draw the README figure: the LCA front end, the energy-based RCNN trained with EP, and the
dictionary fine-tuning loop. Run ``python images/draw_framework.py`` to rewrite
``images/LCA-RCNN.png``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

LCA_COLOR = "#f6c85f"
EBM_COLOR = "#6f9fd8"
NUDGE_COLOR = "#d9534f"
TEXT_COLOR = "#222222"


def box(ax, x, y, w, h, text, color, fontsize=10):
    """A rounded box with centred text; (x, y) is the lower-left corner in axes units."""
    patch = FancyBboxPatch(
        (x, y),
        w,
        h,
        boxstyle="round,pad=0.01,rounding_size=0.015",
        facecolor=color,
        edgecolor="#333333",
        linewidth=1.2,
        alpha=0.9,
    )
    ax.add_patch(patch)
    ax.text(
        x + w / 2,
        y + h / 2,
        text,
        ha="center",
        va="center",
        fontsize=fontsize,
        color=TEXT_COLOR,
        wrap=True,
    )


def arrow(ax, start, end, color="#333333", style="-|>", linestyle="-", both=False, rad=0.0):
    """An arrow from ``start`` to ``end`` (axes units); ``both`` draws a two-way coupling."""
    arrowstyle = "<|-|>" if both else style
    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            arrowstyle=arrowstyle,
            mutation_scale=14,
            color=color,
            linewidth=1.6,
            linestyle=linestyle,
            connectionstyle=f"arc3,rad={rad}",
        )
    )


def draw(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(12, 4.6))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")

    # a) LCA front end
    ax.text(0.02, 0.95, "a) sparse coding (LCA)", fontsize=12, weight="bold")
    box(ax, 0.02, 0.55, 0.10, 0.22, "image\n$x$", "#dddddd")
    box(
        ax,
        0.17,
        0.55,
        0.14,
        0.22,
        "LCA dynamics\n$T_{LCA}$ steps\n$u \\leftarrow u + (b - u - Ga)/\\tau$",
        LCA_COLOR,
        9,
    )
    box(ax, 0.17, 0.20, 0.14, 0.18, "dictionary $D$\n(pretrained)", LCA_COLOR)
    box(ax, 0.36, 0.55, 0.10, 0.22, "sparse code\n$a = T_\\lambda(u)$", LCA_COLOR)
    arrow(ax, (0.12, 0.66), (0.17, 0.66))
    arrow(ax, (0.24, 0.38), (0.24, 0.55))
    arrow(ax, (0.31, 0.66), (0.36, 0.66))

    # b) energy-based RCNN
    ax.text(0.36, 0.95, "b) energy-based RCNN trained with EqProp", fontsize=12, weight="bold")
    layers = [("copy\n$s_0$", 0.50), ("conv\n$s_1$", 0.615), ("conv\n$s_2$", 0.73)]
    for label, x in layers:
        box(ax, x, 0.55, 0.07, 0.22, label, EBM_COLOR)
    box(ax, 0.84, 0.55, 0.08, 0.22, "softmax\nreadout", EBM_COLOR)
    arrow(ax, (0.46, 0.66), (0.50, 0.66), style="-|>")
    ax.text(0.48, 0.70, "held", fontsize=8, ha="center")
    for (_, x0), (_, x1) in zip(layers, layers[1:], strict=False):
        arrow(ax, (x0 + 0.07, 0.66), (x1, 0.66), both=True)
    arrow(ax, (0.80, 0.66), (0.84, 0.66))
    arrow(ax, (0.88, 0.80), (0.88, 0.77), color=NUDGE_COLOR)
    ax.text(
        0.88,
        0.84,
        "nudge $\\beta\\,\\partial L/\\partial s$",
        color=NUDGE_COLOR,
        fontsize=9,
        ha="center",
    )
    ax.text(
        0.66,
        0.47,
        "free phase $s^0_*$, nudged phases $s^{\\pm\\beta}_*$;\n"
        "$\\Delta\\theta \\propto \\partial\\Phi(s^{\\beta}_*)/\\partial\\theta - "
        "\\partial\\Phi(s^{-\\beta}_*)/\\partial\\theta$",
        fontsize=9,
        ha="center",
        va="top",
    )

    # c) dictionary fine-tuning
    ax.text(
        0.36,
        0.14,
        "c) fine-tuning: $D_* \\leftarrow D + \\eta\\, T_\\lambda(s^{\\beta}_{0*})"
        " \\otimes (x - D\\,T_\\lambda(s^{\\beta}_{0*}))$",
        fontsize=11,
        color=NUDGE_COLOR,
    )
    arrow(ax, (0.55, 0.55), (0.31, 0.30), color=NUDGE_COLOR, linestyle="--", rad=-0.25)

    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    draw(Path(__file__).with_name("LCA-RCNN.png"))

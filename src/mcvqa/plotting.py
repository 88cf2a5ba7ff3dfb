"""Matplotlib set-up shared by every plot mcvqa draws (loss curves, reports, the serve page)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

# Hangul needs a CJK font; matplotlib falls back glyph by glyph through this list (>= 3.6).
CJK_FONTS = ["Noto Sans CJK KR", "Noto Sans KR", "NanumGothic", "Malgun Gothic", "AppleGothic", "Source Han Sans K"]


@lru_cache(maxsize=1)
def setup() -> None:
    """Headless backend and a font list that renders Korean: a system CJK font where one is installed, else the
    NanumGothic that the koreanize-matplotlib dependency ships (said once), else boxes (warned once)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import font_manager

    available = {f.name for f in font_manager.fontManager.ttflist}
    cjk = [f for f in CJK_FONTS if f in available]
    if not cjk:
        bundled = bundled_korean_font()
        if bundled is not None:
            font_manager.fontManager.addfont(str(bundled))
            cjk = [font_manager.FontProperties(fname=str(bundled)).get_name()]
            import logging

            logging.getLogger("mcvqa").info("no system Korean font: plots use %s from koreanize-matplotlib", cjk[0])
    if not cjk:  # once per process (lru_cache): the plots still render, Korean as empty boxes
        import warnings

        warnings.warn(
            "no Korean font is installed, so Korean text in plots shows as boxes; install one of "
            f"{', '.join(CJK_FONTS[:3])} (e.g. apt install fonts-noto-cjk, or fonts-nanum), or pip install "
            "koreanize-matplotlib, and run again", stacklevel=2,
        )
    matplotlib.rcParams["font.family"] = ["DejaVu Sans", *cjk]
    matplotlib.rcParams["axes.unicode_minus"] = False


def bundled_korean_font() -> Path | None:
    """NanumGothic.ttf from the koreanize-matplotlib package (a dependency), without importing it (its import
    changes matplotlib's global settings); None when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("koreanize_matplotlib")
    if spec is None or spec.origin is None:
        return None
    font = Path(spec.origin).parent / "fonts" / "NanumGothic.ttf"
    return font if font.is_file() else None


def plot_loss(losses: list[list[float]], history: list[dict[str, Any]], path: Path) -> None:
    """Training loss per optimiser step (and its running mean), validation accuracy per epoch on a second axis."""
    import matplotlib.pyplot as plt

    setup()

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if losses:
        steps, vals = zip(*losses)
        ax.plot(steps, vals, lw=1, alpha=0.5, label="train loss (per step)")
        k = max(1, len(vals) // 25)
        smooth = np.convolve(vals, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=2, label=f"train loss ({k}-step mean)")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("cross-entropy of the answer letter")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    val = [(h["step"], h["val_accuracy"]) for h in history if "val_accuracy" in h]
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val), "o-", color="tab:green", label="validation accuracy")
        ax2.set_ylabel("validation accuracy")
        ax2.set_ylim(0, 1.02)
        ax2.legend(loc="lower left")
    ax.legend(loc="upper right")
    ax.set_title("mcvqa train")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)

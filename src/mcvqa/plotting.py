"""Matplotlib set-up shared by every plot mcvqa draws (loss curves, reports, the serve page)."""

from __future__ import annotations

from functools import lru_cache

# Hangul needs a CJK font; matplotlib falls back glyph by glyph through this list (>= 3.6).
CJK_FONTS = ["Noto Sans CJK KR", "Noto Sans KR", "NanumGothic", "Malgun Gothic", "AppleGothic", "Source Han Sans K"]


@lru_cache(maxsize=1)
def setup() -> None:
    """Headless backend and a font list that renders Korean where such a font is installed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import font_manager

    available = {f.name for f in font_manager.fontManager.ttflist}
    cjk = [f for f in CJK_FONTS if f in available]
    matplotlib.rcParams["font.family"] = ["DejaVu Sans", *cjk]
    matplotlib.rcParams["axes.unicode_minus"] = False

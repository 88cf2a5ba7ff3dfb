"""``mcvqa report``: one self-contained HTML file to look at a run's errors instead of reading tables.

Everything is embedded (plots as PNG, photos as JPEG thumbnails, both base64): no server, no internet,
mail it or open it from disk. Plots are matplotlib.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from mcvqa.config import LETTERS
from mcvqa.data import Item, read_csv
from mcvqa.errors import DataError
from mcvqa.evaluate import PROB_COLUMNS, align, metrics, read_probs, reliability

# Keyword classifier over the Korean question. First match wins, in this order: a negation about colours
# is a negation first (it is the harder part of the question).
QUESTION_TYPES: list[tuple[str, tuple[str, ...]]] = [
    ("negation", ("아닌", "없는", "않은", "않는", "틀린", "없을", "볼 수 없")),
    ("count", ("몇 개", "몇 명", "몇 마리", "몇 대", "개수", "몇개", "몇 잔", "몇 층")),
    ("colour", ("색", "빛깔")),
    ("text", ("글자", "문구", "적힌", "쓰인", "쓰여", "간판", "텍스트", "숫자", "알파벳", "글씨", "표지")),
    ("food", ("음식", "먹", "요리", "과일", "음료", "디저트", "빵", "반찬", "메뉴")),
    ("place", ("어디", "장소", "위치", "곳", "쪽에", "어느 쪽")),
    ("animal", ("동물", "강아지", "고양이", "개는", "새는", "물고기", "곤충")),
    ("person", ("사람", "남자", "여자", "아이", "하고 있", "입고", "들고 있")),
    ("vehicle", ("탈것", "자동차", "차량", "버스", "기차", "자전거", "오토바이", "비행기", "배는")),
    ("object", ("물건", "물체", "무엇", "무슨", "어떤", "종류")),
]
"""Everyday photos' questions are mostly "what is this thing": ``object`` catches the rest of them, so ``other`` is
what none of these words describe."""


def question_type(question: str) -> str:
    q = question.replace("  ", " ")
    for name, words in QUESTION_TYPES:
        if any(w in q for w in words):
            return name
    return "other"


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _thumb(path: Path, side: int = 320) -> str:
    from mcvqa.errors import ImageError
    from mcvqa.images import load_image

    try:
        img = load_image(path)
    except ImageError:
        return ""
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _plots(m: dict[str, Any], probs: np.ndarray, labels: np.ndarray) -> dict[str, str]:
    import matplotlib.pyplot as plt

    from mcvqa.plotting import setup

    setup()

    out = {}
    fig, ax = plt.subplots(figsize=(4, 3.6))
    cm = np.array(m["confusion"])
    ax.imshow(cm, cmap="Blues")
    for i in range(4):
        for j in range(4):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(4), LETTERS)
    ax.set_yticks(range(4), LETTERS)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix")
    out["confusion"] = _png(fig)

    fig, ax = plt.subplots(figsize=(4, 3.2))
    x = np.arange(4)
    ax.bar(x - 0.2, [m["predicted_distribution"][l] for l in LETTERS], 0.4, label="predicted")
    ax.bar(x + 0.2, [m["answer_distribution"][l] for l in LETTERS], 0.4, label="true")
    ax.set_xticks(x, LETTERS)
    ax.set_ylabel("share of questions")
    ax.set_title("letter distribution (position bias)")
    ax.legend()
    out["letters"] = _png(fig)

    fig, ax = plt.subplots(figsize=(4, 3.6))
    bins = reliability(probs, labels, bins=10)
    mids = [(b["lo"] + b["hi"]) / 2 for b in bins]
    acc = [b["accuracy"] if b["n"] else 0.0 for b in bins]
    ax.bar(mids, acc, width=0.09, label="accuracy", color="tab:blue", alpha=0.8)
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"reliability (ECE {m['ece']:.3f})")
    ax.legend(loc="upper left")
    out["reliability"] = _png(fig)
    return out


def _prob_bars(p: np.ndarray, true: int, pred: int) -> str:
    rows = []
    for k, l in enumerate(LETTERS):
        colour = "#2e7d32" if k == true else ("#c62828" if k == pred else "#90a4ae")
        rows.append(
            f'<div class="bar"><span class="l">{l}</span><span class="track"><span style="width:{100 * p[k]:.1f}%;background:{colour}"></span></span>'
            f'<span class="v">{p[k]:.3f}</span></div>'
        )
    return "".join(rows)


def _card(it: Item, p: np.ndarray, extra: str = "") -> str:
    pred = int(p.argmax())
    true = int(it.answer) if it.answer is not None else -1
    thumb = _thumb(it.image)
    img = f'<img src="{thumb}" alt="{html.escape(it.id)}">' if thumb else '<div class="noimg">image unreadable</div>'
    opts = "".join(
        f'<li class="{"true" if k == true else ("pred" if k == pred else "")}"><b>{l}.</b> {html.escape(o)}</li>' for k, (l, o) in enumerate(zip(LETTERS, it.options))
    )
    return (
        f'<div class="card">{img}<div class="body"><div class="id">{html.escape(it.id)} · {question_type(it.question)}{extra}</div>'
        f'<div class="q">{html.escape(it.question)}</div><ol>{opts}</ol>{_prob_bars(p, true, pred)}'
        f'<div class="verdict">predicted <b>{LETTERS[pred]}</b> ({p[pred]:.2f}), true <b>{LETTERS[true] if true >= 0 else "?"}</b></div></div></div>'
    )


CSS = """
body{font-family:system-ui,-apple-system,'Noto Sans KR',sans-serif;margin:24px;color:#222;max-width:1200px}
h1{margin-bottom:4px} .sub{color:#666;margin-bottom:18px} table{border-collapse:collapse;margin:8px 0 18px}
td,th{border:1px solid #ddd;padding:4px 10px;text-align:right} th{background:#f5f5f5} td:first-child,th:first-child{text-align:left}
.plots img{height:260px;margin-right:12px} .grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:14px}
.card{border:1px solid #ddd;border-radius:8px;overflow:hidden;background:#fff} .card img{width:100%;max-height:240px;object-fit:contain;background:#111}
.body{padding:8px 10px} .id{color:#777;font-size:12px} .q{font-weight:600;margin:4px 0} ol{list-style:none;padding:0;margin:4px 0}
li.true{color:#2e7d32;font-weight:600} li.pred{color:#c62828;text-decoration:line-through} .bar{display:flex;align-items:center;font-size:12px;margin:1px 0}
.bar .l{width:14px} .bar .track{flex:1;background:#eee;height:9px;margin:0 6px;border-radius:4px;overflow:hidden;display:inline-block}
.bar .track span{display:block;height:9px} .bar .v{width:44px;text-align:right} .verdict{font-size:13px;margin-top:4px} .noimg{padding:40px;text-align:center;background:#eee}
"""


def build_report(pred: str | Path, data: str | Path, out: str | Path, *, compare: str | Path | None = None, top_mistakes: int = 24, title: str | None = None,
                 data_root: str | Path | None = None) -> Path:
    """``data_root``: where the CSV's images may lie (default: its folder, or MCVQA_DATA), e.g. the data folder of a
    run's ``val.csv``."""
    from mcvqa.io import atomic_write_text

    ds = read_csv(data, require_answer=True, root=data_root)
    labels = {it.id: int(it.answer) for it in ds}  # type: ignore[arg-type]
    frame = read_probs(pred)
    probs, y, ids, _ = align(frame, labels, pred)
    by_id = {it.id: it for it in ds}
    items = [by_id[i] for i in ids]
    m = metrics(probs, y)
    plots = _plots(m, probs, y)
    types = [question_type(it.question) for it in items]
    correct = probs.argmax(1) == y
    type_rows = []
    for t, n in sorted(Counter(types).items(), key=lambda kv: -kv[1]):
        mask = np.array([tt == t for tt in types])
        type_rows.append(f"<tr><td>{t}</td><td>{n}</td><td>{correct[mask].mean():.3f}</td></tr>")
    conf = probs.max(1)
    mistakes = [i for i in np.argsort(-conf) if not correct[i]][:top_mistakes]
    metric_rows = "".join(
        f"<tr><td>{k}</td><td>{v:.4f}</td></tr>" for k, v in [("accuracy", m["accuracy"]), ("NLL", m["nll"]), ("ECE", m["ece"]), ("Brier", m["brier"]), ("mean confidence", m["mean_confidence"])]
    )
    letter_rows = "".join(
        f"<tr><td>{l}</td><td>{m['accuracy_by_answer'][l]:.3f}</td><td>{m['predicted_distribution'][l]:.3f}</td><td>{m['answer_distribution'][l]:.3f}</td></tr>" for l in LETTERS
    )
    parts = [
        f"<!doctype html><html lang=ko><head><meta charset=utf-8><title>{html.escape(title or 'mcvqa report')}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title or 'mcvqa report')}</h1><div class=sub>{html.escape(str(pred))} on {html.escape(str(data))} · {m['n']} questions</div>",
        f"<h2>Accuracy {m['accuracy']:.4f}</h2><table><tr><th>metric</th><th>value</th></tr>{metric_rows}</table>",
        f"<table><tr><th>letter</th><th>accuracy when true</th><th>predicted share</th><th>true share</th></tr>{letter_rows}</table>",
        f'<div class=plots><img src="{plots["confusion"]}" alt="confusion matrix"><img src="{plots["letters"]}" alt="letter distribution"><img src="{plots["reliability"]}" alt="reliability diagram"></div>',
        f"<h2>Accuracy by question type</h2><table><tr><th>type</th><th>questions</th><th>accuracy</th></tr>{''.join(type_rows)}</table>",
    ]
    if compare is not None:
        parts.append(_comparison(compare, labels, items, probs, y))
    parts.append(f"<h2>Most confident mistakes ({len(mistakes)})</h2><div class=grid>")
    parts += [_card(items[i], probs[i]) for i in mistakes]
    parts.append("</div></body></html>")
    path = Path(out)
    atomic_write_text(path, "\n".join(parts))
    return path


def _comparison(other: str | Path, labels: dict[str, int], items: list[Item], probs: np.ndarray, y: np.ndarray) -> str:
    frame = read_probs(other)
    index = {i: k for k, i in enumerate(frame["id"])}
    missing = [it.id for it in items if it.id not in index]
    if missing:
        raise DataError(other, f"no prediction for id {missing[0]!r}", fix="compare runs scored on the same data")
    q = frame[PROB_COLUMNS].to_numpy(dtype=float)[[index[it.id] for it in items]]
    a_right = probs.argmax(1) == y
    b_right = q.argmax(1) == y
    table = (
        f"<table><tr><th></th><th>B right</th><th>B wrong</th></tr>"
        f"<tr><td>A right</td><td>{int((a_right & b_right).sum())}</td><td>{int((a_right & ~b_right).sum())}</td></tr>"
        f"<tr><td>A wrong</td><td>{int((~a_right & b_right).sum())}</td><td>{int((~a_right & ~b_right).sum())}</td></tr></table>"
    )
    diff = np.flatnonzero(a_right != b_right)[:24]
    cards = "".join(_card(items[i], probs[i], extra=f" · A {'✓' if a_right[i] else '✗'} B {'✓' if b_right[i] else '✗'} ({LETTERS[int(q[i].argmax())]})") for i in diff)
    return (
        f"<h2>A vs B</h2><div class=sub>A = this run, B = {html.escape(str(other))}; accuracy A {a_right.mean():.4f}, B {b_right.mean():.4f}</div>"
        f"{table}<h3>Questions they disagree on ({int((a_right != b_right).sum())})</h3><div class=grid>{cards}</div>"
    )

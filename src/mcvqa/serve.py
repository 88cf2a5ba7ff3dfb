"""``mcvqa serve``: a Gradio page to ask the model one question about one picture.

The model is loaded once; each request is one forward pass through the engine and scorer ``predict`` uses.
An upload that is not a usable image gets a message on the page, not a stack trace.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mcvqa.config import LETTERS, Config
from mcvqa.data import Item
from mcvqa.errors import ImageError, McvqaError


class Answerer:
    """Wraps a scorer for single questions given as an image file and five strings."""

    def __init__(self, cfg: Config, adapter: str | Path | None = None) -> None:
        from mcvqa.predict import build_scorer

        self.cfg = cfg
        self.scorer = build_scorer(cfg, adapter)

    def answer(self, image_path: str | None, question: str, options: list[str]) -> tuple[str, np.ndarray | None]:
        """(markdown message, probabilities or None)."""
        from mcvqa.engine import Engine
        from mcvqa.images import load_prepared

        if not image_path:
            return "**Please upload an image.**", None
        question = " ".join((question or "").split())
        options = [" ".join((o or "").split()) for o in options]
        if not question:
            return "**Please type a question.**", None
        empty = [LETTERS[k] for k, o in enumerate(options) if not o]
        if empty:
            return f"**Option {', '.join(empty)} is empty.** Fill in all four options.", None
        try:
            image = load_prepared(image_path, self.cfg.image)
        except ImageError as e:
            return f"**That file cannot be used as an image:** {e.problem}.", None
        del image  # readable: checked here for a friendly message; the engine decodes it like predict does
        item = Item(id="web", image=Path(image_path), question=question[: self.cfg.data.max_question_chars], options=tuple(o[: self.cfg.data.max_option_chars] for o in options))  # type: ignore[arg-type]
        # The same engine as predict (out-of-memory halving, bad-image policy), one question, no journal.
        p = Engine([item], self.scorer.encoder, 1, progress=False).score(self.scorer, sort_by_length=False).probs[0]
        k = int(p.argmax())
        return f"### Answer: **{LETTERS[k]}. {options[k]}**  ({p[k]:.1%})", p


def bar_chart(p: np.ndarray | None, options: list[str]) -> Any:
    import matplotlib.pyplot as plt

    from mcvqa.plotting import setup

    setup()

    fig, ax = plt.subplots(figsize=(5, 2.4), dpi=100)
    if p is not None:
        colours = ["#2e7d32" if k == int(p.argmax()) else "#90a4ae" for k in range(4)]
        labels = [f"{l}. {o[:18]}" for l, o in zip(LETTERS, options)]
        ax.barh(labels[::-1], p[::-1], color=colours[::-1])
        for y, v in enumerate(p[::-1]):
            ax.text(min(v + 0.01, 0.9), y, f"{v:.2f}", va="center")
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability")
    fig.tight_layout()
    return fig


def example_rows(csv: Path, n: int = 8) -> list[list[str]]:
    from mcvqa.data import read_csv

    ds = read_csv(csv)
    return [[str(it.image), it.question, *it.options] for it in ds.items[:n]]


def build_app(answerer: Answerer, examples: Path | None = None) -> Any:
    import gradio as gr

    def run(image: str | None, question: str, a: str, b: str, c: str, d: str) -> tuple[str, Any]:
        try:
            message, p = answerer.answer(image, question, [a, b, c, d])
        except McvqaError as e:  # anything a user can fix is shown, not raised
            message, p = f"**{e}**", None
        return message, bar_chart(p, [a, b, c, d])

    with gr.Blocks(title="mcvqa") as app:
        gr.Markdown("# mcvqa\nAn image, a question and four options: the model's answer and the probability of each letter.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", label="image", elem_id="image")
                question = gr.Textbox(label="question", elem_id="question", placeholder="이 사진에서 보이는 탈것은 무엇인가요?")
                opts = [gr.Textbox(label=f"option {l}", elem_id=f"option_{l}") for l in LETTERS]
                submit = gr.Button("Answer", variant="primary", elem_id="submit")
            with gr.Column():
                answer = gr.Markdown(elem_id="answer")
                chart = gr.Plot(label="probabilities", elem_id="chart")
        submit.click(run, inputs=[image, question, *opts], outputs=[answer, chart])
        if examples is not None:
            gr.Examples(example_rows(examples), inputs=[image, question, *opts], label="examples from the dataset")
    return app


def launch(cfg: Config, *, adapter: str | Path | None = None, examples: Path | None = None, host: str = "127.0.0.1", port: int = 7860) -> None:
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline machine
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise McvqaError("mcvqa serve needs gradio: pip install 'mcvqa[serve]'") from None
    answerer = Answerer(cfg, adapter)
    app = build_app(answerer, examples)
    # Uploaded files land in a private temp folder; nothing is fetched from the internet.
    app.launch(server_name=host, server_port=port, share=False, allowed_paths=[str(examples.parent)] if examples else None, show_error=True)


__all__ = ["Answerer", "build_app", "launch", "bar_chart"]

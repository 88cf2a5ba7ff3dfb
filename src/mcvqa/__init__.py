"""mcvqa: multiple-choice visual question answering with Qwen-VL.

Layout (one module per concern): data (CSV format, validation, splits), images (decode, letterbox,
native), prompts (prompt text, chat-template segments), features (tokens + pixels, batches), model
(loading), scoring (letter probabilities, prefix cache), predict (submission), evaluate (metrics),
train, adapt (test-time methods), tune (hyperparameter search), report, synth and tiny (local data and
model), cli (thin typer layer).
"""

__version__ = "0.1.0"

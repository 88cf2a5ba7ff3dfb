"""mcvqa: multiple-choice visual question answering with vision-language models (Qwen3-VL and four other families).

The layers, bottom to top (docs/architecture.md; ``tests/test_layout.py`` keeps every import pointing down):
errors; io, compat, plotting; config; runtime, images, prompts, synth, kernels; data; families (everything that
differs between model families, and model access); features (tokens + pixels, batches); model (the only loader);
scoring (letter probabilities, prefix cache); engine (the one batch loop: journal, resume, OOM halving, bad images,
sharding), outputs (submission files), evaluate; ensemble, checkpoint; tta (test-time methods); predict, train;
tune, report, serve, tiny (models built here); demo; cli (thin typer layer).
"""

__version__ = "0.1.0"

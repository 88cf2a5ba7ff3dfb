"""``python -m mcvqa`` (and ``accelerate launch -m mcvqa``)."""

from mcvqa.cli import run

run()

"""Experiment trackers (TensorBoard, Weights & Biases), on the main process only."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from mcvqa.config import Config, environment

log = logging.getLogger(__name__)

class Trackers:
    """TensorBoard and/or Weights & Biases, behind one ``log`` call (rank 0 only)."""

    def __init__(self, report_to: Sequence[str], out: Path, cfg: Config, enabled: bool) -> None:
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(out / "logs"))
            except ImportError:
                log.warning("tensorboard is not installed; not logging to it")
        if "wandb" in report_to:
            try:
                import wandb

                env = environment()
                if not env.wandb_configured:
                    os.environ["WANDB_MODE"] = "offline"  # no key: log locally, `wandb sync` later
                self.wandb = wandb.init(project=env.wandb_project, dir=str(out), config=cfg.to_dict(), reinit=True)
            except ImportError:
                log.warning("wandb is not installed (pip install 'mcvqa[wandb]'); not logging to it")

    def log(self, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()

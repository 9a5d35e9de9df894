"""Experiment trackers: every row of metrics.jsonl, mirrored to TensorBoard, W&B or Trackio.

`--report-to tensorboard,wandb,trackio` (any of them, comma-separated; default none).
Each gets the same metric names and steps as metrics.jsonl, and the step's samples as a
table where it has one (TensorBoard: a text table). All three work offline:

    tensorboard  event files in <output-dir>/tensorboard   (tensorboard --logdir ...)
    wandb        an offline run in <output-dir>/wandb      (wandb sync ... to upload)
    trackio      its local database ($TRACKIO_DIR, else ~/.cache/huggingface/trackio)

They are optional installs (requirements-extras.txt); asking for one that is not
installed is a UsageError that names the pip command, found before any model work.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from harness.errors import UsageError

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}  # name -> pip package
SAMPLE_COLUMNS = ("step", "answer", "extracted", "method", "reward", "completion")


def parse_report_to(value: str) -> list[str]:
    """'none' -> []; 'tensorboard,wandb' -> ['tensorboard', 'wandb']; UsageError for an
    unknown name or one that is not installed."""
    names = [] if value.strip() == "none" else [n.strip() for n in value.split(",") if n.strip()]
    for name in names:
        if name not in TRACKERS:
            raise UsageError(f"--report-to {name}: choose from none, {', '.join(TRACKERS)} (comma-separated)")
        if importlib.util.find_spec(name) is None:
            raise UsageError(f"--report-to {name} needs the {name} package: pip install {TRACKERS[name]}")
    return names


class Trackers:
    """The chosen trackers, opened for one run; `log` and `log_samples` go to each."""

    def __init__(self, names: list[str], out_dir: Path, run_name: str, config: dict):
        self.names = names
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        if "wandb" in names:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(
                project="sdpg", name=run_name, dir=str(out_dir), mode="offline", config=config, resume="allow"
            )
        if "trackio" in names:
            import trackio

            self.trackio = trackio.init(
                project="sdpg",
                name=run_name,
                config=config,
                resume="allow",
                auto_log_cpu=False,
                auto_log_gpu=False,
            )

    def log(self, row: dict) -> None:
        """One metrics.jsonl row: every number under its own name, at row['step']."""
        step = int(row["step"])
        numbers = {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, int | float)}
        if "tensorboard" in self.names:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)
        if "wandb" in self.names:
            self.wandb.log(numbers, step=step)
        if "trackio" in self.names:
            self.trackio.log(numbers, step=step)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        """The step's samples.jsonl rows as a table."""
        data = [[s.get(c) for c in SAMPLE_COLUMNS] for s in samples]
        if "tensorboard" in self.names:
            head = "| " + " | ".join(SAMPLE_COLUMNS) + " |\n|" + "---|" * len(SAMPLE_COLUMNS) + "\n"
            body = "".join("| " + " | ".join(str(x).replace("|", "\\|") for x in r) + " |\n" for r in data)
            self.tensorboard.add_text("samples", head + body, step)
        if "wandb" in self.names:
            import wandb

            self.wandb.log({"samples": wandb.Table(columns=list(SAMPLE_COLUMNS), data=data)}, step=step)
        if "trackio" in self.names:
            import trackio

            self.trackio.log({"samples": trackio.Table(columns=list(SAMPLE_COLUMNS), data=data)}, step=step)

    def close(self) -> None:
        """Finish every run now, not at interpreter exit (where W&B and Trackio would
        otherwise flush and print after everything else)."""
        if "tensorboard" in self.names:
            self.tensorboard.close()
        if "wandb" in self.names:
            self.wandb.finish()
        if "trackio" in self.names:
            import trackio

            trackio.finish()  # the module's finish also forgets the run, so atexit has nothing left

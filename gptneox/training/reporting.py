"""Where a run's figures go besides metrics.jsonl: the `report_to` backends, named as the Hugging Face
Trainer names them (tensorboard, wandb; "all" for every one installed, "none" for none).

A backend that was asked for and is not installed is a config error, raised when the config is read (before
any data or weights); "all" takes the installed ones only. Each backend's writer takes `{tag: number}` per
step, the tags already grouped (train/loss, eval/NAME/loss: metrics.py decides them).
"""
from __future__ import annotations

import os
from pathlib import Path

from gptneox import extras
from gptneox.config import did_you_mean
from gptneox.errors import UserError
from gptneox.extras import install_hint

# backend name -> the module it needs (gptneox.extras names the pip extra that installs it)
BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb"}
WANDB_DEFAULT_PROJECT = "gptneox"  # WANDB_PROJECT overrides it


def installed(backend: str) -> bool:
    return extras.installed(BACKENDS[backend])


def requested_backends(report_to: str | list[str] | None) -> list[str]:
    """The backends `report_to` names, in BACKENDS order. A name, names separated by commas or a list;
    "all" means every installed backend, "none" (or null, or an empty list) none. Raises ValueError naming
    an unknown or uninstalled backend."""
    names = report_to if isinstance(report_to, list) else [report_to or "none"]
    names = [part.strip() for name in names for part in str(name).split(",") if part.strip()]
    if "all" in names:
        return [backend for backend in BACKENDS if installed(backend)]
    for name in names:
        if name != "none" and name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}{did_you_mean(name, [*BACKENDS, 'all', 'none'])} "
                             f"(choose from {', '.join(BACKENDS)}, all, none)")
    for name in names:
        if name in BACKENDS and not installed(name):
            raise ValueError(f"{name} is not installed: {install_hint(BACKENDS[name])}; or leave it out of report_to")
    return [backend for backend in BACKENDS if backend in names]


class ReportingError(UserError):
    """A backend that is installed but cannot start (W&B without credentials); the message says what to do."""


class TensorBoardWriter:
    """A resumed run (`resumed_at` its checkpoint's step) purges the events after that step, which the
    interrupted run wrote and the resume writes again."""

    def __init__(self, log_dir: str | Path, resumed_at: int = 0):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(log_dir), purge_step=resumed_at + 1 if resumed_at else None)

    def log(self, tags: dict[str, float], step: int) -> None:
        for tag, value in tags.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbWriter:
    """One W&B run per training process. wandb itself honours WANDB_MODE (offline), WANDB_DIR (default here:
    the output directory, not the working directory), WANDB_NAME (default: the output directory's name) and
    WANDB_PROJECT (default: gptneox)."""

    def __init__(self, output_dir: str | Path, config: dict):
        import wandb
        output_dir = Path(output_dir).resolve()
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", WANDB_DEFAULT_PROJECT),
                                  name=os.environ.get("WANDB_NAME", output_dir.name),
                                  dir=os.environ.get("WANDB_DIR", str(output_dir)), config=config)
        except wandb.errors.UsageError as err:  # no API key, an unknown entity or project: the user's to fix
            raise ReportingError(f"report_to wandb: {str(err).strip()} (run `wandb login` or set WANDB_API_KEY; "
                                 "WANDB_MODE=offline logs locally; or leave wandb out of report_to)") from None

    def log(self, tags: dict[str, float], step: int) -> None:
        self.run.log(tags, step=step)

    def close(self) -> None:
        self.run.finish()


def open_writers(backends: list[str], *, log_dir: str | Path, output_dir: str | Path, config: dict,
                 resumed_at: int = 0) -> list:
    """A writer per backend, in BACKENDS order."""
    makers = {"tensorboard": lambda: TensorBoardWriter(log_dir, resumed_at),
              "wandb": lambda: WandbWriter(output_dir, config)}
    return [makers[backend]() for backend in backends]

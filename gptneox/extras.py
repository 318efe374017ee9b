"""The optional dependencies (pyproject.toml's extras): whether one is installed, and the one-line error that
names the extra to install when a feature needs one that is not, instead of a ModuleNotFoundError traceback.
"""
from __future__ import annotations

import importlib.util
import sys

from gptneox.errors import UserError

# module -> the extra of pyproject.toml that installs it
EXTRAS = {"matplotlib": "plot", "pyarrow": "data", "tensorboard": "tensorboard", "wandb": "wandb",
          "flash_attn": "flash"}


class MissingExtraError(UserError, ImportError):
    """A feature was asked for whose optional dependency is not installed; the message names the extra."""


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (a module set to None in sys.modules, as Python
    does for one known to be missing, is not installed)."""
    parts = module.split(".")
    for name in (".".join(parts[:n]) for n in range(1, len(parts) + 1)):
        if name in sys.modules and sys.modules[name] is None:
            return False
    return parts[0] in sys.modules or importlib.util.find_spec(parts[0]) is not None


def install_hint(module: str) -> str:
    extra = EXTRAS[module.split(".")[0]]
    return f"install gptneox's extra {extra!r} (pip install 'gptneox[{extra}]'; in a checkout pip install -e '.[{extra}]')"


def require(module: str, feature: str) -> None:
    """Raise MissingExtraError when `feature` (named as the user asked for it) cannot have `module`."""
    if not installed(module):
        raise MissingExtraError(f"{feature} needs {module.split('.')[0]}, which is not installed: "
                                f"{install_hint(module)}")

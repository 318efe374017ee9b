"""Every error a user can fix derives from UserError, and commands print it as one line with exit status 2."""
from __future__ import annotations

import importlib
import importlib.machinery
import inspect
import pkgutil
import sys
import types

import pytest

import gptneox

from gptneox.attention import AttentionBackendError
from gptneox.chat import ChatError
from gptneox.config import ConfigError
from gptneox.data.formatting import ConversationError
from gptneox.data.readers import DataError
from gptneox.data.sources import RecordError
from gptneox.data.tokenizer import TokenizerError
from gptneox.dtypes import DtypeError, dtype_name
from gptneox.errors import MissingFileError, UserError, invoked_name, run_command
from gptneox.generate import GenerationError
from gptneox.training.checkpoint import CheckpointStateError
from gptneox.training.config import TrainConfigError
from gptneox.training.ds_config import DeepSpeedConfigError
from gptneox.training.metrics import MetricsError
from gptneox.weights import CheckpointError


@pytest.mark.parametrize("error", [ChatError, ConfigError, ConversationError, DataError, RecordError, TokenizerError,
                                   DtypeError, MissingFileError, GenerationError, CheckpointStateError,
                                   TrainConfigError, DeepSpeedConfigError, MetricsError, CheckpointError,
                                   AttentionBackendError])
def test_every_domain_error_is_a_user_error(error):
    assert issubclass(error, UserError)


# Not user mistakes: training that cannot go on (exit status 3), a stop request ending an evaluation, and one
# ending the command before its first step (exit status 75).
NOT_USER_ERRORS = {"gptneox.training.loop.TrainingStopped", "gptneox.training.evaluation.EvaluationStopped",
                   "gptneox.training.stop.StoppedBeforeTraining"}


def test_every_error_type_the_package_defines_is_a_user_error_or_named_as_not_one():
    """Found by importing every module, so a new error type that forgets UserError fails here."""
    defined = {}
    for module_info in pkgutil.walk_packages(gptneox.__path__, "gptneox."):
        module = importlib.import_module(module_info.name)
        defined.update({f"{module.__name__}.{name}": cls for name, cls in inspect.getmembers(module, inspect.isclass)
                        if issubclass(cls, BaseException) and cls.__module__ == module.__name__})
    assert NOT_USER_ERRORS <= set(defined)
    assert sorted(name for name, cls in defined.items()
                  if not issubclass(cls, UserError) and name not in NOT_USER_ERRORS) == []
    assert {"gptneox.training.output_dir.OutputDirError", "gptneox.training.resume_check.ResumeMismatch",
            "gptneox.training.storage.DiskFullError", "gptneox.memory_plan.PlanError"} <= set(defined)


def test_a_command_prints_a_user_error_in_one_line_and_lets_a_bug_through(capsys):
    assert run_command("tool.py", lambda: dtype_name("fp8")) == 2
    assert capsys.readouterr().err == "tool.py: error: dtype='fp8': expected one of fp32, fp16, bf16, float32, " \
                                      "float16, bfloat16\n"
    with pytest.raises(ValueError, match="a bug"):
        run_command("tool.py", lambda: (_ for _ in ()).throw(ValueError("a bug")))


def test_a_command_is_named_as_it_was_typed(monkeypatch):
    main = types.ModuleType("__main__")
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", ["/env/bin/gptneox-train", "--configs", "tiny"])
    main.__spec__ = None  # a script or console command
    assert invoked_name() == "gptneox-train"
    main.__spec__ = importlib.machinery.ModuleSpec("gptneox.train", None)  # python -m gptneox.train
    assert invoked_name() == "python -m gptneox.train"
    main.__spec__ = importlib.machinery.ModuleSpec("pytest.__main__", None)  # python -m pytest
    assert invoked_name() == "python -m pytest"

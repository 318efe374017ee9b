"""The trainer's parts, for the loop (gptneox.training.loop), the benchmarks and the tests:

    TrainConfig, parse_train_config   the configuration (config)
    DataOrder                         which samples each rank trains on at each step (data_order)
    training_model_config             the model's shape and vocabulary, before any weight is read (model_setup)
    build_training_model              the model, partitioned under ZeRO-3 (model_setup, partitioned)
    train_step, StepResult            one optimizer step (step)
    Evaluator                         evaluation sets, their collator, ranks' shares, when (evaluation)
    CheckpointManager, TrainState     save policy, atomic saves, resume state (checkpoint)
    MetricsLogger                     a step's figures and where they go (metrics)
    StopRequest                       SIGTERM/SIGHUP/SIGINT or the launcher's death: stop (stop)
    train, prepare                    the loop (loop)

Names are imported on first use, so reading a config does not import DeepSpeed.
"""
from __future__ import annotations

import importlib

_HOMES = {
    "TrainConfig": "config", "TrainConfigError": "config", "parse_train_config": "config",
    "DataOrder": "data_order",
    "training_model_config": "model_setup", "build_training_model": "model_setup", "parameter_groups": "model_setup",
    "train_step": "step", "StepResult": "step",
    "Evaluator": "evaluation",
    "CheckpointManager": "checkpoint", "TrainState": "checkpoint",
    "MetricsLogger": "metrics",
    "StopRequest": "stop",
    "train": "loop", "prepare": "loop", "TrainingStopped": "loop",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'gptneox.training' has no attribute {name!r}")
    return getattr(importlib.import_module(f"gptneox.training.{_HOMES[name]}"), name)

"""The `train.py` command: parse the config, start the process group, run the loop.

    deepspeed train.py --configs defaults stablelm-7b oasst-mix --cache_dir DATA --output_dir OUT --deepspeed
    deepspeed --module gptneox.train --configs ...              # the same, from an installed package
    python -m gptneox.train --configs defaults tiny sample-mix  # one process, no launcher

Exit status: 0 done (the final model exported), 75 stopped early by a signal or the launcher's death (after
saving a checkpoint: resume with --resume; before the first step: nothing to save, run the same command
again), 2 a user error or a full disk (one line), 3 training could not go on (fp16 overflow past the loss
scaler's budget, a checkpoint saved; or a non-finite loss or gradient norm, that step not saved). Anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys

# First, before torch and DeepSpeed: this import reads the launcher processes to watch (gptneox.training.stop)
from gptneox.training.stop import STOPPED_EXIT, StoppedBeforeTraining, StopRequest  # isort: skip

from gptneox.training import noise

with noise.deepspeed_import():  # before anything imports DeepSpeed
    from deepspeed.accelerator import get_accelerator

from gptneox.errors import UserError, invoked_name, report_user_error
from gptneox.torch_support import check_torch_version
from gptneox.training.config import parse_train_config
from gptneox.training.determinism import use_deterministic_algorithms
from gptneox.training.distributed import process_group_of_this_run
from gptneox.training.ds_config import check_scheduler
from gptneox.training.loop import TrainingStopped, train
from gptneox.training.model_files import find_model_dir
from gptneox.training.model_setup import check_dtype_supported, check_lora_base, choose_attention_backend


def main(argv: list[str] | None = None) -> int:
    prog = invoked_name()  # gptneox-train, train.py or python -m gptneox.train
    stop = StopRequest()  # from here on a signal or the launcher's death stops this rank
    try:
        status = _run(prog, argv, stop)
    except StoppedBeforeTraining as reason:
        status = _stopped_before_training(prog, str(reason))
    if status != STOPPED_EXIT:  # after a stop the handlers stay: a signal during the exit changes nothing
        stop.restore()
    elif stop.repeated:
        print(f"{prog}: {', '.join(stop.repeated)} while stopping: ignored (SIGKILL ends a rank at once)",
              file=sys.stderr)
    return status


def _run(prog: str, argv: list[str] | None, stop: StopRequest) -> int:
    try:
        check_torch_version()
        cfg = parse_train_config(argv, prog=prog)
        find_model_dir(cfg.model_name, cfg.cache_dir)  # a missing model fails before DeepSpeed starts
        check_lora_base(cfg)  # so does LoRA on a model it cannot adapt
        choose_attention_backend(cfg, get_accelerator().device_name())  # so does an unusable attention backend
        check_dtype_supported(cfg)  # and a dtype DeepSpeed would refuse on this accelerator
        check_scheduler(cfg)  # and a scheduler it would refuse
        use_deterministic_algorithms(cfg.deterministic)
        with process_group_of_this_run(raised_together=(UserError, TrainingStopped)) as (rank, world):
            if not train(cfg, rank, world, stop):
                return STOPPED_EXIT
    except UserError as err:
        return report_user_error(prog, err)
    except TrainingStopped as err:
        print(f"{prog}: stopped: {err}", file=sys.stderr)
        return 3
    except Exception:
        reason = stop.explain_failure_before_training()
        if reason is None:
            raise
        return _stopped_before_training(prog, reason)
    return 0


def _stopped_before_training(prog: str, reason: str) -> int:
    print(f"{prog}: stopped before the first step ({reason}): nothing to save; run the same command again",
          file=sys.stderr)
    return STOPPED_EXIT


if __name__ == "__main__":
    sys.exit(main())

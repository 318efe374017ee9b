"""The training loop: `prepare` sets up the parts of gptneox.training, `train` runs one optimizer step per
iteration until the last step (then exports) or a stop request (then saves and returns).

Each part decides its own "when" and "what": the checkpoint manager whether a step saves and what a
resume must match (TrainState), the evaluator whether a step evaluates and on what, the metrics logger
what a step's figures are. The loop only calls them in order.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from gptneox.data import DialogueCollator
from gptneox.data.datasets import load_run_datasets, merge_datasets
from gptneox.hub import is_repo_id
from gptneox.training.checkpoint import CheckpointManager, TrainState, restore_rng_states, rng_states
from gptneox.training.config import TrainConfig
from gptneox.training.data_order import DataOrder
from gptneox.training.distributed import barrier, on_rank_zero
from gptneox.training.ds_config import load_ds_config, resolve_ds_config
from gptneox.training.evaluation import Evaluator
from gptneox.training.export import MODEL_SUBDIR, export_checkpoint, write_model_metadata
from gptneox.training.metrics import MetricsLogger, peak_tflops
from gptneox.training.model_files import (find_model_dir, input_directories, load_run_tokenizer,
                                          run_tokenizer_source, trained_token_ids)
from gptneox.training.model_setup import (build_training_model, check_model_fits, parameter_groups,
                                          total_memory_bytes, training_model_config)
from gptneox.training.noise import SCHEDULER_NOT_STARTED, deepspeed_log_dropped
from gptneox.training.partitioned import zero_stage
from gptneox.training.output_dir import (CHECKPOINTS_DIR, DS_CONFIG_FILE, TENSORBOARD_DIR, TRAIN_CONFIG_FILE,
                                         check_writable, claim_output_dir, removed_if_failed_empty)
from gptneox.training.resume_check import (check_resume, model_settings, read_run_record, run_record,
                                           tokenizer_fingerprint)
from gptneox.training.safe_checkpoint import check_no_code
from gptneox.training.step import train_step
from gptneox.training.stop import StopRequest
from gptneox.weights import weights_fingerprint

MIN_SCALE_MESSAGE = "loss scale already at minimum"


class TrainingStopped(RuntimeError):
    """Training cannot go on: fp16 overflow past the loss scaler's budget (a checkpoint was saved first), or
    a non-finite loss or gradient norm in another dtype (that step is not saved: the newest checkpoint is
    from before it)."""


@dataclass
class Run:
    """What the loop works with, as `prepare` set it up."""

    cfg: TrainConfig
    engine: Any
    train_set: list
    order: DataOrder
    collate: DialogueCollator
    state: TrainState
    checkpoints: CheckpointManager
    evaluator: Evaluator
    metrics: MetricsLogger
    total_steps: int
    rank: int

    def micro_batches(self) -> list[dict]:
        """This rank's collated micro-batches of the step that `state` points at."""
        epoch, step = self.state.epoch, self.state.step_in_epoch
        self.collate.set_epoch(epoch)
        return [self.collate([self.train_set[i] for i in indices], sample_ids=indices)
                for indices in self.order.micro_batches(epoch, step)]

    def save(self, due_only: bool = False) -> None:
        """A checkpoint of the current step (only where the save policy says so, with due_only)."""
        save = self.checkpoints.save_if_due if due_only else self.checkpoints.save
        path = save(self.engine, self.state)
        if path is not None:
            self.metrics.write(f"saved {path}")

    def save_for_stop(self, stop: StopRequest) -> bool:
        """Save the last finished step for a stop request and say so; False, for train's result. Stopped
        inside the first step, there is no finished step to save: the directory keeps its set-up files only,
        which the same command goes on into (gptneox.training.output_dir)."""
        reason = stop.signal_name or "signal on another rank"
        if self.engine.global_steps == 0:
            self.metrics.write(f"{reason} in the first step: nothing to save, exiting (run the same command again)")
            return False
        self.save()
        self.metrics.write(f"{reason}: saved, exiting (resume with --resume)")
        return False

    def evaluate(self, stop: StopRequest) -> None:
        self.metrics.log_eval(self.engine.global_steps, self.evaluator.run(self.engine, stop))


def train(cfg: TrainConfig, rank: int, world: int, stop: StopRequest) -> bool:
    """True when the run reached its last step and exported; False when it stopped early on a signal (or
    its launcher's death) after saving. A stop requested before the first step raises StoppedBeforeTraining
    (gptneox.training.stop) out of here, the lock released."""
    with removed_if_failed_empty(cfg.output_dir, cfg.log_dir) if rank == 0 else contextlib.nullcontext():
        lock = on_rank_zero(lambda: claim_output_dir(cfg.output_dir, resume=cfg.resume,
                                                      overwrite=cfg.overwrite_output_dir,
                                                      inputs=input_directories(cfg)))
        try:
            return _train(cfg, rank, world, stop)
        finally:
            if lock is not None:
                lock.release()


def _train(cfg: TrainConfig, rank: int, world: int, stop: StopRequest) -> bool:
    run = prepare(cfg, rank, world)
    engine, state, metrics = run.engine, run.state, run.metrics
    consecutive_skips = 0
    try:
        stop.at_step_boundaries()
        while engine.global_steps < run.total_steps:
            state.advance()
            if stop.agreed(engine.device):
                return run.save_for_stop(stop)
            started = time.perf_counter()
            generators = rng_states()  # as a stop between micro-batches saves them: as at the step's start
            micro_batches = run.micro_batches()
            try:
                result = train_step(engine, micro_batches, stopped=lambda: stop.agreed(engine.device))
            except Exception as err:
                if MIN_SCALE_MESSAGE not in str(err):
                    raise
                run.save()
                raise TrainingStopped(f"fp16 overflow at the minimum loss scale at step {engine.global_steps + 1} "
                                      f"(DeepSpeed: {err}); checkpoint saved in {run.checkpoints.directory}") from err
            if result is None:  # stopped between two micro-batches: the step is abandoned, see train_step
                restore_rng_states(generators)
                return run.save_for_stop(stop)
            state.step_in_epoch += 1
            metrics.log_step(engine.global_steps, result, time.perf_counter() - started, state.progress)
            problem = result.non_finite(cfg.dtype)
            if problem:  # nothing of this step is saved or exported: the newest checkpoint is from before it
                raise TrainingStopped(f"step {engine.global_steps}: {problem} in {cfg.dtype} training; nothing of "
                                      f"this step was saved, {run.checkpoints.newest_line()} (lower learning_rate "
                                      f"or check the data, then --resume)")
            consecutive_skips = consecutive_skips + 1 if result.skipped else 0
            if consecutive_skips >= cfg.max_consecutive_skipped_steps:
                run.save()
                raise TrainingStopped(f"{consecutive_skips} optimizer steps in a row skipped for fp16 overflow "
                                      f"(loss scale {result.loss_scale}); checkpoint saved in "
                                      f"{run.checkpoints.directory}")
            if run.evaluator.due(engine.global_steps, state.epoch_done):
                run.evaluate(stop)
            run.save(due_only=True)
        if run.evaluator.due_at_end(engine.global_steps, state.epoch_done):
            run.evaluate(stop)
        barrier()
        if rank == 0:
            export_checkpoint(run.checkpoints.directory, cfg.output_dir,
                              trust_checkpoint_code=cfg.trust_checkpoint_code)
            metrics.write(f"exported the final model to {cfg.output_dir}")
        return True
    finally:
        metrics.close()


def prepare(cfg: TrainConfig, rank: int, world: int) -> Run:
    """Data, model, DeepSpeed engine, resume, and the loop's parts; rank 0 writes the run's set-up files."""
    say = print if rank == 0 else (lambda *a, **k: None)
    out = Path(cfg.output_dir)
    checkpoint_dir = out / CHECKPOINTS_DIR
    # data first: a bad dataset file should fail in seconds, not after loading billions of weights
    datasets = load_run_datasets(cfg)
    for dataset in datasets:
        say(dataset.summary())
    train_set, eval_sets = merge_datasets(datasets)
    tokenizer = load_run_tokenizer(cfg)
    model_config = training_model_config(cfg, tokenizer)
    evaluator = Evaluator(eval_sets, tokenizer, max_length=cfg.eval_max_length,
                          batch_size=cfg.per_device_eval_batch_size, every=cfg.eval_steps, rank=rank, world=world,
                          size=cfg.eval_size, pack=cfg.pack, strategy=cfg.eval_strategy)
    order = DataOrder(len(train_set), cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps,
                      world, rank, cfg.rng_seed)
    total_steps = cfg.max_steps or math.ceil(order.steps_per_epoch * cfg.num_train_epochs)  # as the Trainer
    say(f"{len(train_set)} training conversations, {order.steps_per_epoch} steps/epoch of "
        f"{order.global_batch_size}, {total_steps} steps; eval sets: "
        + (", ".join(f"{k} ({len(v)})" for k, v in evaluator.eval_sets.items())
           or "none (every dataset's val_split is 0): never evaluated")
        + (" (eval_strategy no: never evaluated)" if cfg.eval_strategy == "no" else ""))
    ds_config, notes = resolve_ds_config(
        load_ds_config(cfg.deepspeed_config), cfg, world_size=world, hidden_size=model_config.hidden_size,
        total_num_steps=total_steps, cpu=get_accelerator().device_name() == "cpu")
    for note in notes:
        say(note)
    torch.manual_seed(cfg.rng_seed)  # the same random init on every rank
    token_ids = trained_token_ids(cfg)
    offloaded = ds_config.get("zero_optimization", {}).get("offload_param", {}).get("device") == "cpu"
    check_model_fits(model_config, cfg.dtype, world if zero_stage(ds_config) == 3 else 1,
                     total_memory_bytes("cpu" if offloaded else get_accelerator().device_name()))
    model, model_line = build_training_model(cfg, model_config, ds_config, token_ids)  # partitioned under ZeRO-3
    say(model_line)
    base_dir = find_model_dir(cfg.model_name, cfg.cache_dir).resolve() if cfg.lora else None  # LoRA's frozen base
    settings = run_record(model=model.config.to_hf(), train_set=train_set,
                          tokenizer=tokenizer_fingerprint(tokenizer), dtype=cfg.dtype, world_size=world,
                          zero_stage=zero_stage(ds_config), learning_rate=cfg.learning_rate,
                          warmup_steps=cfg.warmup_steps, total_steps=total_steps,
                          num_train_epochs=cfg.num_train_epochs, max_length=cfg.max_length,
                          global_batch_size=order.global_batch_size, rng_seed=cfg.rng_seed,
                          lora=lora_settings(cfg, token_ids),
                          base_weights=weights_fingerprint(base_dir) if base_dir else None)
    checkpoints = CheckpointManager(checkpoint_dir, cfg.save_total_limit, rank, strategy=cfg.save_strategy,
                                    every=cfg.save_steps, last_step=total_steps, run=settings)
    # a resume checks everything against the checkpoint before anything is loaded or written
    resume_tag = checkpoints.usable_tag() if cfg.resume else None
    if resume_tag is not None:
        tokenizers = (str(checkpoint_dir / MODEL_SUBDIR / "tokenizer.json"), str(run_tokenizer_source(cfg)))
        sources = {"tokenizer": tokenizers}
        if base_dir is not None:
            sources["base_weights"] = (_saved_base_directory(checkpoint_dir), str(base_dir))
        for note in check_resume(_saved_settings(checkpoint_dir, resume_tag), settings, checkpoint_dir / resume_tag,
                                 allowed=cfg.allowed_changes, sources=sources):
            say(note)
        on_rank_zero(lambda: check_no_code(checkpoint_dir / resume_tag, trust=cfg.trust_checkpoint_code))
    if cfg.log_dir:
        on_rank_zero(lambda: check_writable(cfg.log_dir, key="log_dir"))
    if rank == 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        (out / DS_CONFIG_FILE).write_text(json.dumps(ds_config, indent=2) + "\n")
        (out / TRAIN_CONFIG_FILE).write_text(cfg.to_yaml())
        write_model_metadata(checkpoint_dir, model.config, tokenizer, cfg.dtype,
                             lora=_export_lora(cfg, settings, base_dir))

    with deepspeed_log_dropped(SCHEDULER_NOT_STARTED):
        engine, *_ = deepspeed.initialize(model=model, model_parameters=parameter_groups(model, cfg.weight_decay),
                                          config=ds_config)
    state = TrainState(data_seed=cfg.rng_seed, global_batch_size=order.global_batch_size,
                       num_samples=len(train_set))
    if cfg.resume:
        tag = checkpoints.resume(engine, state, resume_tag)
        say(f"resumed from {tag} (epoch {state.epoch}, step {engine.global_steps})" if tag else
            f"resume: no complete checkpoint in {checkpoint_dir}, starting from scratch")
    collate = DialogueCollator(tokenizer, max_length=cfg.max_length, pad_to_multiple_of=cfg.pad_to_multiple_of,
                               random_offset_probability=cfg.random_offset_probability, pack=cfg.pack,
                               seed=cfg.rng_seed)
    peak, peak_source = peak_tflops(cfg.dtype, cfg.peak_tflops, engine.device)
    say(f"MFU peak: {peak:.3g} TFLOP/s per device ({peak_source})")
    metrics = MetricsLogger(out, total_steps, engine.global_steps, rank == 0, report_to=cfg.report_to,
                            log_dir=cfg.log_dir or out / TENSORBOARD_DIR, run_config=asdict(cfg),
                            peak_tflops=peak, world_size=world, show_every=cfg.logging_steps,
                            device=engine.device)
    return Run(cfg, engine, train_set, order, collate, state, checkpoints, evaluator, metrics, total_steps, rank)


def lora_settings(cfg: TrainConfig, token_ids: list[int]) -> dict | None:
    """What run.json and the export record of a LoRA run's adapters; None for full fine-tuning."""
    return None if cfg.lora is None else {**asdict(cfg.lora), "token_ids": list(token_ids)}


def _export_lora(cfg: TrainConfig, settings: dict, base_dir: Path | None) -> dict | None:
    """What the export needs of a LoRA run: the adapters' settings and the base it merges them into (its
    directory and weights' fingerprint; for the adapter's config, a Hub id as given, else that directory)."""
    if settings["lora"] is None:
        return None
    return {**settings["lora"], "base_directory": str(base_dir), "base_weights": settings["base_weights"],
            "base_model": cfg.model_name if is_repo_id(cfg.model_name) else str(base_dir)}


def _saved_base_directory(checkpoint_dir: Path) -> str:
    """Where the base of a LoRA checkpoint was read from, as its training.json says, for a message."""
    training = checkpoint_dir / MODEL_SUBDIR / "training.json"
    lora = json.loads(training.read_text()).get("lora") if training.is_file() else None
    return (lora or {}).get("base_directory", "base unknown")


def _saved_settings(checkpoint_dir: Path, tag: str) -> dict:
    """The settings `tag` was written with; for a tag from before run.json, the model's config.json."""
    saved = read_run_record(checkpoint_dir / tag)
    if saved is not None:
        return {"lora": None, **saved}  # written before LoRA: a full run
    config = checkpoint_dir / MODEL_SUBDIR / "config.json"
    return {"model": model_settings(json.loads(config.read_text()))} if config.is_file() else {}

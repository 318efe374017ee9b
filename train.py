#!/usr/bin/env python
"""Supervised fine-tuning of a GPT-NeoX model with an explicit DeepSpeed ZeRO-2 loop (the SFT-7 recipe).

    deepspeed train.py --configs defaults stablelm-7b oasst-mix --cache_dir DATA --output_dir OUT --deepspeed
    python train.py --configs defaults tiny sample-mix          # one process, no launcher

The pieces live in gptneox/training/; this file wires them together and holds the loop.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from gptneox.data import DialogueCollator
from gptneox.data.datasets import build_datasets
from gptneox.training.checkpoint import CheckpointManager, restore_rng_states, rng_states, tag_for
from gptneox.training.config import TrainConfig, TrainConfigError, parse_train_config
from gptneox.training.data_order import DataOrder
from gptneox.training.distributed import init_distributed
from gptneox.training.ds_config import DeepSpeedConfigError, load_ds_config, resolve_ds_config
from gptneox.training.export import export_checkpoint, write_model_metadata
from gptneox.training.metrics import MetricsLogger, peak_memory_gb, peak_tflops
from gptneox.training.determinism import use_deterministic_algorithms
from gptneox.training.model_setup import (choose_attention_backend, find_model_dir, load_model_and_tokenizer,
                                          parameter_groups)
from gptneox.training.step import evaluate, train_step
from gptneox.training.stop import StopRequest

MIN_SCALE_MESSAGE = "loss scale already at minimum"


class TrainingStopped(RuntimeError):
    """Training cannot go on (fp16 overflow at the minimum loss scale); a checkpoint was saved first."""


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_train_config(argv)
        find_model_dir(cfg.model_name, cfg.cache_dir)  # a missing model fails before DeepSpeed starts
        choose_attention_backend(cfg, get_accelerator().device_name())  # so does an unusable attention backend
        use_deterministic_algorithms(cfg.deterministic)
        rank, world = init_distributed()
        return train(cfg, rank, world)
    except (TrainConfigError, DeepSpeedConfigError, FileNotFoundError, ValueError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"train.py: stopped: {err}", file=sys.stderr)
        return 3


def train(cfg: TrainConfig, rank: int, world: int) -> int:
    say = print if rank == 0 else (lambda *a, **k: None)
    out = Path(cfg.output_dir)
    checkpoint_dir = out / "checkpoints"
    # data first: a bad dataset file should fail in seconds, not after loading billions of weights
    train_set, eval_sets = build_datasets(cfg.datasets, cache_dir=cfg.cache_dir, seed=cfg.rng_seed)
    torch.manual_seed(cfg.rng_seed)  # the same random init on every rank
    model, tokenizer, model_line = load_model_and_tokenizer(cfg)
    say(model_line)
    eval_sets = {name: samples[:cfg.eval_size] if cfg.eval_size else samples for name, samples in eval_sets.items()}
    order = DataOrder(len(train_set), cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps,
                      world, rank, cfg.rng_seed)
    total_steps = cfg.max_steps or order.steps_per_epoch * cfg.num_train_epochs
    say(f"{len(train_set)} training conversations, {order.steps_per_epoch} steps/epoch of "
        f"{order.global_batch_size}, {total_steps} steps; eval sets: "
        + ", ".join(f"{k} ({len(v)})" for k, v in eval_sets.items()))
    ds_config, notes = resolve_ds_config(
        load_ds_config(cfg.deepspeed_config), cfg, world_size=world, hidden_size=model.config.hidden_size,
        total_num_steps=total_steps, cpu=get_accelerator().device_name() == "cpu")
    for note in notes:
        say(note)
    if rank == 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        (out / "ds_config.resolved.json").write_text(json.dumps(ds_config, indent=2) + "\n")
        (out / "train_config.yaml").write_text(cfg.to_yaml())
        write_model_metadata(checkpoint_dir, model.config, tokenizer, cfg.dtype)

    engine, *_ = deepspeed.initialize(model=model, model_parameters=parameter_groups(model, cfg.weight_decay),
                                      config=ds_config)
    checkpoints = CheckpointManager(checkpoint_dir, cfg.save_total_limit, rank)
    epoch, step_in_epoch = 0, 0
    if cfg.resume:
        state = checkpoints.load(engine)
        if state is None:
            say(f"--resume: no complete checkpoint in {checkpoint_dir}, starting from scratch")
        else:
            saved = (state["data_seed"], state["global_batch_size"], state.get("num_samples"))
            if saved != (cfg.rng_seed, order.global_batch_size, len(train_set)):
                raise TrainConfigError(f"--resume: checkpoint has rng_seed/global batch/training conversations "
                                       "{}/{}/{}, this run {}/{}/{}; the data order would not continue".format(
                                           *saved, cfg.rng_seed, order.global_batch_size, len(train_set)))
            epoch, step_in_epoch = state["epoch"], state["step_in_epoch"]
            restore_rng_states(state["rng"])
            say(f"resumed from {checkpoints.latest_tag()} (epoch {epoch}, step {engine.global_steps})")

    def save() -> None:
        """Once per step: saving a tag again (a signal or a stop right after a save) would rewrite the only
        complete checkpoint in place, and a kill during that would leave none."""
        tag = tag_for(engine.global_steps)
        if checkpoints.latest_tag() == tag:
            return
        position = {"epoch": epoch, "step_in_epoch": step_in_epoch, "data_seed": cfg.rng_seed,
                    "global_batch_size": order.global_batch_size, "num_samples": len(train_set),
                    "rng": rng_states()}
        path = checkpoints.save(engine, tag, position)
        metrics.write(f"saved {path}")

    def run_evaluation() -> None:
        """Skipped once a stop is requested: the launcher kills the job soon after its SIGTERM (DeepSpeed's
        after about 30 s), and the checkpoint comes first. Collective, like stop.agreed."""
        if stop.agreed(engine.device):
            return
        results = {}
        for name, samples in eval_sets.items():
            size = cfg.per_device_eval_batch_size
            mine = [samples[i:i + size] for i in range(rank * size, len(samples), world * size)]
            loss, accuracy = evaluate(engine, (eval_collate(batch) for batch in mine))
            results.update({f"eval_{name}_loss": loss, f"eval_{name}_accuracy": accuracy})
        if results:
            metrics.log(engine.global_steps, results, show=False)
            metrics.write(f"step {engine.global_steps}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))

    collate = DialogueCollator(tokenizer, max_length=cfg.max_length, pad_to_multiple_of=cfg.pad_to_multiple_of,
                               random_offset_probability=cfg.random_offset_probability, pack=cfg.pack,
                               seed=cfg.rng_seed)
    eval_collate = DialogueCollator(tokenizer, max_length=cfg.eval_max_length, random_offset_probability=0.0,
                                    pad_to_multiple_of=None)  # deterministic: no random windows
    peak, peak_source = peak_tflops(cfg.dtype, cfg.peak_tflops)
    say(f"MFU peak: {peak:.3g} TFLOP/s per device ({peak_source})")
    metrics = MetricsLogger(out, cfg.log_dir or out / "tensorboard", total_steps, engine.global_steps, rank == 0)
    stop = StopRequest()
    consecutive_skips = 0
    while engine.global_steps < total_steps:
        if step_in_epoch == order.steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        if stop.agreed(engine.device):
            save()
            metrics.write(f"{stop.signal_name or 'signal on another rank'}: saved, exiting")
            break
        started = time.perf_counter()
        micro_batches = []
        collate.set_epoch(epoch)
        for indices in order.micro_batches(epoch, step_in_epoch):
            micro_batches.append(collate([train_set[i] for i in indices], sample_ids=indices))
        lr = engine.get_lr()[0]  # the rate this update uses; the scheduler steps inside engine.step()
        try:
            result = train_step(engine, micro_batches)
        except Exception as err:
            if MIN_SCALE_MESSAGE not in str(err):
                raise
            save()
            raise TrainingStopped(f"fp16 overflow at the minimum loss scale at step {engine.global_steps + 1} "
                                  f"(DeepSpeed: {err}); checkpoint saved in {checkpoint_dir}") from err
        step_in_epoch += 1
        elapsed = time.perf_counter() - started
        consecutive_skips = consecutive_skips + 1 if result.skipped else 0
        metrics.log(engine.global_steps, {
            "loss": result.loss, "lr": lr, "grad_norm": _number(engine.get_global_grad_norm()),
            "loss_scale": float(engine.optimizer.cur_scale) if cfg.dtype == "fp16" else 1.0,
            "skipped_steps": engine.skipped_steps, "epoch": epoch + step_in_epoch / order.steps_per_epoch,
            "tokens_per_s": result.tokens / elapsed, "trained_tokens_per_s": result.trained_tokens / elapsed,
            "mfu": result.flops / elapsed / (peak * 1e12 * world) if peak else None,
            "peak_memory_gb": peak_memory_gb(),
        }, advance=True, show=engine.global_steps % cfg.logging_steps == 0)
        if consecutive_skips >= cfg.max_consecutive_skipped_steps:
            save()
            raise TrainingStopped(f"{consecutive_skips} optimizer steps in a row skipped for fp16 overflow "
                                  f"(loss scale {engine.optimizer.cur_scale}); checkpoint saved in {checkpoint_dir}")
        if engine.global_steps % cfg.eval_steps == 0:
            run_evaluation()
        if engine.global_steps == total_steps or (
                cfg.save_strategy == "epoch" and step_in_epoch == order.steps_per_epoch) or (
                cfg.save_strategy == "steps" and engine.global_steps % cfg.save_steps == 0):
            save()
    else:
        if engine.global_steps % cfg.eval_steps:
            run_evaluation()
        dist.barrier()
        if rank == 0:
            export_checkpoint(checkpoint_dir, out)
            metrics.write(f"exported the final model to {out}")
    stop.restore()
    metrics.close()
    return 0


def _number(value) -> float | None:
    return None if value is None else float(value)


if __name__ == "__main__":
    sys.exit(main())

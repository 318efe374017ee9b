"""Per-GPU and per-node memory of a training run under ZeRO-2, ZeRO-3 and ZeRO-3 + CPU offload, term by term.

    gptneox-plan-memory --model stablelm-7b --gpus 8 --gpu_memory_gb 80 --max_length 4096 --micro_batch 4
    gptneox-plan-memory --model stablelm-7b --gpus 1 --gpu_memory_gb 24 --max_length 2048 --micro_batch 1 --lora_r 16

--model is a preset (gpt-neox-20b, pythia-12b, ...), a Hugging Face model directory, or a config section
(configs/NAME.yaml) whose model_name is one of those. The ZeRO settings come from the DeepSpeed config
files, with "auto" resolved as train.py resolves them. The terms are explained in gptneox/memory_plan.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gptneox import GPTNeoXConfig
from gptneox.config import PRESETS
from gptneox.data.tokenizer import CHAT_TOKENS
from gptneox.dtypes import TORCH_DTYPES
from gptneox.errors import UserError, report_user_error
from gptneox.memory_plan import (HEADROOM, LORA_TARGET_MODULES, Batch, Hardware, LoraPlan, PlanError, activation_terms,
                                 zero_plans)
from gptneox.training.config import CONFIG_DIR, TrainConfig, TrainConfigError, load_section, repo_path
from gptneox.training.ds_config import load_ds_config, resolve_ds_config

DEFAULT_DS_CONFIGS = ["ds_config.json", "ds_config_zero3.json", "ds_config_zero3_offload.json"]
GB = 1e9


def model_config(name: str) -> tuple[GPTNeoXConfig, str]:
    """(config, where it came from) for a preset, a model directory, or a config section naming either."""
    if name in PRESETS:
        return GPTNeoXConfig.from_name(name), f"preset {name}"
    if (Path(name) / "config.json").is_file():
        return GPTNeoXConfig.from_hf(name), str(Path(name) / "config.json")
    if (CONFIG_DIR / f"{name}.yaml").is_file():
        section = load_section(name)
        model_name = section.get("model_name") or ""
        cache_dir = Path(section.get("cache_dir") or TrainConfig.cache_dir)
        for directory in (Path(model_name), cache_dir / model_name):
            if (directory / "config.json").is_file():
                return GPTNeoXConfig.from_hf(directory), f"config {name}: {directory / 'config.json'}"
        preset = Path(model_name).name
        if preset in PRESETS:
            return GPTNeoXConfig.from_name(preset), f"config {name}: model_name {model_name} -> preset {preset}"
    raise TrainConfigError(f"--model {name!r}: not a preset ({', '.join(PRESETS)}), a directory with config.json, "
                           "or a config section whose model_name is one of those")


def zero_sections(paths: list[str], batch: Batch, hidden_size: int, world: int) -> dict[str, dict]:
    cfg = TrainConfig(dtype=batch.dtype, per_device_train_batch_size=batch.micro_batch, gradient_accumulation_steps=1)
    sections = {}
    for path in paths:
        resolved, _ = resolve_ds_config(load_ds_config(path if Path(path).is_file() else repo_path(path)), cfg,
                                        world_size=world, hidden_size=hidden_size, total_num_steps=1, cpu=False)
        sections[Path(path).stem] = resolved.get("zero_optimization", {})
    return sections


def lora_settings(args) -> LoraPlan | None:
    if args.lora_r < 0:
        raise PlanError(f"--lora_r {args.lora_r}: must be 0 (full fine-tuning) or a positive rank")
    if args.lora_r == 0:
        return None
    if not 0 <= args.lora_dropout < 1:
        raise PlanError(f"--lora_dropout {args.lora_dropout:g}: must be in [0, 1)")
    if args.lora_trained_tokens < 0:
        raise PlanError(f"--lora_trained_tokens {args.lora_trained_tokens}: must be 0 or more")
    names = [name.strip() for name in args.lora_target_modules.split(",")]
    if names == ["all-linear"]:
        names = list(LORA_TARGET_MODULES)
    unknown = [name for name in names if name not in LORA_TARGET_MODULES]
    if unknown or not names:
        raise PlanError(f"--lora_target_modules {args.lora_target_modules!r}: {', '.join(unknown) or 'empty'} is not "
                        f"a GPT-NeoX Linear; expected a comma list of {', '.join(LORA_TARGET_MODULES)}, or all-linear")
    return LoraPlan(args.lora_r, tuple(dict.fromkeys(names)), args.lora_dropout, args.lora_trained_tokens)


def gb(value: float) -> str:
    return f"{value / GB:8.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="preset, Hugging Face directory or config section")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the whole job (all nodes)")
    parser.add_argument("--gpus_per_node", type=int, default=None, help="default: min(gpus, 8)")
    parser.add_argument("--gpu_memory_gb", type=float, required=True, help="memory of one GPU, GB (1e9 bytes)")
    parser.add_argument("--host_memory_gb", type=float, default=None, help="memory of one node, GB; checked if given")
    parser.add_argument("--max_length", type=int, required=True, help="tokens per row")
    parser.add_argument("--micro_batch", type=int, required=True, help="rows per GPU per forward")
    parser.add_argument("--dtype", choices=list(TORCH_DTYPES), default="fp16")
    parser.add_argument("--deepspeed_configs", nargs="+", default=DEFAULT_DS_CONFIGS, metavar="JSON",
                        help=f"DeepSpeed config files to compare (default: {' '.join(DEFAULT_DS_CONFIGS)})")
    lora = parser.add_argument_group("LoRA: frozen 16-bit base, only adapters and chat-token rows trained")
    lora.add_argument("--lora_r", type=int, default=0, help="adapter rank (0: full fine-tuning, the default)")
    lora.add_argument("--lora_target_modules", default="query_key_value",
                      help=f"comma list of {', '.join(LORA_TARGET_MODULES)}, or all-linear (default: query_key_value)")
    lora.add_argument("--lora_dropout", type=float, default=0.05,
                      help="dropout on the adapters' input; above 0 each target keeps a copy of its input")
    lora.add_argument("--lora_trained_tokens", type=int, default=len(CHAT_TOKENS),
                      help=f"token rows of embed_in and embed_out trained with the adapters (default "
                           f"{len(CHAT_TOKENS)}: the chat tokens; 0: none)")
    args = parser.parse_args(argv)
    try:
        config, origin = model_config(args.model)
        batch = Batch(args.micro_batch, args.max_length, args.dtype)
        hardware = Hardware(args.gpus, args.gpus_per_node or min(args.gpus, 8), args.gpu_memory_gb, args.host_memory_gb)
        lora_plan = lora_settings(args)
        plans = zero_plans(config, hardware, batch, zero_sections(args.deepspeed_configs, batch, config.hidden_size,
                                                                  args.gpus), lora_plan)
    except UserError as err:
        return report_user_error(parser.prog, err)
    print(f"{origin}; {hardware.gpus} GPUs ({hardware.gpus_per_node} per node) of {hardware.gpu_memory_gb:g} GB; "
          f"micro-batch {batch.micro_batch} x {batch.max_length} tokens, {batch.dtype}. GB = 1e9 bytes.")
    if lora_plan is not None:
        trained = lora_plan.trainable_parameters(config)
        print(f"LoRA r {lora_plan.r} on {', '.join(lora_plan.target_modules)}, dropout {lora_plan.dropout:g}; "
              "trained: " + ", ".join(f"{what} {count:,}" for what, count in trained.items())
              + " parameters; the base frozen in " + batch.dtype)
    print()
    activations = {checkpointing: activation_terms(config, batch, checkpointing, lora_plan)
                   for checkpointing in (True, False)}
    width = 64
    print(f"{'per GPU':<{width}}" + "".join(f"{p.name:>26}" for p in plans))

    def rows(title: str, terms: list[dict[str, float]]) -> None:
        names = list(dict.fromkeys(name for t in terms for name in t))
        if title:
            print(title)
        for name in names:
            print(f"  {name:<{width - 2}}" + "".join(f"{gb(t.get(name, 0.0)):>26}" for t in terms))

    rows("", [p.gpu_states for p in plans])
    rows("  at the optimizer step only:", [p.gpu_step for p in plans])
    for checkpointing in (True, False):
        rows(f"  {'with' if checkpointing else 'without'} gradient checkpointing:",
             [activations[checkpointing]] * len(plans))
    verdicts = {}
    for checkpointing in (True, False):
        label = f"peak, {'with' if checkpointing else 'without'} checkpointing"
        peaks = [p.gpu_peak(sum(activations[checkpointing].values())) for p in plans]
        limit = hardware.gpu_memory_gb * GB * (1 - HEADROOM)
        print(f"{label:<{width}}" + "".join(
            f"{gb(peak) + (' fits' if peak <= limit else ' NO'):>26}" for peak in peaks))
        verdicts[checkpointing] = [peak <= limit for peak in peaks]
    print(f"\n{'host, per node':<{width}}")
    rows("", [p.host_per_node for p in plans])
    print(f"{'disk':<{width}}")
    rows("", [p.disk for p in plans])
    print(f"\n'fits' leaves {HEADROOM:.0%} of each GPU ({hardware.gpu_memory_gb * HEADROOM:.0f} GB) for allocator "
          "fragmentation, the CUDA context and NCCL; the checkpoint size is one saved step (save_total_limit keep).")
    for plan, with_ckpt, without in zip(plans, verdicts[True], verdicts[False]):
        host = sum(plan.host_per_node.values())
        host_note = "" if hardware.host_memory_gb is None else (
            f", host {host / GB:.0f} of {hardware.host_memory_gb:g} GB per node "
            f"{'fits' if host <= hardware.host_memory_gb * GB else 'does NOT fit'}")
        verdict = ("fits with and without checkpointing" if with_ckpt and without else
                   "fits with gradient checkpointing only" if with_ckpt else "does not fit")
        print(f"{plan.name}: {verdict}{host_note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

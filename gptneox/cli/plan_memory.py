"""Per-GPU and per-node memory of a training run under ZeRO-2, ZeRO-3 and ZeRO-3 + CPU offload, term by term.

    gptneox-plan-memory --configs defaults stablelm-7b oasst-mix --gpus 8 --gpu_memory_gb 80
    gptneox-plan-memory --model stablelm-7b --gpus 8 --gpu_memory_gb 80 --max_length 4096 --micro_batch 4
    gptneox-plan-memory --configs defaults stablelm-7b oasst-mix lora --gpus 1 --gpu_memory_gb 32

--configs takes train.py's sections and overrides (as gptneox-data-report does): the model, max_length,
per_device_train_batch_size, dtype and LoRA keys come from the run's config; --model, --max_length,
--micro_batch, --dtype and the --lora_* flags, where given, take their place. --model is a preset
(gpt-neox-20b, pythia-12b, ...), a Hugging Face model directory, or a config section (configs/NAME.yaml) whose
model_name is one of those. The ZeRO settings come from the DeepSpeed config files, with "auto" resolved as
train.py resolves them. The terms are explained in gptneox/memory_plan.py. The table fits 100 columns;
--json prints the same figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from gptneox import GPTNeoXConfig
from gptneox.cli.arguments import positive
from gptneox.config import PRESETS
from gptneox.data.tokenizer import CHAT_TOKENS
from gptneox.dtypes import DTYPE_HELP, TORCH_DTYPES, dtype_name
from gptneox.errors import UserError, report_user_error
from gptneox.lora import ALL_LINEAR, TARGET_MODULES, parse_target_modules
from gptneox.memory_plan import HEADROOM, Batch, Hardware, LoraPlan, PlanError, activation_terms, zero_plans
from gptneox.training.config import (CONFIG_DIR, TrainConfig, TrainConfigError, load_section, parse_train_config,
                                     repo_path)
from gptneox.training import noise

with noise.deepspeed_import():  # its CPU fallback warning goes to stdout, into the --json output
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
        found = section_model(section.get("model_name") or "", section.get("cache_dir") or TrainConfig.cache_dir)
        if found is not None:
            return found[0], f"config {name}: {found[1]}"
    raise TrainConfigError(f"--model {name!r}: not a preset ({', '.join(PRESETS)}), a directory with config.json, "
                           "or a config section whose model_name is one of those")


def section_model(model_name: str, cache_dir: str) -> tuple[GPTNeoXConfig, str] | None:
    """A config's model_name as the planner reads it: a directory with config.json (as is, or in cache_dir),
    a preset, or the preset of an `org/name` that is not on disk (stabilityai/stablelm-base-alpha-7b)."""
    for directory in (Path(model_name), Path(cache_dir) / model_name):
        if model_name and (directory / "config.json").is_file():
            return GPTNeoXConfig.from_hf(directory), str(directory / "config.json")
    preset = Path(model_name).name
    if preset in PRESETS:
        return GPTNeoXConfig.from_name(preset), f"model_name {model_name} -> preset {preset}"
    return None


def zero_sections(paths: list[str], batch: Batch, hidden_size: int, world: int) -> dict[str, dict]:
    cfg = TrainConfig(dtype=batch.dtype, per_device_train_batch_size=batch.micro_batch, gradient_accumulation_steps=1)
    sections = {}
    for path in paths:
        resolved, _ = resolve_ds_config(load_ds_config(path if Path(path).is_file() else repo_path(path)), cfg,
                                        world_size=world, hidden_size=hidden_size, total_num_steps=1, cpu=False)
        sections[Path(path).stem] = resolved.get("zero_optimization", {})
    return sections


def lora_settings(args: argparse.Namespace, cfg: TrainConfig | None) -> LoraPlan | None:
    """The LoRA flags, and the run's config (train.py's defaults without --configs) for what they leave out."""
    cfg = cfg or TrainConfig()
    r = cfg.lora_r if args.lora_r is None else args.lora_r
    dropout = cfg.lora_dropout if args.lora_dropout is None else args.lora_dropout
    new_tokens = (len(CHAT_TOKENS) if cfg.lora_train_new_tokens else 0) if args.lora_new_tokens is None \
        else args.lora_new_tokens
    if r < 0:
        raise PlanError(f"--lora_r {r}: must be 0 (full fine-tuning) or a positive rank")
    if not 0 <= dropout < 1:
        raise PlanError(f"--lora_dropout {dropout:g}: must be in [0, 1)")
    if new_tokens < 0:
        raise PlanError(f"--lora_new_tokens {new_tokens}: must be 0 or more")
    if not r:
        return None
    targets = cfg.lora_target_modules if args.lora_target_modules is None else args.lora_target_modules
    try:
        targets = parse_target_modules(targets)
    except ValueError as err:
        raise PlanError(f"--lora_target_modules {args.lora_target_modules!r}: {err}") from None
    return LoraPlan(r, targets, dropout, new_tokens)


COLUMN = 16  # the width of a configuration's column
WIDTH = 100  # the table's width


def gb(value: float) -> str:
    return f"{value / GB:8.2f}"


def header_lines(names: list[str]) -> list[str]:
    """The column titles, a long file stem broken at its underscores (ds_config_zero3 / _offload)."""
    cells = []
    for name in names:
        lines, line = [], ""
        for piece in name.replace("_", "\0_").split("\0"):
            if line and len(line + piece) > COLUMN - 1:
                lines.append(line)
                line = ""
            line += piece
        cells.append(lines + [line])
    depth = max(map(len, cells))
    return ["".join(f"{(cell[i] if i < len(cell) else ''):>{COLUMN}}" for cell in cells) for i in range(depth)]


class Table:
    """Rows of a name and one cell per configuration; a name longer than its column wraps onto more lines."""

    def __init__(self, columns: int):
        self.name_width = max(30, WIDTH - COLUMN * columns)

    def row(self, name: str, cells: list[str], indent: int = 2) -> None:
        lines = textwrap.wrap(name, self.name_width - indent - 1, subsequent_indent="  ") or [""]
        print("\n".join(" " * indent + line for line in lines[:-1]) + ("\n" if len(lines) > 1 else "")
              + f"{' ' * indent + lines[-1]:<{self.name_width}}" + "".join(f"{c:>{COLUMN}}" for c in cells))

    def terms(self, title: str, terms: list[dict[str, float]]) -> None:
        if title:
            print(f"  {title}")
        for name in dict.fromkeys(name for t in terms for name in t):
            self.row(name, [gb(t.get(name, 0.0)) for t in terms], indent=4 if title else 2)


def wrapped(text: str) -> str:
    return textwrap.fill(text, WIDTH)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="With --configs, every other argument is train.py's (--cache_dir DATA, --key value).")
    parser.add_argument("--configs", nargs="+", metavar="NAME",
                        help="train.py's config sections: the model, max_length, per_device_train_batch_size and "
                             "dtype of the run")
    parser.add_argument("--model", help="preset, Hugging Face directory or config section (default: the model of "
                                        "--configs)")
    parser.add_argument("--gpus", type=positive(int), required=True, help="GPUs in the whole job (all nodes)")
    parser.add_argument("--gpus_per_node", type=positive(int), default=None, help="default: min(gpus, 8)")
    parser.add_argument("--gpu_memory_gb", type=positive(float), required=True, help="memory of one GPU, GB (1e9 bytes)")
    parser.add_argument("--host_memory_gb", type=positive(float), default=None, help="memory of one node, GB; checked if given")
    parser.add_argument("--max_length", type=positive(int), help="tokens per row (default: the max_length of --configs)")
    parser.add_argument("--micro_batch", type=positive(int),
                        help="rows per GPU per forward (default: the per_device_train_batch_size of --configs)")
    parser.add_argument("--dtype", type=dtype_name, choices=list(TORCH_DTYPES), metavar="DTYPE",
                        help=f"{DTYPE_HELP} (default: the dtype of --configs, else fp16)")
    parser.add_argument("--deepspeed_configs", nargs="+", default=DEFAULT_DS_CONFIGS, metavar="JSON",
                        help=f"DeepSpeed config files to compare (default: {' '.join(DEFAULT_DS_CONFIGS)})")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON (GB) instead of the table")
    lora = parser.add_argument_group("LoRA (default: the run's lora_* keys, train.py's without --configs)")
    lora.add_argument("--lora_r", type=int, help="adapter rank; 0: full fine-tuning")
    lora.add_argument("--lora_target_modules",
                      help=f"comma list of {', '.join(TARGET_MODULES)}, or {ALL_LINEAR}")
    lora.add_argument("--lora_dropout", type=float,
                      help="dropout on the adapters' input; above 0 each target keeps a copy of its input")
    lora.add_argument("--lora_new_tokens", type=int,
                      help=f"token rows of embed_in and embed_out trained with the adapters (default: "
                           f"{len(CHAT_TOKENS)}, the chat tokens a base GPT-NeoX tokenizer lacks, or 0 with "
                           "lora_train_new_tokens false)")
    return parser


def run_settings(args: argparse.Namespace, cfg: TrainConfig | None) -> tuple[GPTNeoXConfig, str, Batch]:
    """(model config, where it came from, batch) from the flags, and from the run's config for what they leave out."""
    if args.model:
        config, origin = model_config(args.model)
    else:
        found = section_model(cfg.model_name or "", cfg.cache_dir)
        if found is None:
            raise TrainConfigError(f"model_name={cfg.model_name!r} of --configs {' '.join(args.configs)}: not a "
                                   f"preset ({', '.join(PRESETS)}) or a directory with config.json; pass --model")
        config, origin = found[0], f"--configs {' '.join(args.configs)}: {found[1]}"
    max_length = args.max_length or (cfg.max_length if cfg else None)
    micro_batch = args.micro_batch or (cfg.per_device_train_batch_size if cfg else None)
    return config, origin, Batch(micro_batch, max_length, args.dtype or (cfg.dtype if cfg else "fp16"))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, train_args = parser.parse_known_args(argv)
    if train_args and not args.configs:
        parser.error(f"unrecognized arguments: {' '.join(train_args)} (train.py's keys need --configs)")
    if not args.configs and None in (args.model, args.max_length, args.micro_batch):
        parser.error("without --configs, --model, --max_length and --micro_batch are required")
    if args.gpus_per_node is not None and args.gpus_per_node > args.gpus:
        parser.error(f"--gpus_per_node {args.gpus_per_node} is more than --gpus {args.gpus} (the whole job's)")
    try:
        cfg = parse_train_config(["--configs", *args.configs, *train_args]) if args.configs else None
        config, origin, batch = run_settings(args, cfg)
        hardware = Hardware(args.gpus, args.gpus_per_node or min(args.gpus, 8), args.gpu_memory_gb, args.host_memory_gb)
        lora_plan = lora_settings(args, cfg)
        plans = zero_plans(config, hardware, batch, zero_sections(args.deepspeed_configs, batch, config.hidden_size,
                                                                  args.gpus), lora_plan)
    except UserError as err:
        return report_user_error(parser.prog, err)
    activations = {checkpointing: activation_terms(config, batch, checkpointing, lora_plan)
                   for checkpointing in (True, False)}
    limit = hardware.gpu_memory_gb * GB * (1 - HEADROOM)
    peaks = {checkpointing: [p.gpu_peak(sum(activations[checkpointing].values())) for p in plans]
             for checkpointing in (True, False)}
    trained = lora_plan.trainable_parameters(config) if lora_plan is not None else None
    if args.json:
        print(json.dumps(plan_json(origin, hardware, batch, plans, activations, peaks, limit, lora_plan, trained),
                         indent=2))
        return 0
    print(wrapped(f"{origin}; {hardware.gpus} GPUs ({hardware.gpus_per_node} per node) of "
                  f"{hardware.gpu_memory_gb:g} GB; micro-batch {batch.micro_batch} x {batch.max_length} tokens, "
                  f"{batch.dtype}. GB = 1e9 bytes."))
    if lora_plan is not None:
        print(wrapped(f"LoRA r {lora_plan.r} on {', '.join(lora_plan.target_modules)}, dropout {lora_plan.dropout:g}; "
                      "trained: " + ", ".join(f"{what} {count:,}" for what, count in trained.items())
                      + " parameters; the base frozen in " + batch.dtype))
    print()
    table = Table(len(plans))
    titles = header_lines([p.name for p in plans])
    for i, line in enumerate(titles):
        print(f"{'per GPU' if i == len(titles) - 1 else '':<{table.name_width}}{line}")
    table.terms("", [p.gpu_states for p in plans])
    table.terms("at the optimizer step only:", [p.gpu_step for p in plans])
    for checkpointing in (True, False):
        table.terms(f"{'with' if checkpointing else 'without'} gradient checkpointing:",
                    [activations[checkpointing]] * len(plans))
    for checkpointing in (True, False):
        table.row(f"peak, {'with' if checkpointing else 'without'} checkpointing",
                  [gb(peak) + (" fits" if peak <= limit else " NO") for peak in peaks[checkpointing]], indent=0)
    print("\nhost, per node")
    table.terms("", [p.host_per_node for p in plans])
    print("disk")
    table.terms("", [p.disk for p in plans])
    print("\n" + wrapped(f"'fits' leaves {HEADROOM:.0%} of each GPU ({hardware.gpu_memory_gb * HEADROOM:.0f} GB) for "
                         "allocator fragmentation, the CUDA context and NCCL; the checkpoint size is one saved step "
                         "(save_total_limit keep)."))
    for plan, with_ckpt, without in zip(plans, *(([p <= limit for p in peaks[c]]) for c in (True, False))):
        host = sum(plan.host_per_node.values())
        host_note = "" if hardware.host_memory_gb is None else (
            f", host {host / GB:.0f} of {hardware.host_memory_gb:g} GB per node "
            f"{'fits' if host <= hardware.host_memory_gb * GB else 'does NOT fit'}")
        verdict = ("fits with and without checkpointing" if with_ckpt and without else
                   "fits with gradient checkpointing only" if with_ckpt else "does not fit")
        print(f"{plan.name}: {verdict}{host_note}")
    return 0


def plan_json(origin: str, hardware: Hardware, batch: Batch, plans: list, activations: dict, peaks: dict,
              limit: float, lora_plan: LoraPlan | None, trained: dict | None) -> dict:
    """The table's figures in GB (1e9 bytes), per configuration."""
    def in_gb(terms: dict[str, float]) -> dict[str, float]:
        return {name: round(value / GB, 3) for name, value in terms.items()}

    return {
        "model": origin, "gpus": hardware.gpus, "gpus_per_node": hardware.gpus_per_node,
        "gpu_memory_gb": hardware.gpu_memory_gb, "host_memory_gb": hardware.host_memory_gb,
        "micro_batch": batch.micro_batch, "max_length": batch.max_length, "dtype": batch.dtype,
        "usable_gpu_memory_gb": round(limit / GB, 3),
        "lora": None if lora_plan is None else {
            "r": lora_plan.r, "target_modules": list(lora_plan.target_modules), "dropout": lora_plan.dropout,
            "trained_parameters": trained},
        "activations_gb": {"with_checkpointing": in_gb(activations[True]),
                           "without_checkpointing": in_gb(activations[False])},
        "plans": [{"deepspeed_config": plan.name, "gpu_gb": in_gb(plan.gpu_states),
                   "gpu_at_optimizer_step_gb": in_gb(plan.gpu_step), "host_per_node_gb": in_gb(plan.host_per_node),
                   "disk_gb": in_gb(plan.disk),
                   "peak_gb": {"with_checkpointing": round(peaks[True][i] / GB, 3),
                               "without_checkpointing": round(peaks[False][i] / GB, 3)},
                   "fits": {"with_checkpointing": peaks[True][i] <= limit,
                            "without_checkpointing": peaks[False][i] <= limit}}
                  for i, plan in enumerate(plans)],
    }


if __name__ == "__main__":
    sys.exit(main())

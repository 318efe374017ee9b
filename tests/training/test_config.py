"""The training config: sections merged left to right, typed overrides, errors that name the key."""
from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from gptneox.training.config import PACKAGE_DIR, TrainConfig, TrainConfigError, parse_train_config

REPO = Path(__file__).resolve().parents[2]


def test_sft7_command_line_merges_left_to_right_and_overrides():
    cfg = parse_train_config(["--configs", "defaults", "stablelm-7b", "--cache_dir", "DATA", "--output_dir", "OUT",
                              "--num_train_epochs", "4", "--deepspeed", "--local_rank=0"])
    assert cfg.model_name == "stabilityai/stablelm-base-alpha-7b"
    assert (cfg.max_length, cfg.warmup_steps, cfg.gradient_accumulation_steps) == (4096, 100, 2)
    assert (cfg.learning_rate, cfg.adam_beta2, cfg.adam_epsilon, cfg.max_grad_norm) == (1e-5, 0.95, 1e-12, 2.0)
    assert (cfg.cache_dir, cfg.output_dir, cfg.num_train_epochs) == ("DATA", "OUT", 4)
    assert cfg.rng_seed == 0xA1221F97 and cfg.dtype == "fp16" and cfg.gradient_checkpointing


def test_overrides_are_typed_like_the_default():
    cfg = parse_train_config(["--configs", "defaults", "tiny", "--learning_rate", "3e-4", "--max_steps", "7",
                              "--resume", "--gradient_checkpointing", "false", "--no-save_total_limit",
                              "--datasets", "[{vicuna: {val_split: 0.1}}]", "--peak_tflops=1e2"])
    assert cfg.learning_rate == 3e-4 and isinstance(cfg.learning_rate, float)
    assert cfg.max_steps == 7 and cfg.resume is True and cfg.gradient_checkpointing is False
    assert cfg.save_total_limit is None and cfg.peak_tflops == 100.0
    assert cfg.datasets == [{"vicuna": {"val_split": 0.1}}]


@pytest.mark.parametrize("argv, message", [
    (["--configs", "defaults", "stablelm7b"], "did you mean stablelm-7b"),
    (["--learnig_rate", "1e-4"], "did you mean 'learning_rate'"),
    (["--max_length", "long"], "--max_length 'long'"),
    (["--dtype", "fp8"], "dtype='fp8'"),
    (["--resume", "maybe"], "--resume 'maybe'"),
    (["--deepspeed", "ds_config.json"], "unexpected argument 'ds_config.json' \\(overrides look like --key value\\); a "
                                        "DeepSpeed config is --deepspeed_config FILE"),
])
def test_bad_command_lines_name_the_problem(argv, message):
    with pytest.raises(TrainConfigError, match=message):
        parse_train_config(argv)


@pytest.mark.parametrize("argv, message", [
    (["--save_total_limit", "0"], "save_total_limit=0 must be at least 1"),  # would delete the final save
    (["--save_total_limit", "-1"], "save_total_limit=-1 must be at least 1"),
    (["--eval_size", "0"], "eval_size=0 must be at least 1"),
    (["--max_steps", "-5"], "max_steps=-5 must be at least 1"),
    (["--rng_seed", "-1"], "rng_seed=-1 must be in \\[0, 2\\*\\*64\\)"),
    (["--warmup_steps", "-1"], "warmup_steps=-1 must be 0 or more"),
    (["--learning_rate", "nan"], "learning_rate=nan must be a finite positive number"),
    (["--learning_rate", "0"], "learning_rate=0.0 must be positive"),
    (["--adam_beta2", "1.0"], "adam_beta2=1.0 must be in \\[0, 1\\)"),
    (["--max_grad_norm", "-2"], "max_grad_norm=-2.0 must be a finite number, 0 or more"),
    (["--pad_to_multiple_of", "0"], "pad_to_multiple_of=0 must be at least 1"),
    (["--max_length", "1"], "max_length=1 must be at least 2 \\(a token and its target\\)"),
    (["--val_max_length", "1"], "val_max_length=1 must be at least 2"),
    (["--lora_r", "2.5"], "--lora_r '2.5': cannot be read as int \\(expected a whole number\\)"),
])
def test_every_numeric_key_is_range_checked_naming_it(argv, message):
    with pytest.raises(TrainConfigError, match=message):
        parse_train_config(argv)
    assert parse_train_config(["--save_total_limit", "1", "--no-max_steps", "--warmup_steps", "0"]).max_steps is None


def test_unknown_key_in_a_section_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("bad:\n  warmup_step: 10\n")
    with pytest.raises(TrainConfigError, match=r"bad.yaml: unknown key 'warmup_step'; did you mean 'warmup_steps'"):
        parse_train_config(["--configs", "defaults", str(bad)])


@pytest.mark.parametrize("text, message", [
    ("per_device_train_batch_size: 2\nnum_train_epochs: 3\nbase_model: x\n",  # axolotl's layout: no section
     r"flat.yaml: training keys at its top level \(per_device_train_batch_size, num_train_epochs, base_model\); a "
     r"YAML file holds one section: indent the keys under a name of your choosing, as in 'flat:' followed by "
     r"'  per_device_train_batch_size: ...'"),
    ("mine:\n  learning_rate: 1.0e-4\n  max_steps: 3\n  learning_rate: 1.0e-5\n",
     r"flat.yaml: invalid YAML: key 'learning_rate' given twice \(line 4, column 3\)$"),
    ("mine:\n  null: 1\n", r"flat.yaml: key None is not a name \(YAML reads it as NoneType\)"),
    ("mine:\n  5: 1\n", r"flat.yaml: key 5 is not a name \(YAML reads it as int\)"),
])
def test_yaml_files_that_would_be_misread_are_refused_naming_the_file(tmp_path, text, message):
    (tmp_path / "flat.yaml").write_text(text)
    with pytest.raises(TrainConfigError, match=message):
        parse_train_config(["--configs", "defaults", str(tmp_path / "flat.yaml")])


def test_every_shipped_config_loads():
    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert len(paths) >= 8, paths
    for path in paths:
        parse_train_config(["--configs", "defaults", path.stem])


def test_help_lists_every_key_by_group_with_type_default_and_meaning(capsys):
    with pytest.raises(SystemExit) as done:
        parse_train_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert done.value.code == 0
    groups = ["model keys:", "data keys:", "optimisation keys:", "checkpointing keys:", "logging and evaluation keys:"]
    assert [text.index(g) for g in groups] == sorted(text.index(g) for g in groups)
    assert "--dtype fp32|fp16|bf16 training precision" in text and "(default: fp16)" in text
    assert "--max_steps INT|null stop after this many optimizer steps" in text
    assert "--datasets YAML-LIST" in text and "--save_strategy steps|epoch" in text
    for f in fields(TrainConfig):
        assert f"--{f.name} " in text and f.metadata["help"] in text, f.name


# ------------------------------------------------------------------ where relative paths point
def test_a_sections_input_paths_are_taken_from_its_yaml_file(tmp_path, monkeypatch):
    section = tmp_path / "mine" / "mine.yaml"
    section.parent.mkdir()
    section.write_text("mine:\n  cache_dir: data\n  tokenizer_path: tok/tokenizer.json\n"
                       "  deepspeed_config: /abs/ds.json\n  output_dir: out\n  log_dir: logs\n")
    monkeypatch.chdir(tmp_path)
    cfg = parse_train_config(["--configs", "defaults", str(section.relative_to(tmp_path))])
    assert cfg.cache_dir == str(tmp_path / "mine" / "data")
    assert cfg.tokenizer_path == str(tmp_path / "mine" / "tok" / "tokenizer.json")
    assert cfg.deepspeed_config == "/abs/ds.json"
    assert (cfg.output_dir, cfg.log_dir) == ("out", "logs")  # where the run writes: the working directory


def test_bundled_sections_point_into_the_package_and_the_command_line_at_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = parse_train_config(["--configs", "defaults", "tiny", "sample-mix"])
    assert Path(cfg.cache_dir) == PACKAGE_DIR / "data" / "sample"
    assert Path(cfg.tokenizer_path).read_bytes() == (REPO / "data" / "sample" / "tokenizer.json").read_bytes()
    assert Path(cfg.deepspeed_config).read_bytes() == (REPO / "ds_config.json").read_bytes()
    assert cfg.output_dir == "out/tiny"
    assert Path(parse_train_config(["--configs", "tiny"]).deepspeed_config) == PACKAGE_DIR / "ds_config.json"
    cfg = parse_train_config(["--configs", "defaults", "sample-mix", "--cache_dir", "DATA",
                              "--deepspeed_config", "my.json"])
    assert (cfg.cache_dir, cfg.deepspeed_config) == ("DATA", "my.json")
    assert parse_train_config(["--configs", "defaults"]).cache_dir == ".cache"


def test_the_bundled_files_are_the_top_level_ones():
    """The package's configs, ds_config.json and sample data are the checkout's top-level files (symlinks
    here, copies in a wheel), so the seed's ds_config.json exists once."""
    for bundled, top in ((PACKAGE_DIR / "configs", REPO / "configs"), (PACKAGE_DIR / "ds_config.json", REPO / "ds_config.json"),
                         (PACKAGE_DIR / "data" / "sample", REPO / "data" / "sample"),
                         (PACKAGE_DIR / "data" / "prompts", REPO / "data" / "prompts")):
        assert bundled.resolve() == top.resolve()


def test_no_flag_sets_a_boolean_false_and_other_keys_null_and_long_dtype_names_are_accepted():
    cfg = parse_train_config(["--configs", "defaults", "tiny", "--pack", "--no-pack", "--no-max_steps",
                              "--dtype", "bfloat16"])
    assert cfg.pack is False and cfg.max_steps is None and cfg.dtype == "bf16"
    assert TrainConfig(dtype="float32").dtype == "fp32" and "dtype: fp32" in TrainConfig(dtype="float32").to_yaml()


# ------------------------------------------------------------------ null, and the Trainer's habits
@pytest.mark.parametrize("key, takes", [("eval_steps", "INT"), ("max_length", "INT"), ("learning_rate", "FLOAT"),
                                        ("per_device_train_batch_size", "INT"), ("dtype", "fp32|fp16|bf16")])
def test_no_key_is_refused_at_parse_time_where_the_type_has_no_null(key, takes):
    with pytest.raises(TrainConfigError, match=rf"^--no-{key}: {key} cannot be null \(it takes {re.escape(takes)}\)"):
        parse_train_config(["--configs", "defaults", "tiny", f"--no-{key}"])


def test_every_key_either_takes_no_or_refuses_it_in_one_line():
    """--no-KEY: false for a boolean, null where the type has null (|null in --help), else a parse error."""
    for f in fields(TrainConfig):
        argv = ["--configs", "defaults", "tiny", f"--no-{f.name}"]
        if f.type == "bool" or "None" in str(f.type):
            cfg = parse_train_config(argv)
            assert getattr(cfg, f.name) is (False if f.type == "bool" else None), f.name
        else:
            with pytest.raises(TrainConfigError, match="cannot be null"):
                parse_train_config(argv)


def test_a_null_in_a_yaml_file_is_refused_naming_the_file_and_key(tmp_path):
    section = tmp_path / "mine.yaml"
    section.write_text("mine:\n  eval_steps: null\n")
    with pytest.raises(TrainConfigError, match=rf"{re.escape(str(section))}: eval_steps cannot be null \(it takes "
                                               r"INT\); to switch evaluation off: eval_strategy no"):
        parse_train_config(["--configs", "defaults", str(section)])
    with pytest.raises(TrainConfigError, match="eval_steps cannot be null"):
        TrainConfig(eval_steps=None)  # the library's way in is checked too


def test_eval_strategy_takes_the_trainers_values_yaml_no_included(tmp_path):
    assert parse_train_config(["--configs", "defaults", "tiny"]).eval_strategy == "steps"
    assert parse_train_config(["--eval_strategy", "no"]).eval_strategy == "no"
    assert parse_train_config(["--eval_strategy=epoch"]).eval_strategy == "epoch"
    section = tmp_path / "quiet.yaml"
    section.write_text("quiet:\n  eval_strategy: no\n")  # YAML 1.1 reads a bare no as false
    assert parse_train_config(["--configs", "defaults", str(section)]).eval_strategy == "no"
    section.write_text("quiet:\n  save_strategy: no\n")  # the Trainer's value; the last step is always saved here
    with pytest.raises(TrainConfigError, match=r"quiet.yaml: save_strategy=False \(YAML reads a bare no, yes, off or "
                                               r"on as a boolean\) is not supported \(allowed: steps, epoch\)"):
        parse_train_config(["--configs", "defaults", str(section)])
    with pytest.raises(TrainConfigError, match=r"save_strategy='no' is not supported \(allowed: steps, epoch\); the "
                                               r"last step is always saved"):
        parse_train_config(["--save_strategy", "no"])
    with pytest.raises(TrainConfigError, match=r"eval_strategy='never' is not supported \(allowed: no, steps, epoch\)"):
        parse_train_config(["--eval_strategy", "never"])
    with pytest.raises(TrainConfigError, match=r"eval_steps=0 must be at least 1; to switch evaluation off: "
                                               r"eval_strategy no"):
        parse_train_config(["--eval_steps", "0"])


@pytest.mark.parametrize("argv, message", [
    (["--bf16"], "--bf16: 'bf16' is not a key here; the precision is one key here: --dtype bf16"),
    (["--fp16", "true"], "--fp16: 'fp16' is not a key here; the precision is one key here: --dtype fp16"),
    (["--lr_scheduler_type", "cosine"], "the learning-rate schedule is the DeepSpeed config's 'scheduler' section "
                                        ".*set scheduler.type to WarmupLR .* or WarmupCosineLR, and pass "
                                        "--deepspeed_config"),
    (["--resume_from_checkpoint", "out/checkpoint-500"], "use --resume: it continues the run in output_dir from "
                                                         "its newest complete checkpoint"),
    (["--seed", "42"], "--rng_seed"),
    (["--logging_dir", "runs"], "TensorBoard's directory is --log_dir"),
    (["--evaluation_strategy", "no"], "--eval_strategy no\\|steps\\|epoch"),
    (["--warmup_ratio", "0.1"], "--warmup_steps"),
])
def test_hugging_face_trainer_arguments_point_to_ours(argv, message):
    with pytest.raises(TrainConfigError, match=message):
        parse_train_config(argv)


def test_suggestions_name_an_existing_key():
    """Every pointer names a key that exists (--eval_strategy once suggested save_strategy)."""
    from gptneox.training.config import FOREIGN_KEYS
    keys = {f.name for f in fields(TrainConfig)}
    for name, pointer in FOREIGN_KEYS.items():
        named = re.findall(r"--(\w+)", pointer)
        assert set(named) <= keys, (name, named)
    assert parse_train_config(["--eval_strategy", "epoch"]).eval_strategy == "epoch"
    assert not keys & FOREIGN_KEYS.keys()  # a pointer never hides a key


@pytest.mark.parametrize("flag, wrong", [
    ("--logging_strategy", "logging_steps"), ("--eval_batch_size", "eval_size"), ("--batch_size", "eval_size"),
    ("--eval_accumulation_steps", "gradient_accumulation_steps"), ("--val_set_size", "eval_size"),
    ("--save_safetensors", "save_steps"), ("--half_precision_backend", "attention_backend"),
    ("--use_fast_tokenizer", "use_flash_attention"), ("--lora_target", "log_dir")])
def test_other_tools_arguments_never_get_a_wrong_suggestion(flag, wrong):
    with pytest.raises(TrainConfigError) as refused:
        parse_train_config([flag, "1"])
    assert f"did you mean '{wrong}'" not in str(refused.value)
    assert str(refused.value).startswith(f"{flag}: ")


def test_fractional_epochs_are_accepted_as_the_trainer_does():
    assert parse_train_config(["--num_train_epochs", "0.5"]).num_train_epochs == 0.5
    assert parse_train_config(["--num_train_epochs", "2"]).num_train_epochs == 2
    with pytest.raises(TrainConfigError, match="num_train_epochs=0.0 must be positive"):
        parse_train_config(["--num_train_epochs", "0"])
    with pytest.raises(TrainConfigError, match="num_train_epochs=-1.0 must be a finite positive number"):
        parse_train_config(["--num_train_epochs", "-1"])


# ------------------------------------------------------------------ a user's own data section
def test_a_users_data_files_are_taken_from_its_yaml_file_when_no_cache_dir_is_set(tmp_path, monkeypatch):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "mine.yaml").write_text(
        "mine:\n  datasets:\n    - chat:\n        input_file_path: chats.jsonl\n"
        "    - alpaca:\n        input_file_path: [a/one.json, /abs/two.json, 'parts/*.jsonl']\n    - vicuna\n")
    monkeypatch.chdir(tmp_path)
    cfg = parse_train_config(["--configs", "defaults", "tiny", "mine/mine.yaml"])
    assert cfg.datasets == [{"chat": {"input_file_path": str(folder / "chats.jsonl")}},
                            {"alpaca": {"input_file_path": [str(folder / "a/one.json"), "/abs/two.json",
                                                            str(folder / "parts/*.jsonl")]}},
                            "vicuna"]  # a default file name stays cache_dir's
    assert cfg.cache_dir == ".cache"
    # a cache_dir set anywhere (the file, a later section, the command line) keeps them relative to it
    for argv in (["--configs", "defaults", "tiny", "mine/mine.yaml", "--cache_dir", "DATA"],
                 ["--configs", "defaults", "tiny", "sample-mix", "mine/mine.yaml"]):
        assert parse_train_config(argv).datasets[0] == {"chat": {"input_file_path": "chats.jsonl"}}
    # datasets from the command line are the working directory's business (relative to cache_dir)
    cfg = parse_train_config(["--configs", "defaults", "mine/mine.yaml", "--datasets", "[{chat: {input_file_path: x.jsonl}}]"])
    assert cfg.datasets == [{"chat": {"input_file_path": "x.jsonl"}}]


def test_a_yaml_file_with_several_sections_says_to_split_it(tmp_path):
    both = tmp_path / "both.yaml"
    both.write_text("model:\n  model_name: tiny\ndata:\n  datasets: []\n")
    with pytest.raises(TrainConfigError, match=r"both.yaml: holds 2 sections \(model, data\); a YAML file holds one: "
                                               r"put each in its own file and list the files in --configs"):
        parse_train_config(["--configs", "defaults", str(both)])

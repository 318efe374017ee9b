"""LoRA through the training loop on CPU (one process, fp32): it trains only adapters and the chat tokens'
rows, checkpoints only those, resumes exactly, and exports a merged model plus a peft adapter that peft
loads with the merged model's logits."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file

from gptneox import GPTNeoX, GPTNeoXConfig
from gptneox.chat import load_model_and_tokenizer
from gptneox.cli.chat import main as chat_main
from gptneox.cli.export_hf import main as export_main
from gptneox.data import load_tokenizer
from gptneox.lora import TARGET_MODULES, LoraConfig
from gptneox.train import main as train_main
from gptneox.training.checkpoint import POINTER, tag_for
from gptneox.training.config import parse_train_config
from gptneox.training.distributed import init_distributed
from tests.helpers import run_python

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample"
DATASETS = [{"vicuna": {"input_file_path": str(SAMPLE / "vicuna_sample.json"), "val_split": 0.2}},
            {"oasst_export": {"input_file_path": str(SAMPLE / "oasst_sample.jsonl.gz"), "lang": "en,de"}}]
CHAT_TOKEN_IDS = [1536, 1537, 1538, 1539, 1540]  # appended to the sample tokenizer's 1536 tokens


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 'pretrained' base: tiny weights with a 1552-row vocabulary (room for the chat tokens, as Pythia's
    and StableLM's have) and the sample tokenizer as stored, without the chat tokens; plus a data section."""
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    GPTNeoX(GPTNeoXConfig.from_name("tiny", vocab_size=1552)).save_pretrained(root / "base")
    shutil.copy(SAMPLE / "tokenizer.json", root / "base" / "tokenizer.json")
    (root / "mix.yaml").write_text(json.dumps({"mix": {"datasets": DATASETS}}))
    init_distributed()
    return root


def run_train(base, output_dir, *extra) -> int:
    argv = ["--configs", "defaults", "tiny", str(base / "mix.yaml"), "--model_name", str(base / "base"),
            "--output_dir", str(output_dir), "--max_length", "64", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--eval_size", "4", "--warmup_steps", "1",
            "--learning_rate", "1e-2", "--lora_r", "4", "--lora_alpha", "8", *extra]
    return train_main(argv)


def losses(output_dir) -> list[tuple]:
    records = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in records if "loss" in r]


@pytest.mark.slow
def test_lora_trains_adapters_only_resumes_exactly_and_exports_both_ways(base, tmp_path, capfd):
    common = ["--max_steps", "8", "--save_steps", "4", "--eval_steps", "100", "--lora_target_modules",
              "all-linear", "--lora_dropout", "0.1", "--gradient_checkpointing", "--pack"]
    straight = tmp_path / "straight"
    assert run_train(base, straight, *common) == 0
    curve = losses(straight)
    assert [step for step, *_ in curve] == list(range(1, 9))
    assert curve[-1][1] < curve[0][1] - 0.05  # it learns (the first loss is about 7.35)

    # the checkpoint holds adapters and the chat tokens' rows only, and their optimizer state only
    tag = straight / "checkpoints" / tag_for(8)
    module = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(".lora_" in name or "token_adapter" in name for name in module), sorted(module)
    assert len(module) == 2 * 4 * 2 + 2
    optimizer = torch.load(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    flat = sum(group.numel() for group in optimizer["optimizer_state_dict"]["single_partition_of_fp32_groups"])
    assert flat == sum(tensor.numel() for tensor in module.values())
    record = json.loads((tag / "run.json").read_text())["lora"]
    assert record == {"r": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": [
        "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], "token_ids": CHAT_TOKEN_IDS}

    # resume from step 4: steps 5..8 as in the straight run, dropout masks and all
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints", resumed / "checkpoints")
    (resumed / "checkpoints" / POINTER).write_text(json.dumps({"latest": tag_for(4), "complete": [tag_for(4)]}))
    assert run_train(base, resumed, *common, "--resume") == 0
    assert losses(resumed) == curve[4:]

    # the merged export: the base's untargeted weights bit for bit, the adapters folded into the rest
    base_weights = load_file(base / "base" / "model.safetensors")
    merged = load_file(straight / "model.safetensors")
    adapter = {k.removeprefix("base_model.model."): v
               for k, v in load_file(straight / "adapter" / "adapter_model.safetensors").items()}
    for name in ("gpt_neox.layers.0.input_layernorm.weight", "gpt_neox.layers.1.mlp.dense_4h_to_h.bias"):
        assert torch.equal(merged[name], base_weights[name]), name
    qkv = "gpt_neox.layers.1.attention.query_key_value"
    torch.testing.assert_close(merged[f"{qkv}.weight"], base_weights[f"{qkv}.weight"] + 2.0 * (
        adapter[f"{qkv}.lora_B.weight"] @ adapter[f"{qkv}.lora_A.weight"]))
    rows = adapter["gpt_neox.embed_in.token_adapter.trainable_tokens_delta"]
    assert torch.equal(merged["gpt_neox.embed_in.weight"][CHAT_TOKEN_IDS], rows)
    assert not torch.equal(rows, base_weights["gpt_neox.embed_in.weight"][CHAT_TOKEN_IDS])  # they trained
    assert torch.equal(merged["embed_out.weight"][:1536], base_weights["embed_out.weight"][:1536])
    config = json.loads((straight / "adapter" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"embed_in": CHAT_TOKEN_IDS, "lm_head": CHAT_TOKEN_IDS}
    assert config["base_model_name_or_path"] == str((base / "base").resolve())

    # peft over the base model gives the merged model's logits
    theirs = PeftModel.from_pretrained(transformers.GPTNeoXForCausalLM.from_pretrained(base / "base"),
                                       straight / "adapter").eval()
    exported = transformers.GPTNeoXForCausalLM.from_pretrained(straight).eval()
    tokenizer = load_tokenizer(straight)
    ids = torch.tensor([tokenizer.encode("<|prompter|>What is 2+2?<|endoftext|><|assistant|>").ids])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, exported(ids).logits, rtol=1e-5, atol=1e-5)

    # tools/export_hf.py exports the checkpoint both ways
    assert export_main([str(straight / "checkpoints"), str(tmp_path / "again"), "--tag", tag_for(8)]) == 0
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert torch.equal(again["embed_out.weight"], merged["embed_out.weight"])
    assert (tmp_path / "again" / "adapter" / "adapter_model.safetensors").is_file()

    # chat over the base with the adapter answers as the merged model does; a base of another shape is refused
    with_adapter, chat_tokenizer = load_model_and_tokenizer(base / "base", adapter=straight / "adapter")
    assert chat_tokenizer.get_vocab() == tokenizer.get_vocab()
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(ids), exported(ids).logits, rtol=1e-5, atol=1e-5)
    capfd.readouterr()
    prompt = ["--prompt", "What is 2+2?", "--greedy", "--max_new_tokens", "4"]
    assert chat_main(["--model", str(base / "base"), "--adapter", str(straight / "adapter"), *prompt]) == 0
    torch.manual_seed(0)
    GPTNeoX(GPTNeoXConfig.from_name("tiny", vocab_size=1552, hidden_size=32)).save_pretrained(tmp_path / "narrow")
    assert chat_main(["--model", str(tmp_path / "narrow"), "--adapter", str(straight / "adapter"), *prompt]) == 2
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert ("trainable_tokens_delta has shape [5, 64], the base model's gpt_neox.embed_in.weight [1552, 32] needs "
            "[5, 32]: the adapter was trained on a base of another shape") in err
    # the merged export with its own adapter: folding it in again would apply it twice
    assert chat_main(["--model", str(straight), "--adapter", str(straight / "adapter"), *prompt]) == 2
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"is the adapter {straight} already holds merged into its " \
        f"weights: chat with --model {straight} alone" in err, err


@pytest.mark.slow
def test_zero3_trains_the_adapters_of_zero2(base, tmp_path):
    """One process with ds_config_zero3.json (a fresh interpreter: ZeRO-3 patches the process's modules):
    the frozen base partitioned, adapters added after it, the losses and the adapter of ZeRO-2."""
    common = ["--max_steps", "3", "--eval_steps", "100", "--lora_target_modules", "all-linear", "--pack",
              "--gradient_checkpointing"]
    assert run_train(base, tmp_path / "zero2", *common) == 0
    argv = ["--configs", "defaults", "tiny", base / "mix.yaml", "--model_name", base / "base", "--output_dir",
            tmp_path / "zero3", "--max_length", "64", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--eval_size", "4", "--warmup_steps", "1", "--learning_rate",
            "1e-2", "--lora_r", "4", "--lora_alpha", "8", *common, "--deepspeed_config", "ds_config_zero3.json"]
    run = run_python("train.py", *argv, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "zero3" / "ds_config.resolved.json").read_text())["zero_optimization"]["stage"] == 3
    for (step, loss, grad_norm, lr), theirs in zip(losses(tmp_path / "zero3"), losses(tmp_path / "zero2"), strict=True):
        assert (step, lr) == (theirs[0], theirs[3])
        assert loss == pytest.approx(theirs[1], rel=1e-6) and grad_norm == pytest.approx(theirs[2], rel=1e-5)
    ours, reference = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors")
                       for run in ("zero3", "zero2"))
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_compiled_lora_blocks_train_like_eager_ones(base, tmp_path, monkeypatch):
    """compile: true with adapters in every linear layer, dropout, gradient checkpointing and packed rows: the
    losses, gradient norms and exported adapter of compile: false (tolerance as in test_loop's compile test:
    inductor reassociates fp32 sums; a wrongly compiled block moves the first loss by far more).

    Inductor draws dropout masks from its own generator, so a compiled run trains with other masks (step 1's
    gradient norm differed by 1.2%); fallback_random makes it draw eager's, which is what lets the runs agree."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor

    monkeypatch.setattr(inductor, "fallback_random", True)

    common = ["--max_steps", "3", "--eval_steps", "100", "--lora_target_modules", "all-linear", "--lora_dropout",
              "0.1", "--pack", "--gradient_checkpointing"]
    counters.clear()
    assert run_train(base, tmp_path / "eager", *common) == 0
    assert counters["stats"]["unique_graphs"] == 0
    assert run_train(base, tmp_path / "compiled", *common, "--compile") == 0
    assert counters["stats"]["unique_graphs"] > 0  # the blocks really ran compiled
    for (step, loss, grad_norm, lr), eager in zip(losses(tmp_path / "compiled"), losses(tmp_path / "eager"),
                                                  strict=True):
        assert (step, lr) == (eager[0], eager[3])
        assert loss == pytest.approx(eager[1], rel=1e-5) and grad_norm == pytest.approx(eager[2], rel=1e-5)
    compiled, eager = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors")
                       for run in ("compiled", "eager"))
    assert compiled.keys() == eager.keys() and any("lora_A" in name for name in compiled)
    for name, tensor in eager.items():
        torch.testing.assert_close(compiled[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def test_lora_and_full_checkpoints_do_not_resume_as_each_other(base, tmp_path, capsys):
    short = ["--max_steps", "1", "--eval_steps", "100", "--max_length", "32"]
    assert run_train(base, tmp_path / "full", *short, "--lora_r", "0") == 0
    assert run_train(base, tmp_path / "lora", *short, "--lora_train_new_tokens", "false") == 0
    assert json.loads((tmp_path / "lora" / "adapter" / "adapter_config.json").read_text())[
        "trainable_token_indices"] is None
    module = torch.load(tmp_path / "lora" / "checkpoints" / tag_for(1) / "mp_rank_00_model_states.pt",
                        weights_only=False)["module"]
    assert sorted(module) == sorted(f"gpt_neox.layers.{i}.attention.query_key_value.lora_{m}.weight"
                                    for i in (0, 1) for m in "AB")
    capsys.readouterr()
    for source, flags, message in [
            ("full", [], "was written with full fine-tuning (lora_r=0), this run has LoRA r=4, alpha=8.0, "
                         "dropout=0.0, target_modules=['query_key_value'], token_ids=[1536, 1537, 1538, 1539, 1540]; "
                         "lora cannot change across a resume"),
            ("lora", ["--lora_r", "0"], "this run has full fine-tuning (lora_r=0); lora cannot change"),
            ("lora", ["--lora_r", "8", "--lora_train_new_tokens", "false"], "with LoRA r=4, this run has LoRA r=8; "
                                                                            "lora cannot change"),
            ("lora", [], "with LoRA token_ids=[], this run has LoRA token_ids=[1536, 1537, 1538, 1539, 1540]")]:
        resumed = tmp_path / f"{source}-resumed"
        shutil.rmtree(resumed, ignore_errors=True)
        shutil.copytree(tmp_path / source / "checkpoints", resumed / "checkpoints")
        before = sorted(str(p.relative_to(resumed)) for p in resumed.rglob("*"))
        assert run_train(base, resumed, *short, "--resume", *flags) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert sorted(str(p.relative_to(resumed)) for p in resumed.rglob("*")) == before  # nothing written


def test_adapters_resume_and_export_onto_the_base_they_were_trained_on_only(base, tmp_path, capsys):
    """A LoRA checkpoint holds no base weights: a resume or export given another base of the same shape
    (another seed) is refused in one line, nothing written, until the user says it is meant; a base that has
    moved is named with --base_model and exports what training exported."""
    short = ["--max_steps", "1", "--eval_steps", "100", "--max_length", "32", "--save_steps", "1"]
    run = tmp_path / "run"
    assert run_train(base, run, *short) == 0
    torch.manual_seed(1)
    GPTNeoX(GPTNeoXConfig.from_name("tiny", vocab_size=1552)).save_pretrained(tmp_path / "other")
    shutil.copy(SAMPLE / "tokenizer.json", tmp_path / "other" / "tokenizer.json")
    before = sorted((str(p.relative_to(run)), p.stat().st_mtime_ns) for p in run.rglob("*"))
    capsys.readouterr()
    resume = [*short, "--max_steps", "2", "--resume", "--allow_changed", "total_steps"]
    assert run_train(base, run, *resume, "--model_name", str(tmp_path / "other")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"({(base / 'base').resolve()}), this run has " in err, err
    assert err.rstrip().endswith(f"({tmp_path / 'other'}); pass --allow_changed total_steps,base_weights if that "
                                 "is intended"), err
    assert sorted((str(p.relative_to(run)), p.stat().st_mtime_ns) for p in run.rglob("*")) == before

    checkpoints = str(run / "checkpoints")
    moved = tmp_path / "moved"
    shutil.copytree(base / "base", moved)
    assert export_main([checkpoints, str(tmp_path / "into-other"), "--base_model", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "are not those of the base this LoRA checkpoint was trained on" \
        in err and "--allow_other_base" in err, err
    assert not (tmp_path / "into-other").exists()
    assert export_main([checkpoints, str(tmp_path / "from-moved"), "--base_model", str(moved)]) == 0
    exported = load_file(run / "model.safetensors")
    assert all(torch.equal(tensor, exported[name]) for name, tensor in
               load_file(tmp_path / "from-moved" / "model.safetensors").items())
    assert json.loads((tmp_path / "from-moved" / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(moved)
    assert export_main([checkpoints, str(tmp_path / "forced"), "--base_model", str(tmp_path / "other"),
                        "--allow_other_base"]) == 0
    assert run_train(base, run, *resume, "--model_name", str(tmp_path / "other"), "--allow_changed",
                     "total_steps,base_weights") == 0


@pytest.mark.parametrize("flags, message", [
    (["--lora_r", "-1"], "lora_r=-1 must be 0 (LoRA off) or more"),
    (["--lora_alpha", "0"], "lora_alpha=0.0 must be"),
    (["--lora_dropout", "1"], "lora_dropout=1.0 must be in [0, 1)"),
    (["--lora_target_modules", "query_key_value,attention"], "'attention': GPT-NeoX's targets are query_key_value, "
                                                             "dense, dense_h_to_4h, dense_4h_to_h or all-linear"),
    (["--model_name", "tiny"], "lora_r=4 with model_name='tiny', a preset with random weights"),
    (["--lora_target_modules", "[5]"], "'5': GPT-NeoX's targets are query_key_value, dense"),
])
def test_bad_lora_settings_fail_in_one_line_and_write_nothing(base, tmp_path, capsys, flags, message):
    assert run_train(base, tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_bundled_lora_section_and_target_lists():
    cfg = parse_train_config(["--configs", "defaults", "stablelm-7b", "oasst-mix", "lora"])
    assert cfg.lora == LoraConfig(r=16, alpha=32.0, dropout=0.05, target_modules=TARGET_MODULES)
    assert cfg.lora_train_new_tokens and cfg.learning_rate == 2e-4 and cfg.gradient_checkpointing
    listed = parse_train_config(["--lora_r", "8", "--lora_target_modules", "[dense_4h_to_h, query_key_value]"])
    assert listed.lora.target_modules == ("query_key_value", "dense_4h_to_h")
    assert parse_train_config([]).lora is None  # full fine-tuning by default

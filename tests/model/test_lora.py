"""LoRA adapters and trained token rows on the model (gptneox.lora), and adapters in peft's format
(gptneox.adapter), against peft itself."""
from __future__ import annotations

import pytest
import torch
import transformers
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from gptneox import GPTNeoX
from gptneox.adapter import AdapterError, apply_adapter, load_adapter, save_adapter
from gptneox.lora import (TARGET_MODULES, LoraConfig, LoraLinear, add_lora, adapter_shapes, merged_weight,
                          parse_target_modules, token_adapter_ids)
from tests.helpers import random_model

NEW_TOKENS = [90, 93]  # rows of TINY_CONFIG's 96 that a tokenizer would have appended


def adapted(config=LoraConfig(r=4, alpha=8.0, target_modules=TARGET_MODULES), token_ids=NEW_TOKENS, seed=0):
    """A tiny model with adapters whose B is random (a fresh B is zero and would hide a wrong formula)."""
    model = random_model(seed)
    add_lora(model, config, token_ids)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def test_target_names_as_peft_spells_them():
    assert parse_target_modules("query_key_value") == ("query_key_value",)
    assert parse_target_modules("dense_4h_to_h, query_key_value") == ("query_key_value", "dense_4h_to_h")
    assert parse_target_modules(["all-linear"]) == TARGET_MODULES
    with pytest.raises(ValueError, match="'lm_head': GPT-NeoX's targets are query_key_value, dense, "
                                         "dense_h_to_4h, dense_4h_to_h or all-linear"):
        parse_target_modules("query_key_value,lm_head")


def test_a_fresh_adapter_changes_nothing_and_base_names_stay():
    base = random_model(0)
    model = random_model(0)
    add_lora(model, LoraConfig(r=4, alpha=8.0, target_modules=("query_key_value", "dense_h_to_4h")), NEW_TOKENS)
    ids = torch.randint(0, 96, (2, 12))
    ids[0, 3] = NEW_TOKENS[0]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), base(ids), rtol=0, atol=0)
    names = dict(model.named_parameters())
    assert set(base.state_dict()) <= set(names)  # every Hugging Face name is still there
    trained = sorted(n for n, p in names.items() if p.requires_grad)
    assert trained == sorted(adapter_shapes(base.config, LoraConfig(r=4, alpha=8.0, target_modules=(
        "query_key_value", "dense_h_to_4h")), NEW_TOKENS))
    assert "gpt_neox.layers.1.attention.query_key_value.lora_A.weight" in trained
    assert "gpt_neox.layers.1.attention.dense.lora_A.weight" not in trained
    assert {"gpt_neox.embed_in.token_adapter.trainable_tokens_delta",
            "embed_out.token_adapter.trainable_tokens_delta"} <= set(trained)
    assert isinstance(model.gpt_neox.layers[0].attention.query_key_value, LoraLinear)
    assert token_adapter_ids(model) == NEW_TOKENS


def test_forward_is_peft_arithmetic_and_merges_exactly():
    config = LoraConfig(r=4, alpha=6.0, target_modules=TARGET_MODULES)
    model = adapted(config)
    layer = model.gpt_neox.layers[0].mlp.dense_h_to_4h
    x = torch.randn(3, layer.in_features)
    expected = x @ layer.weight.T + layer.bias + (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * 6.0 / 4
    torch.testing.assert_close(layer(x), expected)
    # the whole model's logits equal those of a plain model with every adapter folded into its weights
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    merged = random_model(0)
    with torch.no_grad():
        for name, parameter in merged.named_parameters():
            parameter.copy_(merged_weight(name, parameter, adapters, config.scaling, NEW_TOKENS))
    ids = torch.tensor([[1, 90, 5, 93, 7, 90]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), model(ids), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(merged(ids), random_model(0)(ids), atol=1e-3)


def test_only_adapters_and_new_rows_get_gradients():
    model = adapted()
    ids = torch.tensor([[1, 90, 5, 6, 7, 8]])  # token 93 is not in the input: its input row gets zero
    model(ids).logsumexp(-1).sum().backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == parameter.requires_grad, name
    embed_rows = model.gpt_neox.embed_in.token_adapter.trainable_tokens_delta.grad
    assert embed_rows[0].abs().sum() > 0 and embed_rows[1].abs().sum() == 0
    assert model.embed_out.token_adapter.trainable_tokens_delta.grad.abs().sum(-1).min() > 0  # both logits used


def test_gradient_checkpointing_gives_the_same_adapter_gradients():
    grads = []
    for checkpointing in (False, True):
        model = adapted(LoraConfig(r=4, alpha=8.0, dropout=0.3, target_modules=TARGET_MODULES))
        model.train()
        model.gradient_checkpointing = checkpointing
        torch.manual_seed(5)  # the dropout masks; the recomputation must draw the same ones
        model(torch.tensor([[1, 90, 5, 93, 7, 8]])).logsumexp(-1).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


# ------------------------------------------------------------------ peft's format, both directions
def _hf_base(model: GPTNeoX, directory) -> transformers.GPTNeoXForCausalLM:
    model.save_pretrained(directory)
    return transformers.GPTNeoXForCausalLM.from_pretrained(directory).eval()


def test_our_adapter_loads_in_peft_with_our_logits(tmp_path):
    config = LoraConfig(r=4, alpha=8.0, dropout=0.1, target_modules=("query_key_value", "dense_4h_to_h"))
    model = adapted(config).eval()
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    save_adapter(tmp_path / "adapter", config, adapters, NEW_TOKENS, base_model="tiny-base")
    peft_model = PeftModel.from_pretrained(_hf_base(random_model(0), tmp_path / "base"), tmp_path / "adapter").eval()
    ids = torch.tensor([[1, 90, 5, 93, 7, 8], [3, 3, 93, 90, 2, 1]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, model(ids), rtol=1e-5, atol=1e-5)
    loaded, tensors, token_ids = load_adapter(tmp_path / "adapter")
    assert loaded == config and token_ids == NEW_TOKENS
    assert set(tensors) == set(adapters)


def test_an_adapter_peft_saved_applies_with_peft_logits(tmp_path):
    hf = _hf_base(random_model(0), tmp_path / "base")
    peft_config = PeftLoraConfig(r=4, lora_alpha=16, target_modules="all-linear",
                                 trainable_token_indices={"embed_in": NEW_TOKENS, "lm_head": NEW_TOKENS})
    peft_model = get_peft_model(hf, peft_config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
    peft_model.save_pretrained(tmp_path / "peft-adapter")
    ours = GPTNeoX.from_pretrained(tmp_path / "base").eval()
    assert apply_adapter(ours, tmp_path / "peft-adapter").target_modules == TARGET_MODULES
    ids = torch.tensor([[1, 90, 5, 93, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), peft_model.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_an_adapter_for_another_base_shape_is_refused_naming_both(tmp_path):
    config = LoraConfig(r=4, alpha=8.0)
    model = adapted(config, token_ids=[])
    save_adapter(tmp_path, config, {n: p for n, p in model.named_parameters() if p.requires_grad}, [], None)
    other = random_model(0, hidden_size=72)
    with pytest.raises(AdapterError, match=r"lora_A.weight has shape \[4, 48\], the base model's "
                                           r"gpt_neox.layers.0.attention.query_key_value.weight \[216, 72\] needs "
                                           r"\[4, 72\]: the adapter was trained on a base of another shape"):
        apply_adapter(other, tmp_path)
    with pytest.raises(AdapterError, match="does not have"):
        apply_adapter(random_model(0, num_hidden_layers=1), tmp_path)

"""LoRA: low-rank adapters on a frozen GPT-NeoX, plus trained rows for the tokens a tokenizer adds.

A targeted projection (Hugging Face names `query_key_value`, `dense`, `dense_h_to_4h`, `dense_4h_to_h`)
becomes a LoraLinear in place: its class changes, its `weight` and `bias` stay where they were (same names,
same tensors, frozen), and it gains `lora_A` [r, in] and `lora_B` [out, r] with peft's arithmetic:

    out = x @ W.T + b + lora_B(lora_A(dropout(x))) * alpha / r      A kaiming-uniform, B zeros

so a fresh adapter changes nothing, and the trainable names are peft's without its `base_model.model.`
prefix (`gpt_neox.layers.0.attention.query_key_value.lora_A.weight`).

The chat tokens that the tokenizer appends to a base vocabulary have rows the base never trained. With
token rows, `embed_in` and `embed_out` each gain a `token_adapter` whose `trainable_tokens_delta` holds the
trained values of those rows (peft's TrainableTokens keeps the rows' values under that name, not a
difference): the full [vocab, hidden] weights stay frozen, only a few rows are trained and saved.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptneox.model import GPTNeoX, LMHead

TARGET_MODULES = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
ALL_LINEAR = "all-linear"  # peft's spelling: every projection but the LM head
DEFAULT_TARGET_MODULES = ("query_key_value",)  # peft's default for GPT-NeoX


def parse_target_modules(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Module names from a comma list or a list, `all-linear` for all four, in TARGET_MODULES order;
    a name no GPT-NeoX module has is a ValueError naming the valid ones."""
    names = [str(n).strip() for n in (value.split(",") if isinstance(value, str) else value) if str(n).strip()]
    if ALL_LINEAR in names:
        return TARGET_MODULES
    unknown = [n for n in names if n not in TARGET_MODULES]
    if unknown or not names:
        raise ValueError(f"{', '.join(map(repr, unknown)) or 'no module'}: GPT-NeoX's targets are "
                         f"{', '.join(TARGET_MODULES)} or {ALL_LINEAR}")
    return tuple(n for n in TARGET_MODULES if n in names)


@dataclass(frozen=True)
class LoraConfig:
    r: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoraLinear(nn.Linear):
    """An nn.Linear with a low-rank update; made from an existing one by `adapt` (see the module docstring)."""

    lora_A: nn.Linear
    lora_B: nn.Linear

    @classmethod
    def adapt(cls, linear: nn.Linear, config: LoraConfig) -> "LoraLinear":
        """Turn `linear` into a LoraLinear in place: its parameters, names and hooks (ZeRO-3's) stay."""
        linear.__class__ = cls
        factory = {"dtype": linear.weight.dtype, "device": linear.weight.device}
        linear.scaling = config.scaling
        linear.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        linear.lora_A = nn.Linear(linear.in_features, config.r, bias=False, **factory)
        linear.lora_B = nn.Linear(config.r, linear.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(linear.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(linear.lora_B.weight)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


class TokenAdapter(nn.Module):
    """Trained values of some rows of a frozen [vocab, hidden] weight (embed_in's or embed_out's)."""

    def __init__(self, weight: torch.Tensor, token_ids: list[int]):
        super().__init__()
        ids = torch.tensor(token_ids, dtype=torch.long, device=weight.device)
        slots = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
        slots[ids] = torch.arange(len(ids), device=weight.device)
        self.register_buffer("token_indices", ids, persistent=False)
        self.register_buffer("slots", slots, persistent=False)  # row -> its trained row, -1 for the rest
        self.trainable_tokens_delta = nn.Parameter(weight.detach()[ids].clone())

    def forward(self, base: torch.Tensor, input_ids: torch.Tensor | None = None, head=None):
        """With input_ids: `base` is their embedding, where a trained token's row is replaced (no copy of
        the weight). Without: `base` is the frozen weight, returned with the trained rows in place (the LM
        head), or, with a `head` (a function of the weight, as LMHead takes), head(base, trained_rows=...):
        the training loss then computes the gradient of those rows only, not of the whole weight. The rows
        are read in this module's forward, where ZeRO-3 has gathered them."""
        rows = self.trainable_tokens_delta
        if head is not None:
            return head(base, trained_rows=(self.token_indices, rows))
        rows = rows.to(base.dtype)
        if input_ids is None:
            return base.index_copy(0, self.token_indices, rows)
        slot = self.slots[input_ids]
        return torch.where((slot >= 0)[..., None], rows[slot.clamp(min=0)], base)


class EmbeddingWithTokens(nn.Embedding):
    token_adapter: TokenAdapter

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.token_adapter(super().forward(input_ids), input_ids)


class LMHeadWithTokens(LMHead):
    """An LM head whose trained rows reach a `head` function as its `trained_rows` argument."""
    token_adapter: TokenAdapter

    def forward(self, x, head=None):
        if head is None:
            return F.linear(x, self.token_adapter(self.weight))
        return self.token_adapter(self.weight, head=functools.partial(head, x))


def add_lora(model: GPTNeoX, config: LoraConfig, token_ids: list[int] = ()) -> None:
    """Freeze `model` and add adapters to its targeted projections, and trained rows for `token_ids` to
    embed_in and embed_out (none when empty). Under ZeRO-3, call it with embed_in's and embed_out's weights
    gathered (the rows are copied from them); DeepSpeed partitions the new parameters itself."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if name.rpartition(".")[2] in config.target_modules and isinstance(module, nn.Linear):
            LoraLinear.adapt(module, config)
    if token_ids:
        if model.config.tie_word_embeddings:
            raise ValueError("trained token rows need separate input and output embeddings "
                             "(tie_word_embeddings is true)")
        for module, cls in ((model.gpt_neox.embed_in, EmbeddingWithTokens), (model.embed_out, LMHeadWithTokens)):
            module.__class__ = cls
            module.token_adapter = TokenAdapter(module.weight, list(token_ids))


def token_adapter_ids(model: GPTNeoX) -> list[int]:
    """The token ids whose rows `model` trains (add_lora's token_ids), [] without token rows."""
    adapter = getattr(model.gpt_neox.embed_in, "token_adapter", None)
    return [] if adapter is None else adapter.token_indices.tolist()


# ---------------------------------------------------------------- merging into plain weights
def is_adapter_name(name: str) -> bool:
    """Whether a parameter name is one add_lora created (an adapter or trained rows), not a base weight."""
    return ".lora_A." in name or ".lora_B." in name or name.endswith(".token_adapter.trainable_tokens_delta")


def adapter_names_of(base_name: str) -> tuple[str, ...]:
    """The adapter tensors that change base weight `base_name` when merged: (lora_A, lora_B) of a
    projection's weight, the trained rows of an embedding; () for the others."""
    module = base_name.removesuffix(".weight")
    if base_name in ("gpt_neox.embed_in.weight", "embed_out.weight"):
        return (f"{module}.token_adapter.trainable_tokens_delta",)
    if module.rpartition(".")[2] in TARGET_MODULES and base_name.endswith(".weight"):
        return f"{module}.lora_A.weight", f"{module}.lora_B.weight"
    return ()


@torch.no_grad()
def merged_weight(base_name: str, base: torch.Tensor, adapters: dict, scaling: float,
                  token_ids: list[int]) -> torch.Tensor:
    """Base weight `base_name` with its adapters from `adapters` (names as add_lora's) folded in, in fp32:
    W + scaling * B @ A, or the trained rows put in place. Weights without adapters come back as they are."""
    names = [n for n in adapter_names_of(base_name) if n in adapters]
    if not names:
        return base
    weight = base.float().clone()
    if len(names) == 2:
        a, b = (adapters[n].float() for n in names)
        return weight.addmm_(b, a, alpha=scaling)
    rows = adapters[names[0]].float()
    return weight.index_copy_(0, torch.tensor(token_ids, dtype=torch.long), rows)


def adapter_shapes(model_config, config: LoraConfig, token_ids: list[int]) -> dict[str, tuple[int, ...]]:
    """The names and shapes of the parameters add_lora trains on a GPTNeoX of `model_config` (from a
    meta-device model: no memory): what a LoRA checkpoint holds."""
    with torch.device("meta"):
        model = GPTNeoX(model_config)
        add_lora(model, config, token_ids)
    return {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}

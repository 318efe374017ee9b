"""Autoregressive decoding with a key/value cache: greedy or sampled, batched over left-padded prompts.

The prompt is run once (prefill) and fills the cache; every later step feeds only the newest token.
Batched prompts of different lengths are left-padded, so every row's next token sits in the same last
column; each row's position ids count only its real tokens (cumsum(mask) - 1, as Hugging Face does), so
a padded row computes exactly what it would alone.

Logits are processed in Hugging Face's order: repetition penalty, then temperature, top-k, top-p.
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from gptneox.errors import UserError


class GenerationError(UserError, ValueError):
    """A sampling setting that cannot be used, or a prompt that leaves no room for a reply."""


def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    stop_token_ids: Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Continue each prompt row; returns token ids [batch, prompt + new] (prompt columns unchanged).

    attention_mask [batch, prompt]: 1 = real token, 0 = left padding (None: no padding).
    do_sample=False picks the most likely token and ignores temperature, top_k and top_p;
    repetition_penalty (> 1 discourages) applies in both modes to every token already in the row.
    stop_token_ids: a row stops after emitting one of them (default: the config's eos; () never stops);
    later columns of a stopped row hold pad_token_id (default: the config's pad, else the first stop id).
    Decoding ends early once every row has stopped, so `new` may be less than max_new_tokens.
    max_new_tokens is clipped, with a warning, so the longest prompt plus its reply fits the context.
    generator or seed makes sampling reproducible. on_token(tokens [batch]) is called after every step,
    e.g. to stream text. use_cache=False recomputes the whole sequence every step (a slow reference).
    Runs under torch.inference_mode in eval mode and restores the model's training flag.
    """
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    _check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    input_ids, attention_mask = _check_prompt(input_ids, attention_mask)
    config = model.config
    longest = int(attention_mask.sum(dim=1).max())
    context = config.max_position_embeddings
    if longest >= context:
        raise GenerationError(f"prompt is {longest} tokens, but the model's context is {context} tokens "
                         "(prompt and reply together); shorten the prompt")
    if longest + max_new_tokens > context:
        warnings.warn(f"max_new_tokens={max_new_tokens} clipped to {context - longest}: the prompt is "
                      f"{longest} tokens and the context {context}", stacklevel=2)
        max_new_tokens = context - longest

    if stop_token_ids is None:
        stop_token_ids = () if config.eos_token_id is None else (config.eos_token_id,)
    if pad_token_id is None:
        pad_token_id = next(t for t in (config.pad_token_id, *stop_token_ids, 0) if t is not None)
    device = input_ids.device
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                    repetition_penalty=repetition_penalty, generator=generator)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return _decode(model, input_ids, attention_mask, max_new_tokens, sampling,
                           torch.tensor(list(stop_token_ids), dtype=torch.long, device=device),
                           pad_token_id, on_token, use_cache)
    finally:
        model.train(was_training)


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists of different lengths -> (input_ids, attention_mask) [batch, longest], padded on the left."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("left_pad needs at least one sequence, and every sequence needs at least one token")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
    for row, tokens in enumerate(sequences):
        input_ids[row, width - len(tokens):] = torch.tensor(list(tokens), dtype=torch.long)
        attention_mask[row, width - len(tokens):] = 1
    return input_ids, attention_mask


def seen_tokens(input_ids: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[batch, vocab] True where a real (mask 1) token of the row has that id. Counts are summed, not
    written: the pad id can also be a real token, and scatter_ with duplicate indices keeps an arbitrary
    write on CUDA."""
    counts = torch.zeros((input_ids.shape[0], vocab_size), dtype=torch.int32, device=input_ids.device)
    return counts.scatter_add_(1, input_ids, mask.int()) > 0


def _decode(model, input_ids, prompt_mask, max_new_tokens, sampling, stop_ids, pad_token_id, on_token, use_cache):
    batch, prompt_length = input_ids.shape
    total = prompt_length + max_new_tokens
    device = input_ids.device
    tokens = torch.full((batch, total), pad_token_id, dtype=torch.long, device=device)
    tokens[:, :prompt_length] = input_ids
    mask = torch.ones((batch, total), dtype=torch.long, device=device)
    mask[:, :prompt_length] = prompt_mask
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    has_padding = not bool(prompt_mask.all())
    cache = model.new_kv_cache(batch, total, device=device) if use_cache else None
    seen = None
    if sampling["repetition_penalty"] != 1.0:  # [batch, vocab] True where the token is already in the row
        seen = seen_tokens(input_ids, prompt_mask, model.config.vocab_size)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)

    length = prompt_length
    start = 0  # first column fed to the model this step
    for _ in range(max_new_tokens):
        hidden = model(tokens[:, start:length], position_ids=positions[:, start:length],
                       attention_mask=mask[:, :length] if has_padding else None,
                       kv_cache=cache, return_hidden=True)
        # the LM head only for the last position: prefill would otherwise project every prompt token
        logits = F.linear(hidden[:, -1], model.output_embedding).float()
        next_tokens = _next_token(logits, seen, **sampling)
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_token_id), next_tokens)
        tokens[:, length] = next_tokens
        if seen is not None:
            seen.scatter_(1, next_tokens[:, None], True)
        finished |= torch.isin(next_tokens, stop_ids)
        length += 1
        if use_cache:
            start = length - 1
        if on_token is not None:
            on_token(next_tokens)
        if bool(finished.all()):
            break
    return tokens[:, :length]


def _next_token(logits, seen, *, do_sample, temperature, top_k, top_p, repetition_penalty, generator):
    """Pick one token per row from fp32 logits [batch, vocab]."""
    logits = process_logits(logits, seen, do_sample=do_sample, temperature=temperature, top_k=top_k,
                            top_p=top_p, repetition_penalty=repetition_penalty)
    if not do_sample:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator).squeeze(1)


def process_logits(logits: torch.Tensor, seen: torch.Tensor | None, *, do_sample: bool, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0) -> torch.Tensor:
    """The logits [batch, vocab] that the next token is drawn from; excluded tokens get -inf.

    seen [batch, vocab] bool marks the tokens already in each row (for the repetition penalty).
    """
    if seen is not None and repetition_penalty != 1.0:
        # CTRL-style: move the logit of every seen token towards "less likely" whatever its sign
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if not do_sample:
        return logits
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the more likely tokens before it already reach top_p (the first always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def _check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature > 0:
        raise GenerationError(f"temperature must be > 0, got {temperature!r} (for greedy decoding: do_sample=False; --greedy in gptneox-chat)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise GenerationError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    if not repetition_penalty > 0:
        raise GenerationError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty!r}")


def _check_prompt(input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a [batch, prompt] tensor with at least one token, got {shape}; "
                         "see gptneox.generate.left_pad for lists of different lengths")
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                         f"{tuple(input_ids.shape)}")
    attention_mask = attention_mask.long()
    if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
        raise ValueError("attention_mask has padding after a real token; generation needs left padding "
                         "(padding first, then the prompt), e.g. from gptneox.generate.left_pad")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("attention_mask has a row with no real token")
    return input_ids, attention_mask

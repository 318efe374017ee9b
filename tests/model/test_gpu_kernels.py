"""The attention kernels of the training path on CUDA (make test-gpu): packed and padded rows, forward and
backward, in fp16 and bf16, against the fp32 eager reference. The CPU suite checks the same rules on the CPU
backends (test_attention.py); this is where torch's varlen kernel, compiled FlexAttention and flash-attn run."""
from __future__ import annotations

import pytest
import torch

from gptneox.attention import AttentionBackendError, AttentionMask, attend, check_backend, flex_compilations

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels need a CUDA GPU")]

B, T, H, D = 2, 300, 4, 128  # T on no kernel's block boundary, D as in StableLM-7B


def masks() -> dict[str, AttentionMask]:
    padding = torch.ones(B, T, dtype=torch.bool, device="cuda")
    padding[0, :37] = False  # left padding, as evaluation batches have
    segments = torch.cat([torch.full((n,), i, device="cuda") for i, n in enumerate((90, 150, 60))]).expand(B, T)
    return {"padded": AttentionMask(B, T, T, padding=padding),
            "packed": AttentionMask(B, T, T, segments=segments.contiguous())}


def run(backend: str, q, k, v, mask: AttentionMask) -> dict:
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attend(q, k, v, mask, backend)
    upstream = torch.linspace(-1, 1, out.numel(), device="cuda").view(out.shape)
    (out.float() * upstream).sum().backward()
    return {"out": out.float(), "dq": q.grad.float(), "dk": k.grad.float(), "dv": v.grad.float()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", ["padded", "packed"])
@pytest.mark.parametrize("backend", ["sdpa", "flex", "flash"])
def test_training_kernels_match_the_fp32_reference(backend, case, dtype):
    try:
        check_backend(backend, "cuda", dtype, training=True)
    except AttentionBackendError as err:
        pytest.skip(f"{backend} is not usable here: {err}")
    mask = masks()[case]
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", generator=generator) for _ in range(3))
    reference = run("eager", q, k, v, mask)
    half = [t.to(dtype) for t in (q, k, v)]
    eager_half, got = run("eager", *half, mask), run(backend, *half, mask)
    real = mask.padding if mask.padding is not None else torch.ones(B, T, dtype=torch.bool, device="cuda")
    for name in got:  # padded queries are no one's business: flash drops them, the others let them see themselves
        error = (got[name][real] - reference[name][real]).abs().max().item()
        bound = max(2 * (eager_half[name][real] - reference[name][real]).abs().max().item(),
                    2e-3 if dtype == torch.float16 else 1.6e-2)
        assert error <= bound, f"{backend} {case} {dtype} {name}: {error:.3g} > {bound:.3g}"


def test_flex_compiles_once_per_width_bucket():
    try:
        check_backend("flex", "cuda", torch.bfloat16, training=True)
    except AttentionBackendError as err:
        pytest.skip(str(err))
    before = flex_compilations()
    for length in (200, 230, 256):  # one bucket (256)
        q = torch.randn(1, length, H, D, device="cuda", dtype=torch.bfloat16)
        segments = (torch.arange(length, device="cuda") >= length // 2).long()[None]
        attend(q, q, q, AttentionMask(1, length, length, segments=segments), "flex")
    assert flex_compilations() == before + 1

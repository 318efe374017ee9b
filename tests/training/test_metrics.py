"""MFU peaks by exact GPU name and the per-record memory figures (reserved and allocated on CUDA)."""
import torch


def test_mfu_peak_matches_the_exact_gpu_name(monkeypatch):
    from gptneox.training import metrics
    for name, expected in (("NVIDIA H100 NVL", 835.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA L40", 181.0),
                           ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0), ("NVIDIA H200", 989.0)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert metrics.peak_tflops("bf16", None, "cuda") == (expected, f"data sheet for {name}")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3 (custom)")
    peak, source = metrics.peak_tflops("fp16", None, "cuda")
    assert peak == 0.0 and "unknown GPU" in source  # no guess from a near name
    assert metrics.peak_tflops("fp16", 123.0, "cuda") == (123.0, "peak_tflops key")


def test_peak_memory_on_cuda_reports_reserved_and_resets_the_window(monkeypatch):
    from gptneox import memory
    resets = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 4 * 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: resets.append(device))
    assert memory.peak_memory_record("cuda:0") == {"peak_memory_gb": 3.0, "peak_reserved_gb": 4.0}
    assert resets == [torch.device("cuda:0")]
    assert set(memory.peak_memory_record("cpu")) == {"peak_memory_gb"}

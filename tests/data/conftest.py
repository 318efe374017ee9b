"""Every data test sees an empty Hugging Face cache of its own, never this machine's."""
from __future__ import annotations

import pytest

HUB_VARIABLES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")


@pytest.fixture(autouse=True)
def isolated_hub_cache(tmp_path, monkeypatch):
    for variable in HUB_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

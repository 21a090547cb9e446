"""Shared test setup: deterministic seeds, few threads (CI has 2 cores), isolated cache."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed_and_isolate(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    torch.manual_seed(0)
    cache = tmp_path_factory.mktemp("binarize-cache")
    monkeypatch.setenv("BINARIZE_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield

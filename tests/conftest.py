"""Fixtures shared by several test modules."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (more threads only add contention); restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def scope_entries(monkeypatch):
    """The list of LRP scopes entered during the test (``LRPScope.__enter__`` counted; restored after)."""
    from lime_attr.scope import LRPScope

    entered = []
    original = LRPScope.__enter__

    def counting(self):
        entered.append(self)
        return original(self)

    monkeypatch.setattr(LRPScope, "__enter__", counting)
    return entered

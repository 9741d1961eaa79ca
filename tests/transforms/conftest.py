"""Transform tests run single-threaded: their tensors are tiny, and on an oversubscribed CI machine
(2 cores shared by several jobs) OpenMP's thread barriers made each small op ~100x slower."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

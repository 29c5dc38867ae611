"""Fixtures shared by the loader tests."""

import pytest
import torch
from shard_factory import write_test_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """24 records in shards of 10, 10 and 4 (see shard_factory.write_test_shards)."""
    return write_test_shards(tmp_path_factory.mktemp("shards"), num_records=24, per_shard=10)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: tiny models run ~100x slower with two OpenMP threads contending on a loaded 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

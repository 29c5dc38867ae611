"""Fixtures shared by the loader tests."""

import pytest
from shard_factory import write_test_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """24 records in shards of 10, 10 and 4 (see shard_factory.write_test_shards)."""
    return write_test_shards(tmp_path_factory.mktemp("shards"), num_records=24, per_shard=10)

"""Fixtures of the loopback tests: local and remote processes paired both ways."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.replication import MakePair, Pair


@pytest.fixture
def make_pair(tmp_path: Path) -> Iterator[MakePair]:
    """Builds a paired local + remote, the local reaching the remote through a fault
    proxy: `make_pair(size="32M", buffer_size="8M", local_extra=(), remote_extra=(),
    sparse=False)`.
    The first pair lives in tmp_path, later ones in subdirectories; all are stopped at
    teardown."""
    made: list[Pair] = []

    def make(*, size: str = "32M", buffer_size: str = "8M",
             local_extra: tuple[str, ...] = (), remote_extra: tuple[str, ...] = (),
             sparse: bool = False) -> Pair:
        where = tmp_path if not made else tmp_path / f"pair-{len(made)}"
        where.mkdir(exist_ok=True)
        pair = Pair(where, size=size, buffer_size=buffer_size, local_extra=local_extra,
                    remote_extra=remote_extra, sparse=sparse)
        made.append(pair)
        return pair

    yield make
    for pair in made:
        pair.close()

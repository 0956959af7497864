"""A process holding more than 1024 descriptors (FD_SETSIZE) still probes and queries:
select() cannot wait on a descriptor numbered 1024 or more, so nothing in core uses it
for sockets a busy process opens (a publisher with many subscribers, a daemon)."""

from __future__ import annotations

import os
import resource
import socket
from collections.abc import Iterator

import pytest
import zmq

from eda.core import discovery, mdns


@pytest.fixture
def many_fds() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1400
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.fail(f"the descriptor hard limit is {hard}: this test needs {want}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    assert max(held) >= 1024  # new sockets now get numbers select() cannot take
    try:
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_probe_works_with_descriptors_beyond_fd_setsize(many_fds: None) -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    with socket.create_server(("127.0.0.1", 0)) as silent:
        dead = silent.getsockname()[1]
    try:
        live, gone = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{dead}"
        assert discovery.probe([live, gone], timeout=10.0) == {live: True, gone: False}
    finally:
        router.close()
        ctx.term()


def test_a_one_shot_mdns_query_works_with_descriptors_beyond_fd_setsize(many_fds: None) -> None:
    # nobody answers in the test namespace: the query ends empty at its deadline,
    # instead of raising "filedescriptor out of range in select()"
    assert mdns.one_shot_query("_nobody._tcp.local.", timeout=0.3) == []

"""The run's store: on loopback only for a local run (not every interface, torch's default)."""

from __future__ import annotations

import datetime
import socket
from pathlib import Path

import pytest
import torch.distributed as dist

from planner.runtime.config import RunError
from planner.runtime.rendezvous import is_loopback, listening_addresses, loopback_store

linux = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net")


def _other_local_address() -> str | None:
    """An IPv4 address of this machine that is not loopback, or None."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
        addr: str = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


@linux
def test_torchs_own_store_listens_everywhere_ours_on_loopback() -> None:
    timeout = datetime.timedelta(seconds=10)
    theirs = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timeout)
    assert set(listening_addresses(theirs.port)) & {"0.0.0.0", "::"}  # why we bind ourselves
    ours = loopback_store(rank=0, world_size=1, addr="127.0.0.1", port=0, timeout_s=10)
    assert listening_addresses(ours.port) == ["127.0.0.1"]
    ours.set("k", "v")
    client = loopback_store(rank=1, world_size=1, addr="127.0.0.1", port=ours.port, timeout_s=10)
    assert client.get("k") == b"v"


@linux
def test_the_store_cannot_be_reached_from_another_address() -> None:
    other = _other_local_address()
    if other is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    store = loopback_store(rank=0, world_size=1, addr="127.0.0.1", port=0, timeout_s=10)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((other, store.port), timeout=5).close()
    socket.create_connection(("127.0.0.1", store.port), timeout=5).close()


def test_a_taken_port_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RunError, match=f"cannot listen on 127.0.0.1:{port}"):
            loopback_store(rank=0, world_size=1, addr="127.0.0.1", port=port, timeout_s=5)


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("192.0.2.7") and not is_loopback("no-such-host.invalid")


@linux
def test_rank_0_serves_on_the_socket_the_launcher_passed() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    store = loopback_store(
        rank=0, world_size=1, addr="127.0.0.1", port=port, timeout_s=10, listen_fd=listener.detach()
    )
    assert store.port == port and listening_addresses(port) == ["127.0.0.1"]
    store.set("k", "v")
    client = loopback_store(rank=1, world_size=1, addr="127.0.0.1", port=port, timeout_s=10)
    assert client.get("k") == b"v"


def test_a_passed_socket_that_does_not_listen_is_refused() -> None:
    with socket.socket() as idle:
        idle.bind(("127.0.0.1", 0))
        port = idle.getsockname()[1]
        with pytest.raises(RunError, match="is not a socket listening on loopback port"):
            loopback_store(
                rank=0,
                world_size=1,
                addr="127.0.0.1",
                port=port,
                timeout_s=5,
                listen_fd=idle.fileno(),
            )

"""Joining the run's process group, with a local run's store listening on loopback only.

torch's ``tcp://`` and ``env://`` rendezvous start the rank-0 :class:`torch.distributed.TCPStore`
on every interface (``::``), whatever ``MASTER_ADDR`` says: during a local run anyone who can
reach the machine could talk to the store. When ``MASTER_ADDR`` is a loopback address (``plan
run`` sets ``127.0.0.1``) rank 0 therefore binds the listening socket itself, to that address,
and hands it to the store (``master_listen_fd``); the other ranks connect as usual. ``plan run``
goes one step further: it binds the socket itself before starting the ranks and passes it to rank
0 (``PLANNER_STORE_FD``), so no other process can take the port in between. Under
torchrun the agent's store is used as is (``env://``); across machines (a routable
``MASTER_ADDR``) torch's own rendezvous is used, which needs rank 0 reachable from the others.

Example:
    >>> store = loopback_store(rank=0, world_size=1, addr="127.0.0.1", port=0, timeout_s=5)
    >>> listening_addresses(store.port)
    ['127.0.0.1']
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from pathlib import Path

import torch.distributed as dist

from planner.runtime.config import RunError

__all__ = [
    "STORE_FD_ENV",
    "is_loopback",
    "join_process_group",
    "listening_addresses",
    "loopback_store",
]

STORE_FD_ENV = "PLANNER_STORE_FD"
"""Environment variable naming the listening socket ``plan run`` passes to rank 0."""


def is_loopback(addr: str) -> bool:
    """Whether ``addr`` (an address or a host name) resolves to a loopback address only."""
    try:
        infos = socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def loopback_store(
    *,
    rank: int,
    world_size: int,
    addr: str,
    port: int,
    timeout_s: float,
    listen_fd: int | None = None,
) -> dist.TCPStore:
    """The run's store, rank 0's server listening on ``addr`` (a loopback address) only.

    Args:
        rank: This rank (0 serves the store).
        world_size: Ranks in the run.
        addr: The loopback address to listen on and connect to.
        port: The port (0 on rank 0: any free one).
        timeout_s: How long to wait for the others.
        listen_fd: Rank 0 only: a socket already listening on ``addr:port`` to serve on.

    Raises:
        RunError: Rank 0 cannot listen on ``addr:port`` (the port is taken), or ``listen_fd``
            is not a socket listening there.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    if rank != 0:
        return dist.TCPStore(addr, port, world_size, False, timeout=timeout)
    sock = _listener(addr, port, world_size) if listen_fd is None else _given(listen_fd, port)
    bound: int = sock.getsockname()[1]
    fd = sock.detach()  # the store owns the socket from here on
    try:
        return dist.TCPStore(addr, bound, world_size, True, timeout=timeout, master_listen_fd=fd)
    except BaseException:
        os.close(fd)
        raise


def _listener(addr: str, port: int, world_size: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(max(world_size, 128))
    except OSError as exc:
        sock.close()
        raise RunError(
            f"rank 0 cannot listen on {addr}:{port} ({exc.strerror}); another run may hold the "
            "port: set MASTER_PORT to a free one"
        ) from None
    return sock


def _given(fd: int, port: int) -> socket.socket:
    """The listening socket the launcher passed, checked to be on ``port`` and loopback."""
    try:
        sock = socket.socket(fileno=fd)
        host, bound = sock.getsockname()[:2]
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as exc:
        raise RunError(
            f"{STORE_FD_ENV}={fd} is not a socket ({exc.strerror}); unset it, or start the run "
            "with `plan run`"
        ) from None
    if not listening or bound != port or not ipaddress.ip_address(host).is_loopback:
        sock.detach()
        raise RunError(
            f"{STORE_FD_ENV}={fd} is not a socket listening on loopback port {port}; unset it, "
            "or start the run with `plan run`"
        )
    return sock


def join_process_group(
    backend: str,
    *,
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    timeout_s: float,
) -> None:
    """``dist.init_process_group`` for this rank (see the module docstring for the store)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun: the agent's store
        dist.init_process_group(
            backend, init_method="env://", rank=rank, world_size=world_size, timeout=timeout
        )
    elif is_loopback(master_addr):
        addr = str(socket.getaddrinfo(master_addr, None, type=socket.SOCK_STREAM)[0][4][0])
        given = os.environ.pop(STORE_FD_ENV, None)  # plan run's socket, rank 0's alone
        store = loopback_store(
            rank=rank,
            world_size=world_size,
            addr=addr,
            port=master_port,
            timeout_s=timeout_s,
            listen_fd=int(given) if given and given.isdigit() and rank == 0 else None,
        )
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timeout
        )
    else:
        dist.init_process_group(
            backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )


def listening_addresses(port: int) -> list[str]:
    """Local addresses with a TCP socket listening on ``port``, read from ``/proc/net/tcp*``.

    Linux only (an empty list elsewhere); ``0.0.0.0`` or ``::`` mean every interface.
    """
    found: list[str] = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            host, _, hex_port = local.partition(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(host)
            # the kernel prints each 32-bit word in host (little-endian) order
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))
            found.append(str(ipaddress.ip_address(words)))
    return found

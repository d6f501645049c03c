"""A TCP port for a rendezvous on this machine (torch.distributed's MASTER_PORT)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port free now on 127.0.0.1, as the kernel hands one out (it may be taken again before
    the rendezvous binds it: a local run's ranks start at once, so the window is short)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

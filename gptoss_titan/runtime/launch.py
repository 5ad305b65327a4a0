"""Pre-launch checks for scripts/run_train.sh and scripts/multinode_trainer.slurm.

  python -m gptoss_titan.runtime.launch --nproc N [--port P] [--host H]

Exit 2 with one line when N processes per node ask for more GPUs than this node has, or when
the rendezvous port is already taken by a listening socket (checked only where it will be opened:
the local host or the head node; connections of a crashed run left in TIME_WAIT do not count).
Prints nothing and exits 0 otherwise. scripts/run_train.sh runs the same checks inside its launcher
(runtime/launcher.py --preflight): `resolve_nproc` and `cpu_threads` replace its old torch probe.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket

from .cli import exit_now, run_cli
from .errors import UserError


class LaunchError(UserError):
    pass


def resolve_nproc(ngpu: str) -> int:
    """run_train.sh's NGPU: '' is the visible GPUs, else 1 CPU process; checked against the GPUs."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not ngpu.strip():
        return max(gpus, 1)
    try:
        n = int(ngpu)
    except ValueError:
        raise LaunchError(f"NGPU = {ngpu!r} is not a number of processes; set e.g. NGPU=2") from None
    check_nproc(n)
    return n


def cpu_threads(nproc: int) -> None:
    """On a CPU-only node, split the cores between the processes (OMP_NUM_THREADS, unless it is set),
    so that they do not oversubscribe; torchrun would give each process 1 thread."""
    import torch

    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(len(os.sched_getaffinity(0)) // nproc, 1))


def check_nproc(nproc: int) -> None:
    import torch

    if nproc < 1:
        raise LaunchError(f"NGPU = {nproc} must be >= 1")
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise LaunchError(
            f"NGPU = {nproc} but this node has {torch.cuda.device_count()} GPUs; set NGPU={torch.cuda.device_count()} "
            "or less (on CPU-only nodes NGPU is the number of processes)"
        )


def check_port(port: int, host: str = "") -> None:
    if not 0 < port < 65536:
        raise LaunchError(f"port {port} is not a TCP port; pick one in 1024-65535")
    with socket.socket() as s:
        # SO_REUSEADDR: a port whose last connections are in TIME_WAIT (a run that just crashed)
        # binds; only a socket that still listens makes the port busy. The rendezvous store binds
        # the same way.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise LaunchError(
                    f"rendezvous port {port} is in use on {host or 'this host'}; "
                    f"pick another, e.g. MASTER_PORT={port + 1} (RDZV_PORT under SLURM)"
                ) from None
            if e.errno != errno.EADDRNOTAVAIL:  # not an address of this host: checked on the head node
                raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, required=True)
    p.add_argument("--port", type=int)
    p.add_argument("--host", default="")
    a = p.parse_args(argv)

    def check() -> None:
        check_nproc(a.nproc)
        if a.port is not None:
            check_port(a.port, a.host)

    return run_cli(check)


if __name__ == "__main__":
    exit_now(main())

"""torchrun without its tracebacks: the workers' exit code reaches the shell (and SLURM).

  python -m gptoss_titan.runtime.launcher [--stop_grace S] [--preflight MODULE:FUNCTION] [--ngpu N]
      [torchrun's options] -m gptoss_titan.train [...]

--preflight calls FUNCTION with the workers' arguments before anything starts (run_train.sh: the
config check, gptoss_titan.config:check_before_launch) and checks a local rendezvous port; --ngpu
takes run_train.sh's NGPU ('': the visible GPUs, else 1 CPU process) as --nproc_per_node and gives
each CPU process nproc / NGPU threads. A bad value is one line and exit 2, as from the workers.

Takes torchrun's own options and runs its agent (torch.distributed.run's argument parser and
elastic_launch), but when a worker fails it prints at most one line and exits with the worker's
code instead of torchrun's ChildFailedError report and exit 1:

  0    every worker finished
  2    a worker reported bad input (its one line is above, from the worker)
  3    the run stopped itself (its one line is above, from the worker)
  1    a worker failed otherwise (a bug: its traceback is above; or a collective failed because
       another rank died: that rank's own line says so); one line names the rank
  128+N  the workers stopped on signal N at a step boundary and saved it (train/signals.py: their
         one line says where), or a worker died by signal N (SIGKILL: the kernel's out-of-memory
         killer, or kill -9: one line names the rank and the signal)

Stopping: SIGTERM or SIGINT to the launcher reach the workers through torchrun's agent, which
then waits --stop_grace seconds (default 30, torchrun's) before it kills them; the job's stop
signal (SIGUSR1 by default, job.stop_signal; SIGUSR2 too) is forwarded to the workers here, since the agent
does not handle it (unhandled, it would end the launcher at once).

The root cause decides: a worker's own code (2, 3, 128 + N) before a bug's exit code, before a
signal (a rank killed, e.g. by the out-of-memory killer; or by the agent after the grace), before a
collective that failed because a peer died (the worker marks it in torchrun's error file), before
SIGTERM (which the agent sends the other workers once one fails); then a rank whose output is
shown, the earliest, the lowest. scripts/run_train.sh
and scripts/multinode_trainer.slurm launch through this module; docs/failures.md has the table.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from .cli import error_line, exit_now
from .compat import torchrun
from .errors import UserError
from .launch import LaunchError, check_port, cpu_threads, resolve_nproc

OUR_CODES = (2, 3)  # runtime/cli.py: bad input, stopped by itself; and > 128: stopped on a signal


def reported(code: int) -> bool:
    """Whether a worker's exit code is one it explained in its own line."""
    return code in OUR_CODES or code > 128


def exit_code(failures: dict, shown: set[int] | None = None) -> tuple[int, str | None]:
    """(exit code, the line to print or None) for torchrun's failures: global rank -> ProcessFailure
    (exitcode: the worker's code, or -N for a signal; timestamp: when it was seen; error_file_data:
    the worker's own line, runtime/cli.py). shown: the local ranks whose output reaches the console
    (None: all); a worker's own line is repeated here when its rank's output is not shown."""

    def hidden(r: int) -> bool:
        return shown is not None and getattr(failures[r], "local_rank", 0) not in shown

    def rank_of(r: int) -> tuple:  # the cause first; among alike, a rank whose line was shown
        c = failures[r].exitcode
        data = getattr(failures[r], "error_file_data", None) or {}
        if reported(c):
            kind = 0
        elif c > 0:  # a bug (1 kind); a collective that failed because a peer died is a consequence
            kind = 3 if data.get("consequence") else 1
        else:  # a signal: SIGTERM is the agent stopping the others; SIGKILL may be its grace ending
            kind = 4 if c == -signal.SIGTERM else 2
        return kind, hidden(r), failures[r].timestamp, r

    rank = min(failures, key=rank_of)
    code = failures[rank].exitcode
    if reported(code):
        data = getattr(failures[rank], "error_file_data", None) or {}
        # said already: by this rank (shown), or by a shown rank that met the same error and was
        # stopped by the agent before its own exit code was seen
        said = not hidden(rank) or any(
            not hidden(r)
            and (getattr(f, "error_file_data", None) or {}).get("message") == data.get("message")
            for r, f in failures.items()
        )
        return code, (f"rank {rank}: {data['message']}" if not said and data.get("gptoss_titan") else None)
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        hint = " (the out-of-memory killer, or kill -9)" if -code == signal.SIGKILL else ""
        return (
            128 - code,
            f"rank {rank} (pid {failures[rank].pid}) died by {name}{hint}; the other ranks were stopped",
        )
    return (
        code,
        f"rank {rank} (pid {failures[rank].pid}) failed with exit code {code} (its output is above)",
    )


def _shown(local_ranks_filter: str) -> set[int] | None:
    """torchrun's --local-ranks-filter as a set (None: every rank's output is shown)."""
    if not local_ranks_filter:
        return None
    return {int(r) for r in local_ranks_filter.split(",") if r.strip()}


def _quiet_agent_logs() -> None:
    """torchrun's agent logs every worker it stops as a warning; failures are reported here."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _forward(signum: int) -> None:
    """Pass `signum` on to this process's children (the workers the agent started)."""

    def handler(sig: int, frame) -> None:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == os.getpid():  # the parent pid
                    try:
                        os.kill(int(entry), sig)
                    except OSError:
                        pass

    signal.signal(signum, handler)


def _is_local(host: str) -> bool:
    """Whether `host` is an address of this machine (binding to it works)."""
    try:
        with socket.create_server((host, 0)):
            return True
    except OSError:
        return False


def claim_port(endpoint: str):
    """An flock on the rendezvous port for the launcher's life, for a one-node launch whose endpoint
    is on this machine: a second launch on the same port is refused in one line at once, instead
    of joining the first one's rendezvous and waiting for its whole run. None: nothing to claim
    (another user's launch on the port is the pre-launch port check's case: its file is per user)."""
    host, _, port = endpoint.rpartition(":")
    if not port.isdigit() or not host or not _is_local(host.strip("[]")):
        return None
    path = Path(tempfile.gettempdir()) / f"gptoss-titan-port-{port}-uid{os.getuid()}.lock"
    try:
        f = open(path, "a+")
    except OSError:
        return None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(
            f"rendezvous port {port} is in use by another launch on this machine ({holder}); wait for "
            "it to end or pick another port (MASTER_PORT=... for run_train.sh, RDZV_PORT=... for SLURM)"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
    f.flush()
    return f


def preflight(spec: str | None, args: argparse.Namespace, ngpu: str | None) -> None:
    """run_train.sh's checks, in this process instead of three more (each importing torch): the
    workers' arguments by `spec` ('module:function', e.g. the config check), NGPU (resolved into
    --nproc_per_node, and the CPU threads per process) and a local rendezvous port."""
    if spec:
        module, _, name = spec.partition(":")
        getattr(importlib.import_module(module), name)(list(args.training_script_args))
    if ngpu is not None:
        args.nproc_per_node = str(resolve_nproc(ngpu))
        cpu_threads(int(args.nproc_per_node))
    host, _, port = (args.rdzv_endpoint or "").rpartition(":")
    if host in ("localhost", "127.0.0.1"):
        if not port.isdigit():
            raise LaunchError(
                f"rendezvous port {port!r} is not a TCP port; pick one in 1024-65535 (MASTER_PORT=...)"
            )
        check_port(int(port))


def main(argv: list[str] | None = None) -> int:
    run = torchrun()
    argv = sys.argv[1:] if argv is None else argv
    ours = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    ours.add_argument("--stop_grace", type=int, default=None)
    ours.add_argument("--preflight", default=None)  # module:function, called with the workers' arguments
    # NGPU as run_train.sh got it ('': the default); sets --nproc_per_node
    ours.add_argument("--ngpu", default=None)
    mine, rest = ours.parse_known_args(argv)
    args = run.parse_args(rest)
    try:
        if mine.preflight or mine.ngpu is not None:
            preflight(mine.preflight, args, mine.ngpu)
        config, cmd, cmd_args = run.config_from_args(args)
        # one node: several launchers of a multi-node job may share a host (and the endpoint)
        single = config.min_nodes == config.max_nodes == 1
        port_lock = claim_port(args.rdzv_endpoint or "") if single else None  # held until exit  # noqa: F841
    except UserError as e:
        error_line(e)
        return 2
    if mine.stop_grace is not None:
        config.shutdown_timeout = mine.stop_grace
    for signum in (signal.SIGUSR1, signal.SIGUSR2):  # job.stop_signal's choices the agent ignores
        _forward(signum)
    _quiet_agent_logs()
    try:
        run.elastic_launch(config=config, entrypoint=cmd)(*cmd_args)
    except run.ChildFailedError as e:
        code, line = exit_code(e.failures, _shown(args.local_ranks_filter))
        if line:
            error_line(line)
        return code
    except run.SignalException as e:  # SIGTERM/SIGINT/SIGHUP to the launcher: the workers were stopped
        error_line(
            f"the launcher received {signal.Signals(e.sigval).name}: its workers were asked to stop "
            "(their lines above say what they saved)"
        )
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    exit_now(main())

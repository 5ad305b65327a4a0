"""What import (convert.py) and export (export.py) share: the error they raise, the output folder
written under a temporary name and renamed when complete, and the Hugging Face file names."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import sys
import uuid
from pathlib import Path

from ..runtime.errors import UserError, write_reason

HF_CONFIG_FILE = "config.json"  # a Hugging Face folder's model config (not our checkpoint's CONFIG_FILE)
MXFP4_TENSORS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # stored as MXFP4 by the release


class ConvertError(UserError):
    """A user-caused conversion problem; the scripts print it as one line and exit 2."""


def parse_size(text: str) -> int:
    """Bytes of a size given as e.g. 5GB, 500MB, 2GiB or 1000."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for u, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(u) and t[: -len(u)].replace(".", "", 1).isdigit():
            return int(float(t[: -len(u)]) * mult)
    if t.isdigit():
        return int(t)
    raise ConvertError(f"--max-shard-size {text!r} is not a size; use e.g. 5GB or 500MB")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def remove_stale_temps(output: Path) -> list[Path]:
    """Remove the temporary folders of earlier conversions into `output` on this machine whose
    process is gone (a killed conversion leaves one behind: gigabytes at 20b); a live one's, and
    another machine's (shared storage: its process cannot be seen from here), are left alone."""
    pattern = re.compile(rf"\.{re.escape(output.name)}\.{re.escape(_host())}-(\d+)-[0-9a-f]+\.tmp")
    removed = []
    if output.parent.is_dir():
        for p in output.parent.iterdir():
            m = pattern.fullmatch(p.name)
            if m and p.is_dir() and not _alive(int(m.group(1))):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def temp_output(output: Path, overwrite: bool) -> Path:
    """A new temporary folder beside `output` to write into, named after this process (`output`
    itself must not exist unless overwrite); stale ones of killed conversions are removed first."""
    if output.exists() and not overwrite:
        raise ConvertError(f"output folder {str(output)!r} already exists; remove it or pass --overwrite")
    for p in remove_stale_temps(output):
        print(f"removed {p}, left by a conversion that was killed", file=sys.stderr)
    tmp = output.with_name(f".{output.name}.{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise ConvertError(
            f"cannot write beside {str(output)!r} ({write_reason(e, output.parent)}); choose another --output"
        ) from None
    return tmp


def publish(tmp: Path, output: Path) -> None:
    """Rename the complete temporary folder to `output`, replacing what was there."""
    if output.exists():
        shutil.rmtree(output)
    os.rename(tmp, output)


def write_failure(error: BaseException, output: Path) -> ConvertError | None:
    """The one-line form of a conversion that failed to write (a full disk, no permission), else
    None (a bug keeps its traceback)."""
    reason = write_reason(error, output.parent if output.parent.is_dir() else Path("."))
    if reason is None:
        return None
    return ConvertError(
        f"writing {str(output)!r} failed ({reason}); nothing was kept - free space or choose another --output"
    )


@contextlib.contextmanager
def output_folder(output: Path, overwrite: bool):
    """Write into a temporary folder beside `output` (temp_output) and publish it when the block
    ends; on any error remove it, and a failed write (write_failure) becomes one line."""
    tmp = temp_output(output, overwrite)
    try:
        yield tmp
        publish(tmp, output)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        failed = write_failure(e, output)
        if failed is None:
            raise
        raise failed from None

"""CheckpointManager: saves and loads the state dicts it is handed with DCP, in the background if
asked, and keeps the newest k. It knows nothing of what they hold (train/state.py does) nor when
to save (the trainer decides).

Layout (files.py): `<folder>/step-<N>/` holds the DCP files plus metadata files (the resolved
config and the model args). A save is written to `step-<N>.tmp/` and renamed to `step-<N>/` by
rank 0 only once DCP finished writing `.metadata` after every rank's shards: a crash mid-save
leaves a `.tmp` folder that resume ignores and retention removes.

Async saves (`async_mode = "async"`) stage the state into memory, return, and write in the
background on their own gloo process group: on the training group, the writer's gloo collectives
would interleave with training's and crash (measured with torch 2.13; docs/cpu_and_distributed.md).
A new save waits for the previous one; `close()` waits for the last. The group is created at the
first save or load, so a run without checkpoints creates none.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from ..config import Checkpoint as CkptConfig
from ..runtime.compat import pinned_memory_stager
from ..runtime.errors import root_cause, write_reason
from ..runtime.log import logger
from .files import checkpoint_keys, complete_steps, step_dir
from .integrity import IntegrityWriter


class CheckpointSaveError(RuntimeError):
    """A save failed (disk full, a write error); its step folder was removed, older ones are intact."""


def one_line(error: BaseException) -> str:
    """The root cause of an error in one line (DCP wraps each rank's exception with its traceback)."""
    error = root_cause(error)
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


class CheckpointManager:
    def __init__(
        self,
        folder: Path,
        cfg: CkptConfig,
        metadata: dict[str, dict],
        writer: Callable[[str], FileSystemWriter] = IntegrityWriter,
        stager: Callable[[], object] | None = None,
    ):
        """folder: where step-<N>/ go; metadata: file name -> JSON content written into every step;
        writer: path -> DCP storage writer (tests inject a slow one); stager: makes the stager of
        async_with_pinned_mem, once per run (default: pinned host memory, CUDA only)."""
        self.folder, self.cfg, self.metadata, self.writer = folder, cfg, metadata, writer
        pinned = cfg.async_mode == "async_with_pinned_mem"
        self.make_stager = stager or (pinned_memory_stager if pinned and torch.cuda.is_available() else None)
        self.distributed = dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self._pg = None
        self._stager = None
        self._future: Future | None = None
        self._finalized = threading.Event()
        self._finalized.set()
        self._failure: str | None = None
        self.last_saved = -1
        if pinned and self.make_stager is None:
            logger.info("checkpoint.async_mode = async_with_pinned_mem needs CUDA; using plain async on CPU")

    @property
    def pg(self):
        """The checkpoint's own gloo group (None on one process), created on first use."""
        if self.distributed and self._pg is None:
            self._pg = dist.new_group(backend="gloo")
        return self._pg

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank (a barrier too: every rank must call it)."""
        if not self.distributed:
            return flag
        t = torch.tensor(float(flag))
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.pg)
        return bool(t)

    # ----- saving ---------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until the save in flight (if any) is written and renamed into place; raise
        CheckpointSaveError if it failed (its step folder was removed, older ones are intact)."""
        if self._future is not None:
            try:
                self._future.result()
            except (Exception, CheckpointException):  # reported by _finalize, raised below
                pass
            self._future = None
        self._finalized.wait()
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise CheckpointSaveError(failure)

    def save(self, step: int, state: dict[str, dict], blocking: bool = False) -> None:
        """Write `state` (key -> state dict) as step-<step>, in the background unless blocking or
        async_mode is disabled; raise CheckpointSaveError (now or from a later wait()) if it fails."""
        self.wait()  # one save at a time (a failure of the previous one is raised here, on every rank)
        tmp = self.folder / f"step-{step}.tmp"
        t0 = time.perf_counter()
        self._finalized.clear()
        self.last_saved = step
        error = None
        if self.rank == 0:  # the folder and its metadata files (a full disk may fail here already)
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
                for name, content in self.metadata.items():
                    (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
            except OSError as e:
                error = e
        if self.any_rank(error is not None):  # every rank learns it, or the others would wait forever
            self._finalize(
                step, t0, error=error or OSError("the step folder could not be prepared on rank 0")
            )
            self.wait()
        writer = self.writer(str(tmp))
        try:
            if self.cfg.async_mode == "disabled":
                dcp.save(state, storage_writer=writer, process_group=self.pg, no_dist=not self.distributed)
                self._finalize(step, t0)
            else:
                future = dcp.async_save(
                    state,
                    storage_writer=writer,
                    process_group=self.pg,
                    no_dist=not self.distributed,
                    async_stager=self._pinned_stager(),
                )
                if not isinstance(future, Future):  # newer torch returns a response with the upload future
                    future = future.upload_completion
                future.add_done_callback(lambda f: self._finalize(step, t0, f))
                self._future = future
                logger.info(
                    f"checkpoint step {step}: staged in {time.perf_counter() - t0:.2f}s, writing in background"
                )
        except (Exception, CheckpointException) as e:  # disk full, a write error (DCP's is a BaseException)
            self._finalize(step, t0, error=e)
        if blocking or self.cfg.async_mode == "disabled":
            self.wait()  # raises CheckpointSaveError for a failed save (DCP fails it on every rank)

    def _pinned_stager(self):
        """One stager for the whole run, built at the first save (async_with_pinned_mem), else None:
        its pinned buffers are allocated once and reused by every save."""
        if self.cfg.async_mode != "async_with_pinned_mem" or self.make_stager is None:
            return None
        if self._stager is None:
            self._stager = self.make_stager()
        return self._stager

    def _finalize(
        self, step: int, t0: float, future: Future | None = None, error: Exception | None = None
    ) -> None:
        """Rename step-<N>.tmp into place (rank 0), or, when the save failed, remove it and keep the
        failure for `wait()` to raise."""
        try:
            error = error or (future.exception() if future is not None else None)
            if error is not None:
                if self.rank == 0:
                    shutil.rmtree(self.folder / f"step-{step}.tmp", ignore_errors=True)
                reason = write_reason(error, self.folder) or one_line(error)
                self._failure = f"checkpoint step {step} failed and was removed ({reason})"
                logger.info(self._failure)
                return
            if self.rank == 0:
                final = step_dir(self.folder, step)
                if final.exists():
                    _discard(final)
                os.replace(self.folder / f"step-{step}.tmp", final)
                self._retain(step)
                logger.info(f"checkpoint step {step} complete in {time.perf_counter() - t0:.2f}s: {final}")
        except Exception as e:  # in the async callback nobody else would see it
            self._failure = f"checkpoint step {step} could not be put in place ({one_line(e)})"
            logger.info(self._failure)
        finally:
            self._finalized.set()

    def last_intact(self) -> str:
        """The newest complete step folder, for messages."""
        steps = complete_steps(self.folder)
        return str(step_dir(self.folder, steps[-1])) if steps else "none (no checkpoint was saved)"

    def _retain(self, newest: int) -> None:
        """Keep the newest keep_latest_k complete checkpoints; drop abandoned .tmp folders. Only
        renames happen here (_discard): the files are deleted by a background thread, so a final
        save does not keep rank 0 deleting a large checkpoint (minutes on network storage) while
        the other ranks wait for it under the training timeout."""
        for p in [*self.folder.glob("step-*.tmp"), *self.folder.glob("step-*.discarded")]:
            _discard(p)
        k = self.cfg.keep_latest_k
        if k > 0:
            older = [s for s in complete_steps(self.folder) if s != newest]
            for s in older[: max(len(older) + 1 - k, 0)]:  # the newest always stays
                _discard(step_dir(self.folder, s))

    # ----- loading --------------------------------------------------------------------------
    @staticmethod
    def saved_keys(path: Path) -> set[str]:
        """The top-level keys a checkpoint holds (a one-line CheckpointError if unreadable)."""
        return checkpoint_keys(path)

    def load(self, path: Path, state: dict[str, dict]) -> float:
        """Fill `state` (key -> state dict, as the members' state_dict() gave them) in place from
        `path`, every rank its own shards; the seconds it took."""
        t0 = time.perf_counter()
        dcp.load(
            state,
            storage_reader=FileSystemReader(str(path)),
            process_group=self.pg,
            no_dist=not self.distributed,
        )
        return time.perf_counter() - t0

    def close(self) -> None:
        """Wait for the save in flight and free the stager and the group (a failure of that save was
        logged when it happened; the trainer raises it through wait() before closing)."""
        try:
            self.wait()
        except CheckpointSaveError:
            pass
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        if self._pg is not None:
            dist.destroy_process_group(self._pg)
            self._pg = None


def _discard(path: Path) -> threading.Thread:
    """Rename `path` out of the checkpoint listing (step-<N>.discarded: no resume sees it) and delete
    it in a background thread (not a daemon: a process that ends finishes the deletion first; a
    killed one leaves the folder for the next _retain). Returns the thread."""
    gone = path if path.name.endswith(".discarded") else path.with_name(path.name + ".discarded")
    if gone != path:
        if gone.exists():
            shutil.rmtree(gone, ignore_errors=True)
        os.replace(path, gone)
    thread = threading.Thread(
        target=shutil.rmtree, args=(gone,), kwargs={"ignore_errors": True}, name="discard"
    )
    thread.start()
    _DISCARDS.append(thread)
    return thread


_DISCARDS: list[threading.Thread] = []


def finish_discards() -> None:
    """Wait for the background deletions of old checkpoints (at the end of a run, after the
    process group is gone: no other rank waits for this one any more)."""
    while _DISCARDS:
        _DISCARDS.pop().join()

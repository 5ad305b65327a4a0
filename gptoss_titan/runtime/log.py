"""The package's logger (one line per event, prefixed with the rank) and a lap timer. Every layer
logs through this module; the trainer's metrics (metrics.jsonl, TensorBoard) are in train/metrics.py."""

from __future__ import annotations

import logging
import sys
import time

logger = logging.getLogger("gptoss_titan")


def init_logging(rank: int = 0) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[rank{rank}] %(asctime)s %(message)s", datefmt="%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


class Timer:
    """Seconds between calls of lap()."""

    def __init__(self) -> None:
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt

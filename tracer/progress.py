"""Progress bars and stage timings for long steps, quiet when logging is."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

logger = logging.getLogger("tracer")
T = TypeVar("T")


def progress(items: Iterable[T], desc: str, unit: str = "it") -> Iterator[T]:
    """A tqdm bar on stderr, shown only when INFO logging is on."""
    return iter(tqdm(items, desc=desc, unit=unit, leave=False, disable=not logger.isEnabledFor(logging.INFO)))


@contextmanager
def stage(name: str, timings: dict[str, float] | None = None):
    """Log a pipeline stage's start and duration; record the duration in `timings`."""
    logger.info("%s ...", name)
    start = time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    if timings is not None:
        timings[name] = timings.get(name, 0.0) + elapsed
    logger.info("%s: %.2f s", name, elapsed)
    if logger.isEnabledFor(logging.DEBUG):
        from tracer.memory import peak_rss_mb

        logger.debug("%s: peak RSS of this process so far %.0f MB", name, peak_rss_mb())

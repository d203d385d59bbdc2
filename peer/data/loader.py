"""The training loop's data source: batches read and collated by background threads, handed out in order.

Reading, hash-checking and decoding a batch happens on worker threads while the model trains on the
previous one, so the accelerator does not idle on I/O. At most ``queue_depth`` batches are in flight ahead
of the training loop (being built or waiting), which bounds memory; batches come out in exactly the order
of the assigned ids, whichever worker built them, because verification recomputes what each batch held.
A worker's exception (a shard that failed its hash, a bad record) is re-raised in the training loop at the
batch it concerns, after every earlier batch, and never lets a batch from a bad shard through.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from peer.data.reader import DatasetReader

log = logging.getLogger(__name__)

Collate = Callable[[list[dict[str, Any]]], Any]


class LoaderSettings(BaseSettings):
    """Loader tunables (``HIVEMARKET_LOADER_WORKERS=4`` etc.); explicit constructor arguments win."""

    model_config = SettingsConfigDict(env_prefix="HIVEMARKET_", frozen=True)

    loader_workers: int = Field(
        2, ge=1, description="Threads that read and collate batches (at most queue_depth are ever busy)."
    )
    loader_queue_depth: int = Field(
        4, ge=1, description="Batches in flight ahead of the training loop (built or being built)."
    )
    loader_shutdown_timeout: float = Field(
        10.0, gt=0, description="Seconds close() waits for each worker to finish the batch it is building."
    )


@dataclass(frozen=True)
class LoaderStats:
    """Throughput of the batches handed out so far; ``wait_share`` is the share of the training loop's wall
    time (since it first asked for a batch) that it spent blocked in the loader."""

    samples: int
    batches: int
    bytes: int  # bytes of shard records read for the batches handed out
    seconds: float
    samples_per_s: float
    bytes_per_s: float
    wait_seconds: float
    wait_share: float


def collate_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Default collate: tensor fields stacked (batch first), ints as int64, floats in torch's default
    dtype, text and bytes as lists."""
    batch: dict[str, Any] = {}
    for name, first in records[0].items():
        values = [r[name] for r in records]
        if isinstance(first, np.ndarray):
            batch[name] = torch.from_numpy(np.stack(values))
        elif isinstance(first, int):
            batch[name] = torch.tensor(values, dtype=torch.long)
        elif isinstance(first, float):
            batch[name] = torch.tensor(values, dtype=torch.get_default_dtype())
        else:
            batch[name] = values
    return batch


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(map_tensors(v, fn) for v in value)
    return value


@dataclass(frozen=True)
class _Built:
    batch: Any
    samples: int
    bytes: int


@dataclass(frozen=True)
class _Failed:
    error: BaseException


def _build(
    reader: DatasetReader, ids: list[int], batch_size: int, collate: Collate, pin: bool, k: int
) -> _Built:
    batch_ids = ids[k * batch_size : (k + 1) * batch_size]
    batch = collate(reader.read(batch_ids))
    if pin:
        batch = map_tensors(batch, torch.Tensor.pin_memory)
    return _Built(batch, len(batch_ids), reader.stored_bytes(batch_ids))


class _Pipeline:
    """What the workers share, kept apart from :class:`PrefetchLoader` so that a loader dropped without
    close() is still collected, and its finalizer stops the workers.

    Two conditions on one lock, so that taking a batch wakes one worker (a slot is free) and finishing one
    wakes only the training loop: on a few cores every needless wake-up is a GIL hand-off the training
    step pays for.
    """

    def __init__(self, build: Callable[[int], _Built], batches: int, depth: int, workers: int):
        self._build = build
        self._batches = batches
        self._depth = depth
        lock = threading.Lock()
        self._slot_free = threading.Condition(lock)
        self._batch_ready = threading.Condition(lock)
        self._ready: dict[int, _Built | _Failed] = {}
        self._next_claim = 0  # the next batch a worker builds
        self._next_take = 0  # the next batch the training loop takes
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"hivemarket-loader-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while True:
            with self._slot_free:
                while (
                    not self._closed
                    and self._next_claim < self._batches
                    and self._next_claim - self._next_take >= self._depth
                ):
                    self._slot_free.wait()
                if self._closed or self._next_claim >= self._batches:
                    return
                k = self._next_claim
                self._next_claim += 1
            try:
                item: _Built | _Failed = self._build(k)
            except BaseException as e:  # re-raised in the training loop at batch k
                item = _Failed(e)
            with self._batch_ready:
                if self._closed:
                    return
                self._ready[k] = item
                if k == self._next_take:
                    self._batch_ready.notify()

    def take(self) -> _Built:
        """The next batch in order; StopIteration when done or closed, or the error that batch raised."""
        with self._batch_ready:
            while self._next_take not in self._ready:
                if self._closed or self._next_take >= self._batches:
                    raise StopIteration
                self._batch_ready.wait()
            item = self._ready.pop(self._next_take)
            self._next_take += 1
            self._slot_free.notify()
        if isinstance(item, _Failed):
            raise item.error
        return item

    def close(self, timeout: float) -> None:
        with self._slot_free:
            self._closed = True
            self._ready.clear()
            self._slot_free.notify_all()
            self._batch_ready.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)
                if thread.is_alive():
                    log.warning(
                        "loader thread %s is still building a batch after %.1f s", thread.name, timeout
                    )


class PrefetchLoader:
    """Batches of ``ids`` (this peer's assignment, in training order) read by background workers.

    Iterate it (once) or call ``next``; use it as a context manager, or call :meth:`close`, to stop the
    workers when the loop ends early. On a CUDA ``device`` tensors are pinned by the workers and copied
    with ``non_blocking=True`` when handed out; with no device they stay on the CPU.
    """

    def __init__(
        self,
        reader: DatasetReader,
        ids: Sequence[int],
        batch_size: int,
        *,
        collate: Collate = collate_records,
        device: str | torch.device | None = None,
        workers: int | None = None,
        queue_depth: int | None = None,
        settings: LoaderSettings | None = None,
    ):
        settings = settings or LoaderSettings()
        workers = settings.loader_workers if workers is None else workers
        queue_depth = settings.loader_queue_depth if queue_depth is None else queue_depth
        if batch_size < 1 or workers < 1 or queue_depth < 1:
            raise ValueError(
                f"batch_size {batch_size}, workers {workers}, queue_depth {queue_depth} must be >= 1"
            )
        self._device = None if device is None else torch.device(device)
        if self._device is not None and self._device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self._device} was asked for but CUDA is not available")
        pin = self._device is not None and self._device.type == "cuda"
        ids = list(ids)
        self._batches = -(-len(ids) // batch_size)
        build = functools.partial(_build, reader, ids, batch_size, collate, pin)
        self._pipeline = _Pipeline(build, self._batches, queue_depth, workers)
        self._finalizer = weakref.finalize(self, self._pipeline.close, settings.loader_shutdown_timeout)
        self._samples = self._batch_count = self._bytes = 0
        self._wait = 0.0
        self._first_request: float | None = None
        self._ended: float | None = None

    def __len__(self) -> int:
        return self._batches

    def __iter__(self) -> PrefetchLoader:
        return self

    def __next__(self) -> Any:
        entered = time.perf_counter()
        if self._first_request is None:
            self._first_request = entered
        try:
            built = self._pipeline.take()
            batch = built.batch
            if self._device is not None:
                device = self._device
                batch = map_tensors(batch, lambda t: t.to(device, non_blocking=True))
        except BaseException:
            self.close()
            raise
        # Counted from entry to return: the queue wait plus the (asynchronous) copy's launch.
        self._wait += time.perf_counter() - entered
        self._samples += built.samples
        self._batch_count += 1
        self._bytes += built.bytes
        return batch

    def close(self) -> None:
        """Stop the workers and wait for them; idempotent."""
        if self._first_request is not None and self._ended is None:
            self._ended = time.perf_counter()
        self._finalizer()

    def __enter__(self) -> PrefetchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> LoaderStats:
        """Throughput and waiting so far (frozen once the loader is exhausted or closed)."""
        if self._first_request is None:
            return LoaderStats(0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0)
        seconds = (self._ended or time.perf_counter()) - self._first_request
        per_s = 1 / seconds if seconds > 0 else 0.0
        return LoaderStats(
            samples=self._samples,
            batches=self._batch_count,
            bytes=self._bytes,
            seconds=seconds,
            samples_per_s=self._samples * per_s,
            bytes_per_s=self._bytes * per_s,
            wait_seconds=self._wait,
            wait_share=min(1.0, self._wait / seconds) if seconds > 0 else 0.0,
        )

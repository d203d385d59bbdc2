"""The random-access reader and the prefetching loader on small datasets built in tmp_path."""

from __future__ import annotations

import gc
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from peer.data.loader import PrefetchLoader, collate_records
from peer.data.reader import DatasetReader
from peer.protocol.dataset import DatasetError, FieldSpec, Manifest, Schema, ShardWriter

pytestmark = pytest.mark.timeout(30)

SCHEMA = Schema(
    {
        "image": FieldSpec("tensor", "float32", (2, 3)),
        "sid": FieldSpec("int"),
        "label": FieldSpec("int"),
        "weight": FieldSpec("float"),
        "text": FieldSpec("text"),
    },
    label="label",
)


def image_of(sample_id: int) -> np.ndarray:
    return np.arange(6, dtype=np.float32).reshape(2, 3) + sample_id


def build(root: Path, samples: int = 200, shard_bytes: int = 2000) -> tuple[Manifest, DatasetReader]:
    writer = ShardWriter(root, SCHEMA, shard_bytes)
    for i in range(samples):
        writer.add({"image": image_of(i), "sid": i, "label": i % 10, "weight": i / 2, "text": f"t{i}"})
    manifest = writer.finish("test")
    return manifest, DatasetReader(manifest, lambda s: root / s.file)


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("hivemarket-loader")]


def flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    stat = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a clock too coarse still differs


def jittered(collate: Callable[[list[dict[str, Any]]], Any]) -> Callable[[list[dict[str, Any]]], Any]:
    """A collate whose batches finish in a random order across workers."""
    rng = random.Random(1)

    def slow(records: list[dict[str, Any]]) -> Any:
        time.sleep(rng.random() * 0.01)
        return collate(records)

    return slow


def test_reader_returns_records_in_the_asked_order_across_shards(tmp_path: Path) -> None:
    manifest, reader = build(tmp_path)
    assert len(manifest.shards) >= 4
    last = manifest.shards[-1]
    ids = [last.first_id, 0, 57, 58, 59, 3, 3, manifest.samples - 1, manifest.shards[1].first_id]
    records = reader.read(ids)
    assert [r["sid"] for r in records] == ids
    for sample_id, record in zip(ids, records, strict=True):
        np.testing.assert_array_equal(record["image"], image_of(sample_id))
        assert (record["label"], record["weight"], record["text"]) == (
            sample_id % 10,
            sample_id / 2,
            f"t{sample_id}",
        )
    assert reader.shards_for(ids) == [
        last,
        manifest.shards[0],
        next(s for s in manifest.shards if s.first_id <= 57 < s.first_id + s.samples),
        manifest.shards[1],
    ]
    with pytest.raises(DatasetError, match="outside"):
        reader.read([manifest.samples])


def test_loader_yields_the_assigned_ids_in_order_in_batches(tmp_path: Path) -> None:
    manifest, reader = build(tmp_path)
    ids = random.Random(0).sample(range(manifest.samples), 150)
    with PrefetchLoader(
        reader, ids, 16, collate=jittered(collate_records), workers=3, queue_depth=3
    ) as loader:
        batches = list(loader)
    assert len(batches) == len(loader) == 10
    assert [len(b["sid"]) for b in batches] == [16] * 9 + [6]
    assert torch.cat([b["sid"] for b in batches]).tolist() == ids
    first = batches[0]
    assert first["image"].dtype == torch.float32 and first["image"].shape == (16, 2, 3)
    assert first["label"].dtype == torch.int64 and first["sid"].dtype == torch.int64
    assert first["weight"].dtype == torch.get_default_dtype()
    expected = torch.from_numpy(np.stack([image_of(i) for i in ids[:16]]))
    assert torch.equal(first["image"], expected)
    assert first["label"].tolist() == [i % 10 for i in ids[:16]]
    assert first["text"] == [f"t{i}" for i in ids[:16]]
    assert not loader_threads()


def test_tampered_shard_stops_the_loader_before_any_of_its_samples(tmp_path: Path) -> None:
    manifest, reader = build(tmp_path)
    bad = manifest.shards[2]
    flip_byte(tmp_path / bad.file, bad.size // 2)
    yielded: list[int] = []
    loader = PrefetchLoader(reader, list(range(manifest.samples)), 8, workers=2, queue_depth=4)
    with pytest.raises(DatasetError, match=f"shard {bad.file} has SHA-256"):
        for batch in loader:
            yielded += batch["sid"].tolist()
    assert yielded == list(range(bad.first_id // 8 * 8)), "every batch before the bad shard, none after"
    assert not set(yielded) & set(range(bad.first_id, bad.first_id + bad.samples))
    assert not loader_threads()


def test_shard_tampered_after_its_check_is_checked_again(tmp_path: Path) -> None:
    manifest, reader = build(tmp_path)
    shard = manifest.shards[1]
    assert reader.read([shard.first_id])[0]["sid"] == shard.first_id
    flip_byte(tmp_path / shard.file, shard.size - 3)
    with pytest.raises(DatasetError, match=f"shard {shard.file}"):
        reader.read([shard.first_id])


@pytest.mark.parametrize(
    ("lie", "message"), [(1, "record .* is malformed, missing"), (-1, "holds more than")]
)
def test_manifest_lying_about_counts_is_refused(tmp_path: Path, lie: int, message: str) -> None:
    manifest, _ = build(tmp_path, samples=20, shard_bytes=1 << 20)
    (shard,) = manifest.shards
    lying = replace(manifest, shards=(replace(shard, samples=shard.samples + lie),))
    reader = DatasetReader(lying, lambda s: tmp_path / s.file)
    with pytest.raises(DatasetError, match=message):
        reader.read([0])


def test_missing_shard_is_a_dataset_error(tmp_path: Path) -> None:
    manifest, reader = build(tmp_path)
    (tmp_path / manifest.shards[0].file).unlink()
    with pytest.raises(DatasetError, match=f"shard {manifest.shards[0].file} is missing"):
        reader.read([0])


def test_queue_depth_bounds_the_batches_built_ahead(tmp_path: Path) -> None:
    _, reader = build(tmp_path)
    built: list[int] = []

    def counting(records: list[dict[str, Any]]) -> Any:
        built.append(records[0]["sid"])
        return collate_records(records)

    with PrefetchLoader(reader, list(range(100)), 5, collate=counting, workers=2, queue_depth=3) as loader:
        time.sleep(0.3)
        assert sorted(built) == [0, 5, 10], "three batches ahead, no more"
        assert next(loader)["sid"].tolist() == [0, 1, 2, 3, 4]
        deadline = time.monotonic() + 10
        while len(built) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        assert sorted(built) == [0, 5, 10, 15], "taking one batch frees one slot"


def test_early_break_close_and_drop_leave_no_worker_threads(tmp_path: Path) -> None:
    manifest, reader = build(tmp_path)
    ids = list(range(manifest.samples))
    with PrefetchLoader(reader, ids, 4, workers=2, queue_depth=2) as loader:
        assert len(loader_threads()) == 2
        for k, _ in enumerate(loader):
            if k == 2:
                break
    assert not loader_threads()

    loader = PrefetchLoader(reader, ids, 4, workers=2)
    next(loader)
    loader.close()
    assert not loader_threads()
    with pytest.raises(StopIteration):
        next(loader)

    PrefetchLoader(reader, ids, 4, workers=2)  # dropped unclosed: its finalizer stops the workers
    gc.collect()
    assert not loader_threads()


def test_worker_exception_surfaces_at_its_batch(tmp_path: Path) -> None:
    _, reader = build(tmp_path)

    def failing(records: list[dict[str, Any]]) -> Any:
        if any(r["sid"] == 50 for r in records):
            raise RuntimeError("collate failed on sample 50")
        return collate_records(records)

    seen: list[int] = []
    with pytest.raises(RuntimeError, match="collate failed on sample 50"):
        for batch in PrefetchLoader(reader, list(range(100)), 10, collate=failing, workers=2):
            seen += batch["sid"].tolist()
    assert seen == list(range(50))
    assert not loader_threads()


def test_stats_are_consistent(tmp_path: Path) -> None:
    manifest, reader = build(tmp_path)
    ids = list(range(manifest.samples))
    with PrefetchLoader(reader, ids, 32) as loader:
        for _ in loader:
            pass
        stats = loader.stats()
    assert (stats.samples, stats.batches) == (len(ids), len(loader))
    assert stats.bytes == sum(s.size for s in manifest.shards)  # every record of every shard, once
    assert 0 <= stats.wait_share <= 1 and 0 < stats.wait_seconds <= stats.seconds
    assert stats.samples_per_s == pytest.approx(stats.samples / stats.seconds)
    assert stats.bytes_per_s == pytest.approx(stats.bytes / stats.seconds)
    assert loader.stats() == stats, "frozen once exhausted"


def test_wait_share_tells_a_starved_loop_from_a_fed_one(tmp_path: Path) -> None:
    _, reader = build(tmp_path)

    def slow(records: list[dict[str, Any]]) -> Any:
        time.sleep(0.02)
        return collate_records(records)

    with PrefetchLoader(reader, list(range(80)), 10, collate=slow, workers=1) as starved:
        for _ in starved:
            pass
    assert starved.stats().wait_share > 0.8

    with PrefetchLoader(reader, list(range(80)), 10, workers=1, queue_depth=8) as fed:
        time.sleep(0.2)  # every batch is ready before the loop asks
        for _ in fed:
            time.sleep(0.02)
    assert fed.stats().wait_share < 0.2


def test_settings_come_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, reader = build(tmp_path)
    monkeypatch.setenv("HIVEMARKET_LOADER_WORKERS", "3")
    with PrefetchLoader(reader, list(range(10)), 2):
        assert len(loader_threads()) == 3
    with PrefetchLoader(reader, list(range(10)), 2, workers=1):
        assert len(loader_threads()) == 1


def test_cpu_device_and_unavailable_cuda(tmp_path: Path) -> None:
    _, reader = build(tmp_path)
    with PrefetchLoader(reader, [5, 6], 2, device="cpu") as loader:
        (batch,) = list(loader)
    assert batch["image"].device.type == "cpu" and not batch["image"].is_pinned()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            PrefetchLoader(reader, [5, 6], 2, device="cuda")
    assert not loader_threads()


def test_cuda_batches_are_pinned_by_workers_and_copied_without_blocking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No GPU here: CUDA's presence, pinning and the copy are stand-ins that record who called them."""
    _, reader = build(tmp_path)
    pinned: list[str] = []
    copied: list[tuple[Any, Any, str]] = []

    def fake_pin(t: torch.Tensor) -> torch.Tensor:
        pinned.append(threading.current_thread().name)
        return t

    def fake_to(t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        copied.append((args, kwargs, threading.current_thread().name))
        return t

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    with PrefetchLoader(reader, [1, 2, 3], 3, device="cuda") as loader:
        (batch,) = list(loader)
    assert batch["text"] == ["t1", "t2", "t3"]
    tensors = sum(isinstance(v, torch.Tensor) for v in batch.values())
    assert len(pinned) == tensors == 4 and all(name.startswith("hivemarket-loader") for name in pinned)
    main = threading.current_thread().name
    assert copied == [((torch.device("cuda"),), {"non_blocking": True}, main)] * tensors


def test_no_ids_no_batches(tmp_path: Path) -> None:
    _, reader = build(tmp_path)
    with PrefetchLoader(reader, [], 4) as loader:
        assert list(loader) == []
    assert loader.stats().samples == 0

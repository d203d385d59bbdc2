"""Held-out metrics of a finished run: the loss (and accuracy) on the dataset's test split of the model the
spec starts from and of the model the run produced, as ``launch`` and ``demo`` print them.

The test split is the ids no peer trains on (``peer.samples.test_ids``, every ``dataset.test_every``-th);
``launch`` fetches only the shards that hold them, checked against the manifest like a peer's, into this
machine's shard cache. Evaluating needs the task's packages (``hivemarket[hf]`` for the transformers
tasks) and, for an adaptation task, the base model's weights on this machine: without them there are no
figures, and ``launch`` says why instead.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from peer.data.fetch import ShardCache, fetch_shards
from peer.data.reader import DatasetReader
from peer.protocol.dataset import Manifest
from peer.protocol.spec import RunSpec


@dataclass(frozen=True)
class HeldOut:
    """The spec's starting model against the run's, on ``samples`` held-out samples."""

    samples: int
    initial_loss: float
    final_loss: float
    initial_accuracy: float
    accuracy: float

    def line(self, dataset: str) -> str:
        return (
            f"held-out  loss {self.initial_loss:.4f} -> {self.final_loss:.4f}, accuracy "
            f"{self.initial_accuracy:.1%} -> {self.accuracy:.1%} ({self.samples} samples of {dataset})"
        )


def evaluate(model_path: Path, spec: RunSpec, reader: DatasetReader) -> HeldOut:
    """The run's model file against the spec's starting model (its seed), on ``reader``'s test split."""
    import torch

    from peer.model_file import load_model_file
    from peer.samples import test_ids

    task, model, _ = load_model_file(model_path)
    ids = test_ids(reader.manifest.samples, spec.dataset.test_every).tolist()
    batch = task.batch(reader.read(ids))
    with torch.no_grad():
        initial = task.evaluate(task.build_model(spec.seed), batch)
        final = task.evaluate(model, batch)
    return HeldOut(len(ids), initial["loss"], final["loss"], initial["accuracy"], final["accuracy"])


def fetch_test_split(location: str, manifest: Manifest, test_every: int, cache_dir: Path) -> DatasetReader:
    """A reader of ``manifest``'s test split, its shards fetched (and checked) from ``location`` into the
    shard cache at ``cache_dir`` when they are not there already."""
    from peer.samples import test_ids

    cache = ShardCache(cache_dir)
    reader = DatasetReader(manifest, cache.final_path)
    wanted = reader.shards_for(test_ids(manifest.samples, test_every).tolist())
    asyncio.run(fetch_shards(location, manifest, wanted, cache))
    return reader

"""The rendezvous of a run's fast-path process group: a ``torch.distributed.Store`` backed by the
coordinator's signed API.

Why not torch's own ``TCPStore``: whoever can reach its port can read every member's address, write
any key and so join the group or break it; torch.distributed has no authentication of its own (torch's
SECURITY.md: trusted networks only). Through the coordinator, every write and read is a signed request
of a member of the run's current group version, a member writes only its own rank's keys, and the keys
of a version are gone once the next one forms (:mod:`coordinator.group_store`), so a stranger can
neither join a group nor replay an old rendezvous.

gloo's rendezvous uses ``set`` (each rank its address under ``<prefix>/<device>/<rank>``), ``wait`` and
``get`` of the others' keys; values fetched by ``wait`` are kept, so each key costs one request.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import torch.distributed as dist

from peer.protocol.client import CoordinatorClient

T = TypeVar("T")
#: The longest one request waits at the coordinator for keys that are not there yet (the API's cap).
LONG_POLL_MS = 2000


class CoordinatorStore(dist.Store):
    """The keys of one group version of one run, through ``client`` on the loop that ``call`` runs
    coroutines on (``RunLink.call``). Every wait ends by ``deadline`` seconds after the store is made:
    a member that never comes fails the group's build instead of hanging it."""

    def __init__(
        self,
        client: CoordinatorClient,
        call: Callable[[Callable[[], Coroutine[Any, Any, T]]], T],
        run_id: str,
        version: int,
        deadline: float,
    ):
        super().__init__()
        self._client = client
        self._call = call
        self._run_id = run_id
        self._version = version
        self._ends = time.monotonic() + deadline
        self._values: dict[str, bytes] = {}

    def set(self, key: str, value: bytes | str) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)
        self._call(lambda: self._client.rendezvous_set(self._run_id, self._version, key, data))
        self._values[key] = data

    def get(self, key: str) -> bytes:
        self.wait([key])
        return self._values[key]

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        ends = self._ends if timeout is None else min(self._ends, time.monotonic() + timeout.total_seconds())
        missing = [k for k in keys if k not in self._values]
        while missing:
            left = ends - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"group version {self._version} of run {self._run_id}: keys {missing} were not written "
                    "in time (a member did not come)"
                )
            wait_ms = int(min(LONG_POLL_MS, left * 1000))
            found = self._call(
                lambda keys=missing, ms=wait_ms: self._client.rendezvous_get(
                    self._run_id, self._version, keys, ms
                )
            )
            self._values.update(found)
            missing = [k for k in missing if k not in self._values]

    def check(self, keys: list[str]) -> bool:
        missing = [k for k in keys if k not in self._values]
        if missing:
            found = self._call(lambda: self._client.rendezvous_get(self._run_id, self._version, missing, 0))
            self._values.update(found)
        return all(k in self._values for k in keys)

    def set_timeout(self, timeout: datetime.timedelta) -> None:
        self._ends = min(self._ends, time.monotonic() + timeout.total_seconds())

    def add(self, key: str, amount: int) -> int:
        raise NotImplementedError(f"the run's rendezvous keeps no counters (add {key!r})")

    def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        raise NotImplementedError(f"the run's rendezvous has no compare-and-set ({key!r})")

    def delete_key(self, key: str) -> bool:
        raise NotImplementedError(f"keys of the run's rendezvous go with their version ({key!r})")

    def num_keys(self) -> int:
        return len(self._values)

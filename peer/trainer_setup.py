"""Setting a trainer up for its run (steps 1 to 3 of :mod:`peer.trainer`): the spec and its task, the
model and its optimizers (:func:`make_optimizer`, which benches and tests use to build the optimizer a
spec names), the validator, the run's dataset and the shards this peer needs, then the run's DHT, the
averager and the join at the coordinator.

:class:`SetupMixin` is a part of :class:`peer.trainer.Trainer`, kept apart because setting up is read on
its own: its methods use the attributes that ``Trainer.__init__`` sets, and the methods of the Trainer's
other parts (:mod:`peer.trainer_state` for the state a joining peer loads).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence

import torch
from hivemind.utils import get_logger

from peer.averaging import RunAverager
from peer.collective import FastPath
from peer.data.fetch import FetchSettings, ShardCache, fetch_manifest, fetch_shards
from peer.data.reader import DatasetReader
from peer.deadlines import RoundDeadlines
from peer.events import AGREEMENT_TOLERANCE
from peer.hardware import BF16_MIN_CAPABILITY
from peer.node import NodeError, follow_clock, is_relayed, relayed_maddrs, start_dht
from peer.p2p_key import peer_id_of, write_p2p_key
from peer.protocol.dataset import DatasetError, ShardInfo
from peer.protocol.run_schemas import GroupView, RunView
from peer.protocol.spec import RunSpec, SpecError, validate_spec
from peer.reachability import Reachability, check
from peer.run_link import live_peers
from peer.samples import SampleStream
from peer.sketch import EpochSketchers
from peer.tasks import TaskError, load_task, trained_parameters
from peer.trainer_exit import EXIT_REFUSED, EXIT_RETRY, TrainerExit
from peer.validator import Snapshots, Validator

logger = get_logger(__name__)


def direct_host(maddrs: Sequence[str]) -> str | None:
    """The IPv4 address of the first of this peer's multiaddrs that names one (the others connect to it),
    or None (no multiaddr with a concrete IPv4 address of its own: a node behind a NAT, dialed through
    relays, or a client-mode one)."""
    for maddr in maddrs:
        if is_relayed(maddr):
            continue
        parts = str(maddr).split("/")
        if len(parts) > 2 and parts[1] == "ip4" and parts[2] != "0.0.0.0":
            return parts[2]
    return None


def training_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """What a trainer computes its micro-batches in: bfloat16 autocast where the spec asks for bf16 and
    the device computes it natively (a CUDA GPU of compute capability 8.0+; older GPUs emulate it, and
    CPUs without bfloat16 units run it slower than float32), else None: float32."""
    if precision != "bf16" or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= BF16_MIN_CAPABILITY else None


def make_optimizer(spec: RunSpec, params: Sequence[torch.nn.Parameter]) -> torch.optim.Optimizer:
    o = spec.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)


class SetupMixin:
    """A :class:`peer.trainer.Trainer`'s set-up: :meth:`prepare` before anything else, :meth:`connect` once
    the run's spec, model and dataset are ready."""

    def prepare(self) -> RunView:
        view = self.link.view()
        if view is None:
            raise TrainerExit(EXIT_RETRY, "the coordinator is unreachable")
        try:
            self.spec = validate_spec(view.spec)
            self.task = load_task(self.spec.task, dict(self.spec.options))
        except (SpecError, TaskError) as e:  # the worker then gives the place back
            raise TrainerExit(EXIT_REFUSED, f"refusing run {self.run_id}: {e}") from None
        self.target = view.target_samples
        self.total_epochs = math.ceil(self.target / self.spec.batch.target)
        self.model = self.task.build_model(self.spec.seed).to(self.device)
        self.autocast = training_autocast(self.spec.precision, self.device)
        self.params = trained_parameters(self.model)
        self.optimizer = make_optimizer(self.spec, self.params)
        self.optimizers = [self.optimizer]
        self.outer: torch.optim.Optimizer | None = None
        if self.spec.averaging.local_updates:
            a = self.spec.averaging
            self.outer = torch.optim.SGD(self.params, lr=a.outer_lr, momentum=a.outer_momentum, nesterov=True)
            self.optimizers.append(self.outer)
        # What is averaged lives on the CPU (hivemind shares it with its averager process); gradients are
        # summed on the training device and copied over once an epoch.
        self.buffers = [torch.zeros_like(p, device="cpu") for p in self.params]
        self.sums = [torch.zeros_like(p) for p in self.params]
        self.data_wait = 0.0  # seconds this epoch's training waited for its batches (the event log's data_s)
        self.audit_seconds = 0.0  # seconds recomputing audits since the last epoch began ...
        self.epoch_audit_s = 0.0  # ... and before this one (the event log's audit_s)
        self.load_wait = 0.0  # seconds this epoch waited for the state of peers further on (load_s)
        self.n_params = sum(p.numel() for p in self.params)
        self.sketchers = EpochSketchers(self.n_params, self.run_id)  # the epochs' gradient sketches
        self.n_model_params = sum(p.numel() for p in self.model.parameters())  # frozen ones too
        self._open_dataset()
        if self.spec.verification.rate > 0:
            self.snapshots = Snapshots(self.settings.audit_window)
            self.validator = Validator(
                self.run_id,
                self.task,
                self.task.build_model(self.spec.seed).to(self.device),
                self.reader,
                self.snapshots,
                agreement=AGREEMENT_TOLERANCE[self.spec.averaging.compression],
                fetch=lambda ids: self._fetch(self.reader.shards_for(ids)),
                device=self.device,
            )
        return view

    def _open_dataset(self) -> None:
        location = self.spec.dataset.location
        if location == "coordinator":
            location = self.link.client.base_url
        self.location = location
        fetch_settings = FetchSettings()
        self.cache = ShardCache(fetch_settings.cache_root)
        try:
            self.manifest = asyncio.run(
                fetch_manifest(location, self.spec.dataset.version, fetch_settings, self.cache)
            )
        except DatasetError as e:
            raise TrainerExit(EXIT_RETRY, f"dataset {self.spec.dataset.version[:12]}: {e}") from None
        self.reader = DatasetReader(self.manifest, self.cache.final_path)
        self.stream = SampleStream(
            self.manifest,
            self.spec.seed,
            self.spec.dataset.test_every,
            self.spec.batch.per_peer,
            self.identity.account,
        )

    def _fetch_shards(self) -> None:
        self._fetch([self.manifest.shards[i] for i in self.stream.shards])

    def _fetch(self, wanted: Sequence[ShardInfo]) -> None:
        missing = [s for s in wanted if self.cache.path(s) is None]
        if missing:
            try:
                asyncio.run(fetch_shards(self.location, self.manifest, missing, self.cache))
            except DatasetError as e:
                raise TrainerExit(EXIT_RETRY, f"dataset {self.manifest.version[:12]}: {e}") from None

    def connect(self, view: RunView) -> RunView:
        """Start the run's DHT from the peers that joined before this one, then join at the coordinator.

        The run's DHT grows from one seed: the first peer in match order that others can dial starts
        alone, and every other peer waits for a joined peer it can dial. A peer behind a NAT never seeds
        (nobody could bootstrap from it): it first tells the run it is there (a join without addresses,
        so that the next peer in match order seeds instead of waiting for it), then waits for a peer it
        can dial and joins the DHT in client mode, with the peers it bootstrapped from as its relays."""
        key = self.workdir / "p2p.key"
        write_p2p_key(key, replace=True)  # a restarted trainer is a new peer of the run's swarm
        reach = self._reachability()
        behind_nat = reach is not None and not reach.reachable
        if behind_nat:
            assert reach is not None
            logger.warning(f"Other peers cannot dial this one ({reach.reason}): it trains through relays")
        present = False  # a peer behind a NAT told the run it is there
        deadline = time.monotonic() + self.settings.bootstrap_wait
        while True:
            live = live_peers(view)
            mine = [i for i, p in enumerate(live) if p.account == self.identity.account]
            if not mine:
                raise TrainerExit(EXIT_REFUSED, f"this peer is not (or no longer) matched to {self.run_id}")
            direct = {p.account: [m for m in p.maddrs if not is_relayed(m)] for p in live if p.joined}
            bootstrap = [m for account, ms in direct.items() if account != self.identity.account for m in ms]
            # every peer before this one in match order is behind a NAT and said so: this one seeds
            seeds = not behind_nat and all(direct.get(p.account) == [] for p in live[: mine[0]])
            if bootstrap or seeds:
                break
            if behind_nat and not present:
                view, present = self.link.join(peer_id_of(key), []), True
                continue
            if time.monotonic() > deadline or self.stop.is_set():
                raise TrainerExit(EXIT_RETRY, "no peer of the run that this one can dial joined")
            self.stop.wait(self.settings.run_poll_interval)
            view = self.link.view() or view
        if self.link.client.clock.offset is not None:  # the run's peers share the coordinator's clock
            follow_clock(self.link.client.clock.offset)
        try:
            self.dht, _ = start_dht(
                self.settings,
                initial_peers=bootstrap,
                listen=self.listen,
                announce=self.announce,
                key=key,
                reachable=None if reach is None else reach.reachable,
            )
        except NodeError as e:
            raise TrainerExit(EXIT_RETRY, f"the run's DHT did not start: {e}") from None
        if behind_nat:  # never its private addresses: nobody could dial them
            maddrs = relayed_maddrs(bootstrap, str(self.dht.peer_id))
        else:
            maddrs = [str(m) for m in self.dht.get_visible_maddrs()]
        self.averager = RunAverager(
            self.buffers,
            self.dht,
            prefix=f"{self.run_id}_grads",
            share_state=self._share_state,
            max_peers=max(view.peers_max, 2),
            matchmaking_seconds=self.spec.averaging.matchmaking_seconds,
            deadlines=RoundDeadlines(
                ceiling=self.spec.averaging.timeout_seconds,
                floor=self.settings.chunk_deadline_floor,
                factor=self.settings.chunk_deadline_factor,
            ),
            compression_name=self.spec.averaging.compression,
        )
        view = self.link.join(str(self.dht.peer_id), maddrs)
        logger.info(
            f"Joined run {self.run_id} as {self.dht.peer_id} ({len(bootstrap)} bootstrap addresses), "
            f"dialed at {', '.join(maddrs)}"
        )
        group = self._offer_fast_path(maddrs)
        others = [p for p in live_peers(view) if p.joined and p.account != self.identity.account]
        underway = len(others) >= view.peers_min  # they train without this peer (not waiting for it)
        # On the fast path every version formed after this check-in names this peer (also when the answer
        # is a version still settling a failure), so there is no round to miss, and its members wait for
        # this peer: waiting here for an epoch they cannot end without it stalled them all (seen in CI: 60
        # s, a member killed as a third peer joined). On hivemind's, a round formed before the join would go
        # on without it.
        if underway and not (self.fast is not None and group is not None and group.path == "fast"):
            view = self._next_epoch(view)
        self._initial_state(bool(bootstrap))
        self.late = underway  # at a run's start the peers begin epoch 0 together: nobody is late
        return view

    def _reachability(self) -> Reachability | None:
        """Whether other peers can dial this one: announced addresses are taken at their word, else the
        coordinator dials this host back (:mod:`peer.reachability`)."""
        if self.announce:
            return Reachability(True, "--announce")
        return self.link.call(lambda: check(self.link.client, self.listen, self.settings.reachability))

    def _offer_fast_path(self, maddrs: Sequence[str]) -> GroupView | None:
        """Open this peer's reach address for the fast path (:mod:`peer.collective`), unless the run or
        this peer keeps to hivemind's path or the peer has no direct address (client mode, say), and check
        in with the coordinator either way: a member without an address keeps the whole run on hivemind's
        path. The group the coordinator answers with, or None."""
        host = direct_host(maddrs)
        if self.spec.averaging.path != "auto" or not self.settings.fast_path or host is None:
            logger.info("This peer averages on hivemind's path (no fast-path address offered)")
            return self._check_in()
        self.fast = FastPath(
            run_id=self.run_id,
            identity=self.identity,
            client=self.link.client,
            call=self.link.call,
            host=host,
            n_params=self.n_params,
            precision="fp32" if self.spec.averaging.compression == "none" else "fp16",
            deadlines=RoundDeadlines(
                ceiling=self.spec.averaging.timeout_seconds,
                floor=self.settings.chunk_deadline_floor,
                factor=self.settings.chunk_deadline_factor,
            ),
            reach_timeout=self.settings.reach_timeout,
            regroup_timeout=self.settings.regroup_timeout,
        )
        self.fast.tamper = self.behaviour.tamper
        return self._check_in()

    def _next_epoch(self, view: RunView) -> RunView:
        """Wait (at most ``state_load_timeout``) until an epoch that began before this peer joined has
        been reported (the run's first epoch too: ``view.epoch`` counts reported epochs). The peers
        training it did not know of this peer and formed its round without waiting for it; a peer that
        joined then loaded its state would train it, find that round gone, and wait the whole step
        deadline for nothing (measured: 15 s). Every epoch that begins after the join expects this peer,
        so the state loaded once that epoch begins leads to a round it makes."""
        deadline = time.monotonic() + self.settings.state_load_timeout
        joined_at = view.epoch
        while view.epoch <= joined_at and time.monotonic() < deadline and not self.stop.is_set():
            self.stop.wait(min(self.settings.run_poll_interval, 0.2))
            view = self.link.view() or view
        return view

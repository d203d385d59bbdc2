"""``hivemarket demo``: the whole product on one machine, in one command.

It starts a coordinator (SQLite in a temporary folder) serving the digits dataset, deposits demo funds for
a researcher, starts N peers that rent out this machine (``hivemarket rent``, each in its own process
group), and, with ``--adversaries``, one cheating peer of each kind named (:mod:`peer.adversary`);
launches ``examples/digits.toml`` on them, kills one honest peer with SIGKILL mid-run, follows the run
to its end, evaluates the model it produced on the held-out digits, and prints the settled ledger and
what each cheat was paid. Every process it started is stopped (and, if needed, killed with its
children) before it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any, TypeVar

import click
import psutil

from peer.console import print_table
from peer.events import read_events
from peer.node import reap
from peer.protocol.client import CoordinatorClient
from peer.protocol.identity import Identity, save_identity
from peer.protocol.money import PLACES
from peer.protocol.run_schemas import AuditView, ReportView, RunBody, RunPeerView, RunView
from peer.settings import AdversaryKind, load_settings

T = TypeVar("T")
DEMO_FUNDS = "100"
BUDGET = "20"
BID_OVER_ASKS = Decimal("1.5")  # the launcher bids this much above the dearest offer's effective price
DROP_AT = 0.4  # the share of the run's samples after which one peer is killed
#: A report the killed peer sent just before the kill may be accepted just after it (seen: 0.000044 paid
#: for one); only reports accepted later than this after the kill count as paid after the drop.
IN_FLIGHT = 2.0
SPEC = "digits.toml"


class DemoError(click.ClickException):
    """Something in the demo did not happen in time; the message says what and where the logs are."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path
    tree: list[psutil.Process] = field(default_factory=list)

    def remember_tree(self) -> None:
        """Note the process and its descendants while they run (children of a killed parent move)."""
        try:
            root = psutil.Process(self.proc.pid)
            known = {p.pid for p in self.tree}
            self.tree += [p for p in [root, *root.children(recursive=True)] if p.pid not in known]
        except psutil.Error:
            pass

    def kill_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float) -> None:
        self.remember_tree()
        self.kill_group(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        self.kill_group(signal.SIGKILL)
        reap(self.tree, timeout)  # what left the group: p2pd daemons re-parented when their parent died
        if self.proc.poll() is None:
            self.proc.wait(timeout)


def _metrics_url(log: str) -> str | None:
    found = re.search(r"^metrics\s+(http://\S+)", log, re.MULTILINE)
    return found.group(1) if found else None


def example_spec(name: str = SPEC) -> Path:
    """examples/NAME of the checkout the package runs from (the README installs it editable)."""
    checkout = Path(__file__).resolve().parent.parent / "examples" / name
    if not checkout.exists():
        raise DemoError(
            f"{checkout} is missing: the demo runs from a clone of the repository (pip install -e .)"
        )
    return checkout


class Demo:
    coordinator_port = 0  # any free port

    def __init__(
        self,
        peers: int,
        drop: bool,
        echo: Callable[[str], None],
        timeout: float,
        folder: Path | None = None,
        *,
        spec: str = SPEC,
        dataset: str = "digits",
        metrics: bool = False,
    ):
        """``spec`` names a file of examples/ and ``dataset`` the example dataset it trains on
        (:mod:`peer.data.examples`), which the coordinator serves; with ``metrics`` each peer serves
        Prometheus metrics on a free port of its own."""
        self.metrics = metrics
        self.n_peers = peers
        self.spec_name = spec
        self.dataset = dataset
        self.drop = drop
        self.echo = echo
        self.deadline = time.monotonic() + timeout
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        self.tmp = folder or Path(tempfile.mkdtemp(prefix="hivemarket-demo-"))
        self.children: list[Child] = []
        self.peers: dict[str, Child] = {}  # account -> its rent process
        self.cheats: dict[str, AdversaryKind] = {}  # account -> how it cheats
        self.dropped_names: set[str] = set()  # processes the demo killed on purpose
        self.settings = load_settings()
        self.run_id = ""  # the run launched (launch)

    # -------------------------------------------------------------------------------------- processes

    def _env(self, home: Path, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMARKET_")}
        env |= {
            "HIVEMARKET_HOME": str(home),
            "HIVEMARKET_PROBE_SECONDS": "0.3",
            "HIVEMARKET_HEARTBEAT_INTERVAL": "1",  # a killed peer lapses within 3 s
            "HIVEMARKET_CLEARING_INTERVAL": "1",
            "HIVEMARKET_SETTLE_TIMEOUT": "60",
            "HIVEMARKET_TRAIN_THREADS": "1",  # several trainers share this machine's cores
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
        return env

    def host(self, name: str) -> str:
        """The address the process ``name`` listens on (this machine's loopback here; a host of a
        network lab in ``bench/reliability.py``)."""
        return "127.0.0.1"

    def argv(self, name: str, args: list[str]) -> list[str]:
        """The command line that runs ``hivemarket ARGS`` as the process ``name``."""
        return [sys.executable, "-m", "peer", *args]

    def _spawn(self, name: str, args: list[str], home: Path, **env: str) -> Child:
        home.mkdir(parents=True, exist_ok=True)
        log = self.tmp / f"{name}.log"
        with log.open("a") as out:
            proc = subprocess.Popen(
                self.argv(name, args),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._env(home, **env),
                start_new_session=True,  # its own process group: the demo can kill it with all it started
            )
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def wait(self, what: str, check: Callable[[], T | None], interval: float = 0.2) -> T:
        while time.monotonic() < self.deadline:
            for child in self.children:
                if child.proc.poll() is not None and child.name not in self.dropped_names:
                    raise DemoError(f"{child.name} exited with {child.proc.returncode}; see {child.log}")
            result = check()
            if result is not None:
                return result
            time.sleep(interval)
        raise DemoError(f"timed out waiting for {what}; logs are in {self.tmp}")

    def close(self) -> list[psutil.Process]:
        """Stop every process the demo started; return those still alive after (none, normally).

        The peers (and any other process but the coordinator) stop together, then the coordinator, so
        that a peer's last words still reach it. A peer takes seconds to stop (3 to 7 s measured: its
        trainer, DHT and p2pd): one after the other, 3 peers took 17 s to stop; together, 7 s."""
        last = [c for c in reversed(self.children) if c.name.startswith("coordinator")]
        first = [c for c in reversed(self.children) if not c.name.startswith("coordinator")]
        timeout = self.settings.shutdown_timeout
        if first:
            with ThreadPoolExecutor(len(first)) as pool:
                list(pool.map(lambda c: c.stop(timeout), first))
        for child in last:
            child.stop(timeout)
        return [p for child in self.children for p in child.tree if p.is_running() and p.status() != "zombie"]

    def events(self, name: str) -> list[dict[str, Any]]:
        return read_events(self.tmp / name / "runs" / self.run_id / "events.jsonl")

    def names(self) -> dict[str, str]:
        """Account -> process name of each peer."""
        return {account: child.name for account, child in self.peers.items()}

    def trainer(self, name: str) -> psutil.Process | None:
        """The trainer process a peer's worker runs now, if any: the topmost ``peer.trainer`` under it
        (its DHT and averager processes are forks of it with the same command line)."""
        child = next(c for c in self.children if c.name == name)
        try:
            below = psutil.Process(child.proc.pid).children(recursive=True)
        except psutil.Error:
            return None
        for p in below:
            try:
                if "peer.trainer" in " ".join(p.cmdline()) and "peer.trainer" not in " ".join(
                    p.parent().cmdline()
                ):
                    return p
            except psutil.Error:  # a process that just ended, or a zombie
                continue
        return None

    # ------------------------------------------------------------------------------------------ steps

    def start_coordinator(self, db_url: str | None = None, replicas: int = 1) -> str:
        """Start the market: ``replicas`` coordinator processes on ``db_url`` (default: a SQLite file in the
        demo's folder, which only one process may serve); its URL, or the replicas' URLs joined by commas
        (what ``--coordinator`` takes)."""
        from peer.data.examples import build_example

        report = build_example(self.dataset, self.tmp / self.dataset, shard_bytes=1 << 20)
        self.echo(
            f"dataset   {self.dataset}, {report.manifest.samples} samples, "
            f"version {report.manifest.version[:12]}"
        )
        self.admin = Identity.generate()
        save_identity(self.admin, self.tmp / "admin.pem")
        self.coordinator_args = [
            "coordinator",
            "serve",
            "--host",
            self.host("coordinator"),
            "--port",
            str(self.coordinator_port),
            "--db",
            db_url or f"sqlite:///{self.tmp / 'market.db'}",
            "--admin-key",
            str(self.tmp / "admin.pem"),
            "--dataset",
            str(self.tmp / self.dataset),
        ]
        self.url = ",".join(
            self.serve("coordinator" if i == 0 else f"coordinator-{i}") for i in range(replicas)
        )
        self.echo(
            f"coordinator {self.url} ({'SQLite in ' + str(self.tmp) if db_url is None else 'PostgreSQL'})"
        )
        self.echo(f"dashboard {self.url}/ (open it in a browser to watch the market and the run)")
        return self.url

    def serve(self, name: str = "coordinator") -> str:
        """Start a coordinator process ``name`` (again, after a crash: same database and port); its URL."""
        log = self.tmp / f"{name}.log"
        before = log.read_text().count("listening on") if log.exists() else 0
        # Replicas share the model folder as they share the database.
        child = self._spawn(
            name, self.coordinator_args, self.tmp / name, HIVEMARKET_MODEL_DIR=str(self.tmp / "models")
        )

        def listening() -> str | None:
            found = re.findall(r"listening on (http://\S+)", child.log.read_text())
            return found[-1] if len(found) > before else None

        return self.wait("the coordinator to listen", listening)

    def _client(self, identity: Identity | None = None) -> CoordinatorClient:
        return CoordinatorClient(self.url, identity)

    def ask(self, op: Callable[[CoordinatorClient], Any], identity: Identity | None = None) -> Any:
        async def go() -> Any:
            async with self._client(identity) as client:
                return await op(client)

        return asyncio.run(go())

    def fund_launcher(self) -> None:
        self.launcher = Identity.generate()
        save_identity(self.launcher, self.tmp / "launcher.pem")
        self.ask(lambda c: c.deposit(self.launcher.account, Decimal(DEMO_FUNDS)), self.admin)
        self.echo(f"launcher  {self.launcher.account[:12]} funded with {DEMO_FUNDS}")

    def add_peer(self, adversary: AdversaryKind | None = None, price: str | None = None, **env: str) -> str:
        """Start one more renting peer (``hivemarket rent``) with a fresh identity, asking ``price`` (by
        default 1.00 for the first peer, 0.10 more for each next one; 0 volunteers), cheating the way
        ``adversary`` names if one is given, with ``env`` added to its environment (settings such as
        ``HIVEMARKET_FAST_PATH``); its account."""
        i = len(self.peers)
        home = self.tmp / f"peer-{i}"
        home.mkdir(parents=True)
        identity = Identity.generate()
        save_identity(identity, home / "identity.pem")
        price = price or f"{1 + i / 10:.2f}"
        listen = f"/ip4/{self.host(f'peer-{i}')}/tcp/0"
        args = ["rent", "--coordinator", self.url, "--price-per-hour", price, "--listen", listen]
        args += ["--metrics-port", "0"] if self.metrics else []
        env = {**env, "HIVEMARKET_ADVERSARY": adversary} if adversary else env
        self.peers[identity.account] = self._spawn(f"peer-{i}", args, home, **env)
        if adversary:
            self.cheats[identity.account] = adversary
        cheat = f", cheating: {adversary}" if adversary else ""
        self.echo(f"peer-{i}    {identity.account[:12]} rents this machine at {price}/h{cheat}")
        return identity.account

    def wait_offers(self, count: int) -> None:
        def posted() -> bool | None:
            offers = self.ask(lambda c: c.offers())
            return True if len(offers) >= count else None

        self.wait(f"{count} offers", posted, interval=0.5)
        for child in self.peers.values() if self.metrics else ():
            url = self.wait(f"{child.name}'s metrics", lambda c=child: _metrics_url(c.log.read_text()))
            self.echo(f"{child.name}    metrics {url}")

    def launch(
        self,
        peers_min: int,
        peers_max: int,
        *,
        bid_over_asks: Decimal = BID_OVER_ASKS,
        changes: dict[str, Any] | None = None,
    ) -> RunView:
        """Launch the demo's spec (examples/digits.toml unless told otherwise), with ``changes`` to its
        sections (``{"stop": {"samples": 1000}}``),
        bidding ``bid_over_asks`` times the dearest offer's price per effective TFLOP-hour."""
        from peer.launch import resolve_spec
        from peer.protocol.spec import load_spec, validate_spec

        data = load_spec(example_spec(self.spec_name)).model_dump(mode="json", exclude_none=True)
        for key, value in (changes or {}).items():  # a section's values are merged; stop is replaced
            data[key] = {**data[key], **value} if isinstance(value, dict) and key != "stop" else value
        spec = validate_spec(data)
        offers = self.ask(lambda c: c.offers())
        dearest = max(o.price_per_hour / Decimal(o.tflops * o.reliability) for o in offers)
        body = RunBody(
            spec=resolve_spec(spec, self.url.split(",")[0])[0],  # replicas serve the same dataset
            # to the micro-unit, rounded up: a GPU's price per TFLOP-hour is a fraction of a cent
            max_price=f"{(dearest * bid_over_asks).quantize(Decimal(1).scaleb(-PLACES), ROUND_CEILING)}",
            peers_min=peers_min,
            peers_max=peers_max,
            budget=BUDGET,
        )
        run = self.ask(lambda c: c.create_run(body), self.launcher)
        self.run_id = run.id
        self.echo(f"run       {run.id} launched: {run.target_samples} samples, budget {BUDGET}")
        return run

    def follow(self, run: RunView) -> tuple[RunView, dict[str, float]]:
        """Follow the run to its end, killing one peer on the way (unless told not to); the final view
        and when (wall clock) each peer was killed."""
        from peer.launch import Progress
        from peer.protocol.states import ENDED

        progress = Progress(time.monotonic())
        killed: dict[str, float] = {}
        last = 0.0
        while True:
            view = self.ask(lambda c: c.run(run.id))
            now = time.monotonic()
            if now - last >= 2 or view.state in ENDED:
                self.echo(progress.line(view, now))
                last = now
            if view.state in ENDED:
                return view, killed
            if self.drop and not killed and view.samples >= DROP_AT * view.target_samples:
                victim = self._victim(view)
                if victim is not None:
                    self.peers[victim].remember_tree()
                    self.peers[victim].kill_group(signal.SIGKILL)
                    self.dropped_names.add(self.peers[victim].name)
                    killed[victim] = time.time()
                    self.echo(f"dropped   {self.peers[victim].name} ({victim[:12]}) with SIGKILL")
            if time.monotonic() > self.deadline:
                raise DemoError(f"the run did not finish in time; logs are in {self.tmp}")
            time.sleep(0.5)

    def _victim(self, view: RunView) -> str | None:
        """An honest live peer other than the first in match order (which uploads the model at the end)."""
        from peer.run_link import live_peers

        live = [p for p in live_peers(view) if p.account not in self.cheats]
        return live[-1].account if len(live) > 1 else None

    def reports_lost_and_doubled(self) -> tuple[int, int]:
        """(reports the coordinator acknowledged to a peer but does not list, reports it lists twice).

        The peers' event logs are read first: a report acknowledged by then is listed by the coordinator
        (a run still training acknowledges more meanwhile; listed first, those would look lost)."""
        acknowledged = {
            (account, e["epoch"])
            for account, name in self.names().items()
            for e in self.events(name)
            if e["event"] == "report_accepted"
        }
        listed = [(r.account, r.epoch) for r in self.ask(lambda c: c.reports(self.run_id))]
        return len(acknowledged - set(listed)), len(listed) - len(set(listed))

    def evaluate(self, run: RunView) -> dict[str, float]:
        """The held-out metrics of the run's model and of the spec's starting model (:mod:`peer.held_out`)."""
        from peer.data.reader import DatasetReader
        from peer.held_out import evaluate
        from peer.protocol.dataset import load_manifest
        from peer.protocol.spec import validate_spec

        path = self.tmp / "model.pt"
        self.ask(lambda c: c.download_model(run.id, path))
        manifest = load_manifest(self.tmp / self.dataset)
        reader = DatasetReader(manifest, lambda s: self.tmp / self.dataset / s.file)
        found = evaluate(path, validate_spec(run.spec), reader)
        return {
            "initial_loss": found.initial_loss,
            "final_loss": found.final_loss,
            "initial_accuracy": found.initial_accuracy,
            "accuracy": found.accuracy,
        }


def ledger(
    run: RunView,
    audit_conserved: bool,
    launcher: str,
    reports: list[ReportView],
    killed: dict[str, float],
    cheats: dict[str, AdversaryKind],
) -> dict:
    """Per account: samples (of reports not voided), pay, audit fees; for a killed peer, the pay of any
    report accepted more than IN_FLIGHT seconds after it was killed (none: a dead peer reports nothing,
    and its lease lapses; pay held for its earlier reports is released when their audits pass, which
    is not pay after the drop)."""
    accounts: dict[str, dict[str, Any]] = {}
    for p in run.peers:
        role = "cheat" if p.account in cheats else "peer"
        entry = accounts.setdefault(
            p.account,
            {"account": p.account, "role": role, "samples": 0, "paid": Decimal(0), "fees": Decimal(0)},
        )
        entry["samples"] += p.samples
        entry["paid"] += p.paid
        entry["fees"] += p.fees
    rows = []
    for entry in accounts.values():
        row = {**entry, "paid": str(entry["paid"]), "fees": str(entry["fees"])}
        if entry["account"] in killed:
            after = [
                r
                for r in reports
                if r.account == entry["account"] and r.accepted_at > killed[entry["account"]] + IN_FLIGHT
            ]
            row["dropped"] = True
            row["paid_after_drop"] = str(sum((r.paid for r in after if r.pay_state == "paid"), Decimal(0)))
        rows.append(row)
    rows.append(
        {
            "account": launcher,
            "role": "launcher",
            "samples": 0,
            "paid": "0",
            "fees": "0",
            "spent": str(run.spent),
            "refunded": str(run.refunded),
            "budget": str(run.budget),
        }
    )
    return {"conserved": audit_conserved, "accounts": rows}


def parse_adversaries(text: str) -> list[AdversaryKind]:
    """``free-rider,replay`` -> the kinds; ValueError naming an unknown one."""
    from peer.adversary import CAPACITY_LIAR, KINDS, ROUND_KINDS, VALIDATOR_KINDS

    known = (*KINDS, *ROUND_KINDS, CAPACITY_LIAR, *VALIDATOR_KINDS)
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    for kind in kinds:
        if kind not in known:
            raise ValueError(f"{kind!r} is not a cheat this demo knows (known: {', '.join(known)})")
    return kinds  # type: ignore[return-value]


def adversaries(
    run: RunView, reports: list[ReportView], audits: list[AuditView], cheats: dict[str, AdversaryKind]
) -> list[dict[str, Any]]:
    """Each cheat: whether an audit caught it, whether it was banned, what it was paid in all and for the
    epochs whose audits it failed (nothing, if the market works). A capacity liar is caught when the run
    flags it ``short`` (:mod:`coordinator.capacity`); its row compares its pay per paid sample with the
    honest peers' (``honest_paid_per_sample``: theirs together)."""

    def per_sample(peers: list[Any]) -> str | None:
        samples = sum(p.samples for p in peers)
        return f"{sum((p.paid for p in peers), Decimal(0)) / samples:.9f}" if samples else None

    honest = per_sample([p for p in run.peers if p.account not in cheats])
    rows = []
    for account, kind in cheats.items():
        mine = [p for p in run.peers if p.account == account]
        if kind == "lazy-validator":
            rows.append(_lazy_validator(account, mine, audits))
            continue
        failed = {a.epoch for a in audits if a.account == account and a.state == "failed"}
        paid_for_failed = sum(
            (r.paid for r in reports if r.account == account and r.epoch in failed and r.pay_state == "paid"),
            Decimal(0),
        )
        flags = sorted({p.capacity_flag for p in mine if p.capacity_flag})
        rows.append(
            {
                "kind": kind,
                "account": account,
                "caught": "short" in flags if kind == "capacity-liar" else bool(failed),
                "capacity_flags": flags,
                "capacity_ratio": min(
                    (p.capacity_ratio for p in mine if p.capacity_ratio is not None), default=None
                ),
                "paid_per_sample": per_sample(mine),
                "honest_paid_per_sample": honest,
                "banned": any(p.state == "banned" for p in mine),
                "failed_epochs": sorted(failed),
                "paid": str(sum((p.paid for p in mine), Decimal(0))),
                "paid_for_failed_epochs": str(paid_for_failed),
            }
        )
    return rows


def _lazy_validator(account: str, mine: list[RunPeerView], audits: list[AuditView]) -> dict[str, Any]:
    """A cheat of a validator (``lazy-validator``), caught by canaries: ``failed_epochs`` are the epochs of
    the canaries it answered wrong, ``banned`` means banned from validating the run, and
    ``paid_for_failed_epochs`` is what it earned in fees for the audits it faked (it recomputed none)."""
    failed = {a.epoch for a in audits if a.canary_of and a.validator == account and a.state == "failed"}
    return {
        "kind": "lazy-validator",
        "account": account,
        "caught": bool(failed),
        "banned": any(p.validator_ban for p in mine),
        "failed_epochs": sorted(failed),
        "paid": str(sum((p.paid for p in mine), Decimal(0))),
        "paid_for_failed_epochs": str(sum((p.fees for p in mine), Decimal(0))),
    }


def example_dataset(spec_name: str) -> str:
    """The example dataset (:mod:`peer.data.examples`) that the example spec ``spec_name`` trains on."""
    from peer.protocol.spec import load_spec

    name = load_spec(example_spec(spec_name)).dataset.name
    if name is None:
        raise DemoError(f"examples/{spec_name} names no dataset (dataset.name)")
    return name


def run_demo(
    peers: int,
    drop: bool,
    as_json: bool,
    timeout: float,
    keep: bool = False,
    cheats: Sequence[AdversaryKind] = (),
    *,
    spec: str = SPEC,
    samples: int | None = None,
    show: Callable[[dict[str, Any]], None],
    stay: bool = False,
) -> dict[str, Any]:
    """Run the demo of examples/``spec`` (on the example dataset it names; ``samples`` replaces its stop)
    and ``show`` its result; with ``stay`` the coordinator, its dashboard and the peers then keep running
    until Ctrl-C or SIGTERM (which end a staying demo normally), so that the finished run can be looked
    at. Its temporary folder (database, dataset, logs) is removed on success unless ``keep``, and kept
    (and named in the error) when something failed."""
    echo = (lambda _text: None) if as_json else (lambda text: click.echo(text, err=False))
    dataset = example_dataset(spec)
    demo = Demo(peers, drop, echo, timeout, metrics=True, spec=spec, dataset=dataset)
    started = time.monotonic()
    # SIGTERM (kill, a supervisor, a test's clean-up) stops the demo as Ctrl-C does, through the finally
    # below: by default it would end this process at once and leave every peer and the coordinator running.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        demo.start_coordinator()
        demo.fund_launcher()
        for _ in range(peers):
            demo.add_peer()
        for kind in cheats:
            demo.add_peer(kind)
        demo.wait_offers(peers + len(cheats))
        run = demo.launch(
            peers_min=max(2, peers - 1),
            peers_max=peers + len(cheats),
            changes={"stop": {"samples": samples}} if samples else None,
        )
        final, killed = demo.follow(run)
        if final.state != "finished" or final.model is None:
            raise DemoError(f"run {final.id} ended {final.state}: {final.reason}; logs are in {demo.tmp}")
        metrics = demo.evaluate(final)
        rounds = [e for name in demo.names().values() for e in demo.events(name) if e["event"] == "epoch"]
        audit = demo.ask(lambda c: c.audit())
        reports = demo.ask(lambda c: c.reports(final.id))
        audits = demo.ask(lambda c: c.audits(final.id))
        result = {
            "run_id": final.id,
            "spec": spec,
            "dataset": dataset,
            **metrics,
            "samples": final.samples,
            "epochs": final.epoch,
            "peers": peers,
            "dropped": list(killed),
            # the payload a peer put into an all-reduce, and what averaging every parameter would put in
            "round_bytes": max((e.get("round_bytes", 0) for e in rounds), default=0),
            "model_bytes": max((e.get("model_bytes", 0) for e in rounds), default=0),
            "audits": {
                state: sum(a.state == state for a in audits) for state in ("passed", "failed", "expired")
            },
            "adversaries": adversaries(final, reports, audits, demo.cheats),
            "ledger": ledger(final, audit.conserved, demo.launcher.account, reports, killed, demo.cheats),
            "seconds": round(time.monotonic() - started, 1),
        }
        if keep:
            result["folder"] = str(demo.tmp)
        show(result)
        if stay:
            echo(f"staying   the dashboard and the peers run until Ctrl-C: {demo.url}/")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        survivors = demo.close()
        signal.signal(signal.SIGTERM, previous)
    if survivors:
        raise DemoError(f"processes survived the demo: {survivors}; logs are in {demo.tmp}")
    if not keep:
        shutil.rmtree(demo.tmp, ignore_errors=True)
    return result


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def print_result(result: dict[str, Any]) -> None:
    click.echo("")
    click.echo(
        f"run       {result['run_id']}: {result['samples']} samples in {result['epochs']} steps, "
        f"{result['seconds']} s"
    )
    held_out = f"held-out {result['dataset']}"
    click.echo(f"loss      {result['initial_loss']:.4f} -> {result['final_loss']:.4f} ({held_out})")
    click.echo(f"accuracy  {result['initial_accuracy']:.1%} -> {result['accuracy']:.1%} ({held_out})")
    if result["model_bytes"]:
        click.echo(
            f"rounds    {result['round_bytes'] / 1e6:.2f} MB a peer a round, "
            f"{result['round_bytes'] / result['model_bytes']:.1%} of averaging the whole model"
        )
    audits = result["audits"]
    click.echo(f"audits    {audits['passed']} passed, {audits['failed']} failed, {audits['expired']} expired")
    cheats = {row["account"]: row for row in result["adversaries"]}
    rows = []
    for row in result["ledger"]["accounts"]:
        if row["role"] == "launcher":
            note = f"spent {row['spent']}, refunded {row['refunded']} of {row['budget']}"
        elif row.get("dropped"):
            note = f"killed mid-run; paid for reports after that: {row['paid_after_drop']}"
        elif row["account"] in cheats and cheats[row["account"]]["kind"] == "capacity-liar":
            cheat = cheats[row["account"]]
            caught = "flagged short" if cheat["caught"] else "NOT FLAGGED"
            ratio = cheat["capacity_ratio"]
            delivered = f", delivered {ratio:.0%} of its claim" if ratio is not None else ""
            note = (
                f"capacity-liar: {caught}{delivered}; paid {cheat['paid_per_sample']} a sample, "
                f"honest peers {cheat['honest_paid_per_sample']}"
            )
        elif row["account"] in cheats and cheats[row["account"]]["kind"] == "lazy-validator":
            cheat = cheats[row["account"]]
            caught = (
                f"caught by canaries at epochs {cheat['failed_epochs']}" if cheat["caught"] else "NOT CAUGHT"
            )
            banned = ", banned from validating" if cheat["banned"] else ""
            note = (
                f"lazy-validator: {caught}{banned}; fees for faked audits: {cheat['paid_for_failed_epochs']}"
            )
        elif row["account"] in cheats:
            cheat = cheats[row["account"]]
            caught = f"caught at epochs {cheat['failed_epochs']}" if cheat["caught"] else "NOT CAUGHT"
            banned = ", banned" if cheat["banned"] else ""
            paid = cheat["paid_for_failed_epochs"]
            note = f"{cheat['kind']}: {caught}{banned}; paid for failed epochs: {paid}"
        else:
            note = ""
        rows.append([row["account"][:12], row["role"], row["samples"], row["paid"], row["fees"], note])
    print_table(
        ["ACCOUNT", "ROLE", "SAMPLES", "PAID", "AUDIT FEES", "NOTE"],
        rows,
        right=["SAMPLES", "PAID", "AUDIT FEES"],
    )
    click.echo(f"ledger    {'conserved' if result['ledger']['conserved'] else 'NOT CONSERVED'}")

"""Researcher commands: ``hivemarket launch SPEC`` and ``hivemarket runs [show|cancel|fetch]``.

``launch`` validates the spec locally (errors name the field), makes sure the coordinator answers,
resolves ``stop.epochs`` into samples from the dataset's manifest, escrows the budget by creating the run,
and follows it with a progress line until it ends. A failure after the spec names the step that failed
(reaching the coordinator, finding the dataset, creating the run, following it) and what to do. Exit
status: 0 when the run finished, 1 when it failed or was cancelled (or on a failure to reach the
coordinator), 2 for bad input.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import click

from peer.console import echo_json, json_option, load_cli_identity, print_table
from peer.market_cli import call, client_for, coordinator_option, money_option
from peer.protocol.client import CoordinatorClient
from peer.protocol.commands import InputError
from peer.protocol.dataset import Manifest
from peer.protocol.money import fmt_money
from peer.protocol.run_schemas import QuoteBody, QuoteView, RunBody, RunPeerView, RunView, unauditable
from peer.protocol.spec import RunSpec, SpecError, load_spec
from peer.protocol.states import ENDED
from peer.settings import load_settings

T = TypeVar("T")


def _peers_range(value: str | None, spec: RunSpec) -> tuple[int, int]:
    if value is None:
        return spec.peers.min, spec.peers.max
    low, sep, high = value.partition(":")
    try:
        lo, hi = int(low), int(high if sep else low)
    except ValueError:
        raise InputError(f"--peers {value!r}: expected MIN:MAX, e.g. 2:4") from None
    if not 1 <= lo <= hi:
        raise InputError(f"--peers {value!r}: need 1 <= MIN <= MAX")
    return lo, hi


def resolve_spec(spec: RunSpec, coordinator: str) -> tuple[dict[str, Any], Manifest]:
    """The spec as posted: the dataset version filled in from its location when it was left out, and
    ``stop.epochs`` turned into ``stop.samples`` with the dataset's training split; and the dataset's
    manifest."""
    from peer.data.fetch import DatasetUnreachable, fetch_manifest, list_datasets
    from peer.protocol.dataset import DatasetError
    from peer.samples import test_ids

    data = spec.model_dump(mode="json", exclude_none=True)
    location = coordinator if spec.dataset.location == "coordinator" else spec.dataset.location
    try:
        version = spec.dataset.version
        if version is None:
            found = asyncio.run(list_datasets(location))
            named = [d for d in found if spec.dataset.name in (None, d["name"])]
            if not found:
                raise InputError(
                    f"spec.dataset: {location} serves no dataset; start the coordinator with "
                    "--dataset PATH, or set dataset.location to a server that has it"
                )
            if len(named) != 1:
                served = ", ".join(f"{d['name']} ({d['version'][:12]})" for d in found)
                raise InputError(
                    f"spec.dataset.version: {location} serves {served}; set dataset.version"
                    + ("" if spec.dataset.name else " or dataset.name")
                )
            version = data["dataset"]["version"] = named[0]["version"]
        manifest = asyncio.run(fetch_manifest(location, version))
    except DatasetUnreachable as e:
        raise click.ClickException(
            f"cannot reach the dataset at {location}: {e}; check spec.dataset.location and that its server "
            "runs (`hivemarket data serve`, or `coordinator serve --dataset`)"
        ) from None
    except DatasetError as e:
        raise InputError(f"spec.dataset: {e}") from None
    if spec.stop.samples is None:
        train = manifest.samples - len(test_ids(manifest.samples, spec.dataset.test_every))
        data["stop"] = {"samples": spec.target_samples(train)}
    return data, manifest


def flops_per_sample(spec: RunSpec, manifest: Manifest) -> float | None:
    """What one sample of the run costs, as the task installed here counts it; None when this machine
    does not have the task (a launcher need not: its peers train it)."""
    from peer.tasks import TaskError, load_task

    try:
        return load_task(spec.task, spec.options).flops_per_sample(manifest.schema)
    except TaskError:
        return None


def print_quote(quote: QuoteView, body: QuoteBody, budget: Decimal | None) -> None:
    """What ``launch --dry-run`` shows: the market for this run now, then time and cost with ranges."""
    click.echo("dry run   nothing created: what the market would give this run now")
    click.echo(
        f"offers    {quote.offers_open} open, {quote.offers_with_vram} with the {body.min_vram_gb:g} GB of "
        f"VRAM it needs, {quote.offers_affordable} asking at most its {fmt_money(body.max_price)} per "
        "effective TFLOP-hour"
    )
    click.echo(
        f"peers     {quote.peers} of {body.peers_min}-{body.peers_max}"
        + (
            f", at {fmt_money(quote.unit_price)} per effective TFLOP-hour: "
            f"{fmt_money(quote.price_per_hour)} per hour together"
            if quote.unit_price is not None
            else ""
        )
    )
    if quote.reason is not None:
        click.echo(f"market    not matched: {quote.reason}")
    if quote.peers < body.peers_min:
        click.echo(f"would not start now: it needs {body.peers_min} peers")
        return
    low, mid, high = quote.samples_per_second
    click.echo(f"speed     {mid:.0f} samples/s ({low:.0f}-{high:.0f}): {quote.basis_note}")
    low, mid, high = quote.seconds
    click.echo(
        f"time      {mid:.0f} s ({low:.0f}-{high:.0f} s) of training: {body.spec['stop']['samples']} samples "
        f"in {quote.steps} steps"
    )
    low_cost, cost, high_cost = quote.cost
    fees = f"audit fees {quote.audit_share:.0%} of the pay included"
    click.echo(f"cost      {fmt_money(cost)} ({fmt_money(low_cost)}-{fmt_money(high_cost)}), {fees}")
    if budget is not None and cost > budget:
        share = float(budget / cost)
        click.echo(
            f"budget    {fmt_money(budget)} runs out {share:.0%} of the way (about {mid * share:.0f} s): "
            "the run would settle there, short of its samples"
        )


def _step(what: str, action: Callable[[], T], todo: str = "") -> T:
    """One step of ``launch``: its failure says which step failed and, where it helps, what to do (the
    exit status stays the failure's own)."""
    try:
        return action()
    except click.ClickException as e:
        e.message = f"{what}: {e.message}" + (f"; {todo}" if todo else "")
        raise


@dataclass
class Progress:
    """Samples per second over the run so far, for the ETA."""

    started: float
    first_samples: int | None = None

    def line(self, view: RunView, now: float) -> str:
        if self.first_samples is None and view.samples:
            self.first_samples, self.started = view.samples, now
        done = min(view.samples, view.target_samples)
        width = 24
        filled = int(width * done / max(1, view.target_samples))
        bar = "#" * filled + "." * (width - filled)
        live = sum(1 for p in view.peers if p.state == "active")
        loss = "-" if view.loss is None else f"{view.loss:.4f}"
        eta = "-"
        elapsed = now - self.started
        if self.first_samples is not None and elapsed > 0 and view.samples > self.first_samples:
            rate = (view.samples - self.first_samples) / elapsed
            eta = f"{max(0.0, (view.target_samples - view.samples) / rate):.0f}s"
        waiting = "" if view.waiting_for is None else f" (not matched: {view.waiting_for})"
        return (
            f"[{bar}] {done}/{view.target_samples} samples  loss {loss}  peers {live}  "
            f"spent {fmt_money(view.spent)}  eta {eta}  {view.state}{waiting}"
        )


async def watch(client: CoordinatorClient, run_id: str, interval: float, echo: bool) -> RunView:
    """Poll the run until it ends, printing a progress line (redrawn in place on a terminal)."""
    progress = Progress(time.monotonic())
    tty = sys.stderr.isatty()
    last_print = 0.0
    while True:
        view = await client.run(run_id)
        now = time.monotonic()
        if echo and (tty or now - last_print >= 5 or view.state in ENDED):
            text = progress.line(view, now)
            click.echo(f"\r{text}\033[K" if tty else text, err=True, nl=not tty)
            last_print = now
        if view.state in ENDED:
            if echo and tty:
                click.echo("", err=True)
            return view
        await asyncio.sleep(interval)


def print_run(view: RunView) -> None:
    click.echo(f"run       {view.id}  {view.name}")
    click.echo(f"state     {view.state}  ({view.reason})")
    if view.waiting_for is not None:
        click.echo(f"market    not matched: {view.waiting_for}")
    click.echo(
        f"progress  {view.samples}/{view.target_samples} samples, epoch {view.epoch}, loss "
        f"{'-' if view.loss is None else f'{view.loss:.4f}'}"
    )
    click.echo(
        f"money     budget {fmt_money(view.budget)}, spent {fmt_money(view.spent)}, "
        f"escrow {fmt_money(view.escrow)}, refunded {fmt_money(view.refunded)}"
    )
    if view.group is not None:
        g = view.group
        ranks = ", ".join(f"{m.rank} {m.account[:12]}" for m in g.members) or "no members"
        click.echo(f"group     version {g.version} on the {g.path} path, by rank: {ranks} ({g.reason})")
    if view.model is not None:
        click.echo(f"model     {view.model.bytes} bytes, sha256 {view.model.sha256}")
    if view.peers:
        print_table(
            ["PEER", "STATE", "PRICE/H", "SAMPLES", "PAID", "FEES", "AUDITS", "CAPACITY"],
            [
                [
                    p.account[:12],
                    p.state,
                    fmt_money(p.price_per_hour),
                    p.samples,
                    fmt_money(p.paid),
                    fmt_money(p.fees),
                    f"{p.audits_passed}/{p.audits_failed}",
                    capacity_cell(p),
                ]
                for p in view.peers
            ],
            right=["PRICE/H", "SAMPLES", "PAID", "FEES", "AUDITS"],
            note="(AUDITS: passed/failed audits of the peer's reports; FEES: earned auditing others; "
            "CAPACITY: delivered per TFLOP/s claimed over the run's other peers' median, and its flag)",
        )
        for p in view.peers:
            if p.capacity_flag is not None:
                click.echo(f"{p.account[:12]} {p.capacity_flag}: {p.capacity_reason}")


def capacity_cell(p: RunPeerView) -> str:
    """A match's delivered capacity as ``runs show`` prints it ("short 0.25x", "0.98x"; "-" before it is
    measured), so that a launcher sees which peer does not deliver what it is paid for."""
    ratio = None if p.capacity_ratio is None else f"{p.capacity_ratio:.2f}x"
    return " ".join(part for part in (p.capacity_flag, ratio) if part) or "-"


@click.command("launch")
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False, path_type=Path))
@coordinator_option
@click.option("--budget", metavar="B", help="Funds to escrow for the run [default: spec price.budget].")
@click.option(
    "--max-price", metavar="P", help="Highest price per effective TFLOP-hour [default: spec price.max]."
)
@click.option("--peers", "peers", metavar="MIN:MAX", help="Peers to train with [default: spec peers].")
@click.option(
    "--min-vram-gb",
    type=click.FloatRange(0, 10_000),
    metavar="GB",
    help="GPU memory each peer needs [default: spec peers.min_vram_gb].",
)
@click.option("--detach", is_flag=True, help="Create the run and exit without following it.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Create nothing: print what the market would give the run now, its speed, time and cost.",
)
@click.option(
    "--identity", "identity_path", type=click.Path(dir_okay=False), help="Key file of your account."
)
@json_option
def launch(
    spec_path: Path,
    coordinator: str,
    budget: str | None,
    max_price: str | None,
    peers: str | None,
    min_vram_gb: float | None,
    detach: bool,
    dry_run: bool,
    identity_path: str | None,
    as_json: bool,
) -> None:
    """Launch a collaborative training run described by the TOML file SPEC and follow it to the end.

    \b
    Example:
      hivemarket launch examples/digits.toml --budget 5 --max-price 20 --peers 2:3
    """
    try:
        spec = load_spec(spec_path)
    except SpecError as e:
        raise InputError(str(e)) from None
    budget = budget or spec.price.budget
    max_price = max_price or spec.price.max
    if budget is None and not dry_run:
        raise InputError("--budget is required (or set price.budget in the spec)")
    if max_price is None:
        raise InputError("--max-price is required (or set price.max in the spec)")
    budget_value = None if budget is None else money_option(budget, "--budget", positive=True)
    price_value = money_option(max_price, "--max-price")
    peers_min, peers_max = _peers_range(peers, spec)
    refusal = unauditable(peers_min, spec)
    if refusal is not None:
        raise InputError(f"--peers {peers_min}:{peers_max}: {refusal}")
    reached = client_for(coordinator)
    _step(
        "reaching the coordinator",
        lambda: call(reached, lambda c: c.health()),
        "check --coordinator (or $HIVEMARKET_COORDINATOR) and that `hivemarket coordinator serve` runs there",
    )
    # The coordinator's dataset comes from the replica that answered (one URL: the fetch has no fail-over).
    resolved, manifest = _step("finding the dataset", lambda: resolve_spec(spec, reached.base_url))
    bid: dict[str, Any] = {
        "spec": resolved,
        "max_price": f"{price_value:f}",
        "peers_min": peers_min,
        "peers_max": peers_max,
        "min_vram_gb": spec.peers.min_vram_gb if min_vram_gb is None else min_vram_gb,
    }
    if dry_run:
        ask = QuoteBody(**bid, flops_per_sample=flops_per_sample(spec, manifest))
        quote = _step("asking the market", lambda: call(reached, lambda c: c.quote(ask)))
        if as_json:
            echo_json(quote.model_dump(mode="json"))
        else:
            print_quote(quote, ask, budget_value)
        return
    client = client_for(coordinator, load_cli_identity(identity_path, load_settings(), create_default=True))
    body = RunBody(**bid, budget=f"{budget_value:f}")
    created = _step(
        "creating the run", lambda: call(client, lambda c: c.create_run(body)), "nothing was escrowed"
    )
    if not as_json:
        click.echo(
            f"run {created.id} created: escrowed {fmt_money(created.budget)}, "
            f"{created.target_samples} samples, {peers_min}-{peers_max} peers"
        )
    if detach:
        if as_json:
            echo_json(created.model_dump(mode="json"))
        return
    try:
        view = _step(
            "following the run",
            lambda: call(client, lambda c: watch(c, created.id, 1.0, echo=not as_json)),
            f"the run goes on: hivemarket runs show {created.id}",
        )
    except KeyboardInterrupt:
        click.echo(
            f"\nstopped following; the run goes on. Cancel it with: hivemarket runs cancel {created.id}"
        )
        return
    held_out: dict[str, Any] | None = None
    line = None
    if view.state == "finished" and view.model is not None:
        location = reached.base_url if spec.dataset.location == "coordinator" else spec.dataset.location
        held_out, line = _held_out(client, view, spec, manifest, location)
    if as_json:
        echo_json({**view.model_dump(mode="json"), "held_out": held_out})
    else:
        print_run(view)
        if line is not None:
            click.echo(line)
    if view.state != "finished":
        sys.exit(1)


def _held_out(
    client: CoordinatorClient, view: RunView, spec: RunSpec, manifest: Manifest, location: str
) -> tuple[dict[str, Any] | None, str]:
    """The finished run's model against the spec's starting model on the dataset's test split
    (:mod:`peer.held_out`), and the line that says so; or None and why there are no figures (the task's
    packages or base weights missing on this machine, the dataset unreachable)."""
    from peer.data.fetch import FetchSettings
    from peer.held_out import evaluate, fetch_test_split

    with tempfile.TemporaryDirectory(prefix="hivemarket-launch-") as folder:
        path = Path(folder) / "model.pt"
        try:
            call(client, lambda c: c.download_model(view.id, path))
            reader = fetch_test_split(location, manifest, spec.dataset.test_every, FetchSettings().cache_root)
            found = evaluate(path, spec, reader)
        except Exception as e:  # figures are a courtesy: the run's outcome stands without them
            return None, f"held-out  not evaluated: {type(e).__name__}: {e}"
    return asdict(found), found.line(manifest.name)


@click.group("runs", invoke_without_command=True)
@coordinator_option
@json_option
@click.pass_context
def runs_group(ctx: click.Context, coordinator: str, as_json: bool) -> None:
    """List runs; `runs show|cancel|fetch ID` for one.

    \b
    Example:
      hivemarket runs --json
      hivemarket runs show run-0123456789ab
      hivemarket runs fetch run-0123456789ab model.pt
    """
    if ctx.invoked_subcommand is not None:
        return
    found = call(client_for(coordinator), lambda c: c.runs())
    if as_json:
        echo_json([r.model_dump(mode="json") for r in found])
        return
    if not found:
        click.echo("no runs")
        return
    print_table(
        ["RUN", "NAME", "STATE", "SAMPLES", "PEERS", "SPENT"],
        [
            [
                r.id,
                r.name,
                r.state,
                f"{r.samples}/{r.target_samples}",
                sum(1 for p in r.peers if p.state == "active"),
                fmt_money(r.spent),
            ]
            for r in found
        ],
        right=["SAMPLES", "PEERS", "SPENT"],
    )


@runs_group.command("show")
@click.argument("run_id")
@coordinator_option
@json_option
def runs_show(run_id: str, coordinator: str, as_json: bool) -> None:
    """Show one run: state and why, progress, money, and each peer's samples and pay.

    \b
    Example:
      hivemarket runs show run-0123456789ab
      hivemarket runs show run-0123456789ab --json
    """
    view = call(client_for(coordinator), lambda c: c.run(run_id))
    if as_json:
        echo_json(view.model_dump(mode="json"))
    else:
        print_run(view)


@runs_group.command("cancel")
@click.argument("run_id")
@coordinator_option
@click.option(
    "--identity", "identity_path", type=click.Path(dir_okay=False), help="Key file of your account."
)
@json_option
def runs_cancel(run_id: str, coordinator: str, identity_path: str | None, as_json: bool) -> None:
    """Cancel a run you launched; what is unspent returns to your balance.

    \b
    Example:
      hivemarket runs cancel run-0123456789ab --identity ./launcher.pem
    """
    client = client_for(coordinator, load_cli_identity(identity_path, load_settings()))
    view = call(client, lambda c: c.cancel_run(run_id))
    if as_json:
        echo_json(view.model_dump(mode="json"))
    else:
        click.echo(f"run {view.id} cancelled; refunded {fmt_money(view.refunded)}")


@runs_group.command("fetch")
@click.argument("run_id")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@coordinator_option
@json_option
def runs_fetch(run_id: str, out: Path, coordinator: str, as_json: bool) -> None:
    """Download a finished run's model to OUT, checking its SHA-256 against the one the run recorded.

    \b
    Example:
      hivemarket runs fetch run-0123456789ab model.pt
      python -c "import torch; print(torch.load('model.pt').keys())"
    """
    sha256 = call(client_for(coordinator), lambda c: c.download_model(run_id, out))
    if as_json:
        echo_json({"path": str(out), "sha256": sha256, "bytes": out.stat().st_size})
    else:
        click.echo(f"{out}  sha256 {sha256}")

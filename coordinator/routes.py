"""The coordinator's route table and the application built from it.

Each route is declared once in :data:`ROUTES` (method, path, auth, body and response models); the same
table drives dispatch (:meth:`coordinator.app.Coordinator.endpoint`), validation and ``/openapi.json``.
This module is the only one that knows the application, the dashboard and the OpenAPI builder together,
so none of them imports another.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from coordinator import dashboard
from coordinator.app import Coordinator
from coordinator.http import Context, Route, errors_and_metrics
from coordinator.openapi import build_openapi
from peer.protocol.run_schemas import (
    AuditClaimBody,
    AuditList,
    AuditResultBody,
    AuditTaskList,
    AuditView,
    BlameBody,
    BlameView,
    CheckinBody,
    GroupView,
    JoinBody,
    LossCurve,
    QuoteBody,
    QuoteView,
    RendezvousGetBody,
    RendezvousSetBody,
    RendezvousValues,
    RendezvousWritten,
    ReportBody,
    ReportList,
    ReportView,
    RunBody,
    RunList,
    RunView,
)
from peer.protocol.schemas import (
    OCTET_STREAM,
    SHA256_HEADER,
    AccountView,
    ClearingRoundView,
    DepositBody,
    Health,
    HeartbeatBody,
    LeaseView,
    LedgerAuditView,
    MarketView,
    OfferBody,
    OfferList,
    OfferResponse,
    PeerList,
    ReachBody,
    ReachView,
    TransferBody,
    WithdrawBody,
)


@functools.cache
def _openapi_document() -> dict[str, Any]:
    """Built once: the routes and schemas do not change while the process runs."""
    return build_openapi(ROUTES)


async def openapi(coordinator: Coordinator, ctx: Context) -> dict[str, Any]:
    return _openapi_document()


ROUTES: Sequence[Route] = (
    Route(
        "GET",
        "/",
        dashboard.dashboard,
        "The web dashboard: market, offers, runs, peers, ledger (HTML, updating live)",
        query=(
            ("q", "offer filter"),
            ("sort", "offer order"),
            ("run", "run to plot"),
            ("partial", "live parts"),
        ),
        content_type="text/html",
    ),
    Route("GET", "/healthz", Coordinator.healthz, "Liveness", response=Health),
    Route(
        "POST",
        "/v1/reachability",
        Coordinator.reachability,
        "Dial the asking host back at a port: whether others can reach it (or it is behind a NAT)",
        auth="signed",
        body=ReachBody,
        response=ReachView,
    ),
    Route("GET", "/openapi.json", openapi, "This OpenAPI document", content_type="application/json"),
    Route("GET", "/metrics", Coordinator.prometheus, "Prometheus metrics", content_type=CONTENT_TYPE_LATEST),
    Route(
        "POST",
        "/v1/accounts/{account}/deposit",
        Coordinator.deposit,
        "Credit an account (admin)",
        auth="admin",
        body=DepositBody,
        response=AccountView,
    ),
    Route(
        "POST",
        "/v1/accounts/{account}/withdraw",
        Coordinator.withdraw,
        "Pay money out of the market to your account's owner: from its earnings first, then its balance",
        auth="signed",
        body=WithdrawBody,
        response=AccountView,
    ),
    Route(
        "POST",
        "/v1/accounts/{account}/transfer",
        Coordinator.transfer,
        "Move money from your account to another account's balance: from earnings first, then balance",
        auth="signed",
        body=TransferBody,
        response=AccountView,
    ),
    Route("GET", "/v1/accounts/{account}", Coordinator.account, "An account's money", response=AccountView),
    Route(
        "GET",
        "/v1/ledger/audit",
        Coordinator.ledger_audit,
        "Holdings against deposits, and the books against the entries added since the last audit",
        response=LedgerAuditView,
    ),
    Route(
        "POST",
        "/v1/ledger/audit/replay",
        Coordinator.ledger_replay,
        "Replay every ledger entry against the books (admin: a scan of the whole ledger)",
        auth="admin",
        response=LedgerAuditView,
    ),
    Route(
        "POST",
        "/v1/offers",
        Coordinator.post_offer,
        "Create or update your offer; returns its lease",
        auth="signed",
        body=OfferBody,
        response=OfferResponse,
    ),
    Route(
        "POST",
        "/v1/leases/{lease_id}/heartbeat",
        Coordinator.heartbeat,
        "Renew your lease; the body may carry your GPUs' telemetry",
        auth="signed",
        body=HeartbeatBody,
        response=LeaseView,
    ),
    Route(
        "POST",
        "/v1/leases/{lease_id}/withdraw",
        Coordinator.withdraw_offer,
        "Withdraw your offer: its lease ends released (no lapse counted) and its run goes on without you",
        auth="signed",
        response=OfferResponse,
    ),
    Route(
        "GET",
        "/v1/offers",
        Coordinator.list_offers,
        "List offers",
        query=(
            ("q", "filter, e.g. 'gpu=H100 vram_gb>=40 price<=2.5'"),
            ("sort", "field, '-' for descending"),
        ),
        response=OfferList,
    ),
    Route(
        "POST",
        "/v1/runs",
        Coordinator.create_run,
        "Create a run, escrowing its budget",
        auth="signed",
        body=RunBody,
        response=RunView,
        status=201,
    ),
    Route(
        "GET",
        "/v1/peers",
        Coordinator.list_peers,
        "Peers: standing, verified work, earnings, telemetry",
        response=PeerList,
    ),
    Route("GET", "/v1/runs", Coordinator.list_runs, "List runs", response=RunList),
    Route("GET", "/v1/runs/{run_id}", Coordinator.get_run, "One run", response=RunView),
    Route(
        "POST",
        "/v1/runs/{run_id}/cancel",
        Coordinator.cancel_run,
        "Cancel your run; refunds what is unspent",
        auth="signed",
        response=RunView,
    ),
    Route(
        "POST",
        "/v1/runs/{run_id}/join",
        Coordinator.join_run,
        "Join a run you are matched to: say where other peers reach you",
        auth="signed",
        body=JoinBody,
        response=RunView,
    ),
    Route(
        "POST",
        "/v1/runs/{run_id}/leave",
        Coordinator.leave_run,
        "Give up your place in a run you cannot train; the run recruits a replacement",
        auth="signed",
        response=RunView,
    ),
    Route(
        "POST",
        "/v1/runs/{run_id}/group",
        Coordinator.group_checkin,
        "Check in with the run's training group (your address, the version you are on, a version that "
        "failed, members you could not reach); answers the current group",
        auth="signed",
        body=CheckinBody,
        response=GroupView,
    ),
    Route(
        "POST",
        "/v1/runs/{run_id}/rendezvous/set",
        Coordinator.rendezvous_set,
        "Write a key of the rendezvous store of the group's current version (members only, each its own "
        "keys)",
        auth="signed",
        body=RendezvousSetBody,
        response=RendezvousWritten,
    ),
    Route(
        "POST",
        "/v1/runs/{run_id}/rendezvous/get",
        Coordinator.rendezvous_get,
        "Read keys of the rendezvous store of the group's current version (members only), waiting up to "
        "wait_ms for them all",
        auth="signed",
        body=RendezvousGetBody,
        response=RendezvousValues,
    ),
    Route(
        "POST",
        "/v1/runs/{run_id}/reports",
        Coordinator.post_report,
        "Report an epoch's work; paid the matched price for its compute time, capped by wall clock, once "
        "its audits pass",
        auth="signed",
        body=ReportBody,
        response=ReportView,
        status=201,
    ),
    Route(
        "GET", "/v1/runs/{run_id}/reports", Coordinator.list_reports, "A run's reports", response=ReportList
    ),
    Route(
        "POST",
        "/v1/runs/{run_id}/blames",
        Coordinator.blame_round,
        "Blame the members of a fast-path round you refused that revealed other than they committed to; "
        "an epoch fails once most of the round's other members blame it",
        auth="signed",
        body=BlameBody,
        response=BlameView,
    ),
    Route(
        "GET",
        "/v1/runs/{run_id}/loss",
        Coordinator.loss_curve,
        "A run's mean loss per epoch",
        response=LossCurve,
    ),
    Route(
        "POST",
        "/v1/runs/{run_id}/audits/claim",
        Coordinator.claim_audits,
        "Take audits to recompute: other peers' micro-batches of this run (peers of the run only)",
        auth="signed",
        body=AuditClaimBody,
        response=AuditTaskList,
    ),
    Route(
        "POST",
        "/v1/runs/{run_id}/audits/{audit_id}",
        Coordinator.submit_audit,
        "Answer an audit you hold: the recomputed gradient sketch and loss, or declined with a reason",
        auth="signed",
        body=AuditResultBody,
        response=AuditView,
    ),
    Route("GET", "/v1/runs/{run_id}/audits", Coordinator.list_audits, "A run's audits", response=AuditList),
    Route(
        "PUT",
        "/v1/runs/{run_id}/model",
        Coordinator.put_model,
        "Upload the final model of a settling run (raw bytes, signed over their SHA-256); the run finishes "
        "when its audits are decided",
        auth="signed",
        response=RunView,
        raw_body=OCTET_STREAM,
    ),
    Route(
        "GET",
        "/v1/runs/{run_id}/model",
        Coordinator.get_model,
        f"The run's final model; its SHA-256 is in {SHA256_HEADER}",
        content_type=OCTET_STREAM,
    ),
    Route(
        "GET", "/v1/market", Coordinator.market_view, "Clearing price, supply, demand", response=MarketView
    ),
    Route(
        "POST",
        "/v1/market/quote",
        Coordinator.quote,
        "What a run would get now and cost: peers, price, speed, time (launch --dry-run; changes nothing)",
        body=QuoteBody,
        response=QuoteView,
    ),
    Route(
        "POST",
        "/v1/market/clear",
        Coordinator.clear_market,
        "Run a clearing round now (admin)",
        auth="admin",
        response=ClearingRoundView,
    ),
)


def create_app(coordinator: Coordinator) -> web.Application:
    # aiohttp's own limit sits above ours so that our check produces the documented error body.
    app = web.Application(
        middlewares=[errors_and_metrics(coordinator.metrics)],
        client_max_size=coordinator.settings.max_body_bytes + 1,
    )
    for route in ROUTES:
        app.router.add_route(route.method, route.path, coordinator.endpoint(route))
    app.cleanup_ctx.append(coordinator.background)
    return app

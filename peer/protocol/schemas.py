"""Request and response bodies of the coordinator's HTTP API: the types every body uses (money, accounts,
errors, content types and headers), accounts and the ledger, offers, leases, peers and the market.

The bodies about runs are in :mod:`peer.protocol.run_schemas`. These models are the single source of
truth: handlers validate with them, the client builds bodies from them and ``/openapi.json`` is generated
from them. Money is always a decimal string.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

from peer.protocol.money import INTEGER_DIGITS, PLACES, parse_money

Money = Annotated[
    Decimal,
    BeforeValidator(parse_money),
    PlainSerializer(lambda d: f"{d:.{PLACES}f}", return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": rf"^[0-9]{{1,{INTEGER_DIGITS}}}(\.[0-9]{{1,{PLACES}}})?$",
            "example": "12.50",
        }
    ),
]


def _positive(amount: Decimal) -> Decimal:
    if amount <= 0:
        raise ValueError(f"{amount} must be greater than 0")
    return amount


PositiveMoney = Annotated[Money, AfterValidator(_positive)]
AccountId = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="64 lowercase hex characters")]
Role = Literal["trainer", "validator"]
MSGPACK = "application/msgpack"  # the content type of msgpack bodies, both ways
OCTET_STREAM = "application/octet-stream"  # model files, both ways
TIME_HEADER = "X-Hivemarket-Time"  # the coordinator's clock (Unix seconds) when it answered; on every answer
SHA256_HEADER = "X-Hivemarket-Sha256"  # a model's SHA-256: declared (and signed) on upload, sent on download


# The error type of a check whose field is not where pydantic would locate it (a model-level check, or a
# dotted path inside the run spec); the API reports ``ctx["field"]`` as the field at fault.
FIELD_ERROR = "field_error"


def field_error(field: str, message: str) -> PydanticCustomError:
    """A validation error that names ``field`` (a dotted path) instead of the validator's location."""
    return PydanticCustomError(FIELD_ERROR, "{message}", {"field": field, "message": message})


class Body(BaseModel):
    """Request bodies reject unknown fields: a typo must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


class View(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(View):
    code: str
    message: str
    field: str | None = None


class ErrorBody(View):
    error: ErrorDetail


# ------------------------------------------------------------------------------------------------ accounts


class DepositBody(Body):
    amount: PositiveMoney = Field(description="Amount to credit, > 0.")


class WithdrawBody(Body):
    amount: PositiveMoney = Field(
        description="Amount to pay out, > 0: drawn from the account's earnings first, then its balance."
    )


class TransferBody(WithdrawBody):
    """Money moved to another account's balance, drawn as a withdrawal is."""

    to: AccountId = Field(description="The account whose balance is credited; not the sender's own.")


class AccountView(View):
    account: AccountId
    balance: Money = Field(
        description="Deposits, transfers received and runs' refunds, less the budgets of runs launched and "
        "what was withdrawn or transferred beyond the earnings: what a launch can escrow."
    )
    escrow: Money = Field(description="Funds held for the runs this account launched.")
    earned: Money = Field(
        description="Pay for verified work and audit fees, less what was withdrawn or transferred from it."
    )
    withdrawn: Money = Field(description="Paid out of the market to this account's owner, in all.")
    reputation: float = Field(description="0..1, from lease uptime and lapses (and audits, later).")


class LedgerAuditView(View):
    conserved: bool
    deposits: Money
    holdings: Money = Field(description="Sum of every balance, escrow, earning, fee and withdrawal.")
    reason: str = Field("", description="Why the ledger is, or is not, conserved; names books that differ.")
    entries_checked: int = Field(
        0,
        description="Ledger entries this audit replayed: those added since the last audit for the public one,"
        " every entry for the admin's replay, none for a check of the books alone.",
    )
    last_entry: int | None = Field(
        None, description="Id of the last entry replayed: the audit's running totals now reach it."
    )


# -------------------------------------------------------------------------------------------- offers, leases


class HardwareSummary(Body):
    gpu: str = Field(min_length=1, max_length=100, description='GPU model, or "cpu".')
    gpu_count: int = Field(ge=0, le=64)
    vram_gb: float = Field(ge=0, le=10_000)
    tflops: float = Field(gt=0, le=1_000_000, description="Measured by the probe's benchmark.")
    ram_gb: float = Field(ge=0, le=1_000_000)
    cpu_cores: int = Field(ge=1, le=100_000)
    power_w: float | None = Field(
        None, ge=0, le=100_000, description="Power the GPUs drew at the end of the probe's benchmark (NVML)."
    )
    thermal_headroom_c: float | None = Field(
        None,
        ge=-300,
        le=300,
        description="Degrees C between the hottest GPU and the temperature where it starts to slow down "
        "(NVML); null where the GPU does not say.",
    )


class OfferBody(Body):
    price_per_hour: Money = Field(description="Ask, money per GPU-hour (0 for a volunteer).")
    hardware: HardwareSummary
    roles: list[Role] = Field(default_factory=lambda: ["trainer"], min_length=1, max_length=2)
    min_lease_seconds: int = Field(0, ge=0, le=30 * 24 * 3600)
    peer_id: str | None = Field(None, max_length=100, description="The peer's libp2p id, for runs to dial.")
    maddrs: list[Annotated[str, Field(max_length=300)]] = Field(default_factory=list, max_length=16)


class Telemetry(Body):
    """What a peer's GPUs draw and how hot they run, read from NVML at each heartbeat (all GPUs of the
    offer together: power summed, temperature the hottest, utilisation the mean). Fields the GPU does not
    report are null."""

    power_w: float | None = Field(None, ge=0, le=100_000)
    temperature_c: float | None = Field(None, ge=-100, le=300)
    utilization_pct: float | None = Field(None, ge=0, le=100)
    throttled: bool | None = Field(
        None,
        description="Whether a GPU's clocks are held down for heat or power now (NVML's throttle reasons): "
        "a shortfall of delivered capacity it explains is re-rated, not held against the peer.",
    )
    clock_ratio: float | None = Field(
        None, gt=0, le=1, description="The slowest GPU's graphics clock over its maximum, while throttled."
    )


class HeartbeatBody(Body):
    """Optional: an empty body renews the lease alone."""

    telemetry: Telemetry | None = None


class LeaseView(View):
    id: str
    account: AccountId
    state: Literal["active", "lapsed", "released"] = Field(
        description="released: its offer was withdrawn (no lapse counted against the peer)."
    )
    heartbeat_interval: float
    expires_at: float = Field(description="Unix time the lease lapses without a heartbeat.")
    run_id: str | None = None
    price_per_hour: Money | None = Field(None, description="What the peer is paid when matched.")


class OfferView(View):
    account: AccountId
    price_per_hour: Money
    gpu: str
    gpu_count: int
    vram_gb: float
    tflops: float
    reliability: float
    roles: list[Role]
    min_lease_seconds: int
    state: Literal["open", "matched", "offline", "withdrawn"] = Field(
        description="offline: its lease lapsed (the peer went silent); withdrawn: its peer withdrew it."
    )
    claimed_tflops: float | None = Field(
        None, description="What the peer's probe claimed, when a run measured less and re-rated tflops."
    )
    capacity_flag: Literal["short", "throttled"] | None = Field(
        None,
        description="short: a run measured it well below its claim, unexplained (its reputation dropped); "
        "throttled: the same, explained by throttling its heartbeats reported (re-rated only).",
    )
    capacity_reason: str | None = Field(None, description="What the run measured, when flagged.")
    power_w: float | None = Field(None, description="Its probe's power draw, watts (NVML).")
    thermal_headroom_c: float | None = Field(None, description="Its probe's thermal headroom, degrees C.")
    watts_per_tflop: float | None = Field(None, description="power_w / tflops.")
    lease_id: str | None
    peer_id: str | None
    maddrs: list[str]
    updated_at: float


class OfferResponse(View):
    offer: OfferView
    lease: LeaseView


class OfferList(View):
    offers: list[OfferView]


class Health(View):
    status: str


class ReachBody(Body):
    port: int = Field(ge=1, le=65535, description="A TCP port this host listens on, for the coordinator.")


class ReachView(View):
    """Whether the coordinator could open a TCP connection to the asking host at the port it named: the
    peer's own check that others can dial it (else it is behind a NAT or a firewall)."""

    address: str = Field(description="The asking host's IP address, as the coordinator sees it.")
    port: int
    reachable: bool
    reason: str = Field(description="What the dial gave: connected, refused, timed out, ...")


# ---------------------------------------------------------------------------------------------------- market


class ClearingRoundView(View):
    at: float
    clearing_price: Money | None
    trades: int
    supply: int
    demand: int
    reason: str


class MarketView(View):
    clearing_price: Money | None = Field(
        description="Price per effective TFLOP-hour of the last round that traded."
    )
    supply: int = Field(description="Open offers with a live lease.")
    demand: int = Field(description="Peers wanted by recruiting runs.")
    rounds: list[ClearingRoundView]


class PeerView(View):
    """A peer as the market sees it: its offer, standing, verified work, earnings and last telemetry."""

    account: AccountId
    gpu: str
    gpu_count: int
    state: Literal["open", "matched", "offline", "withdrawn"]
    reliability: float
    samples: int = Field(description="Samples of its paid reports, every run (audits passed or none).")
    earned: Money = Field(
        description="As the account's: pay and audit fees not yet withdrawn or transferred."
    )
    audits_passed: int
    audits_failed: int
    capacity_flag: Literal["short", "throttled"] | None = Field(
        None, description="As its offer's: a run measured it well below the capacity it claimed."
    )
    run_id: str | None = Field(description="The run its lease is matched to.")
    telemetry: Telemetry | None = Field(description="Its last heartbeat's telemetry, if it sent any.")
    telemetry_at: float | None


class PeerList(View):
    peers: list[PeerView]

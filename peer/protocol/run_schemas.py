"""Request and response bodies of the coordinator's HTTP API about runs: creating one and what it would
cost (a quote), its view, joins, contribution reports, audits and the final model.

The rest of the API's bodies, and the types every body uses (money, accounts, errors, headers), are in
:mod:`peer.protocol.schemas`; together they are the single source of truth that ``/openapi.json`` is
generated from.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import re
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from peer.protocol.commitment import COMMITMENT_BYTES
from peer.protocol.schemas import AccountId, Body, Money, PositiveMoney, View, field_error
from peer.protocol.sketch import SKETCH_DIMS
from peer.protocol.spec import RunSpec, describe
from peer.protocol.states import AuditState, PayState, RunState

# ------------------------------------------------------------------------------------------------------ runs


SPEC_MAX_DEPTH = 32


def _check_plain_data(value: Any, where: str, depth: int) -> None:
    """A run spec is data that JSON and msgpack both carry: no bytes, no giant ints, bounded nesting."""
    if depth < 0:
        raise ValueError(f"{where} is nested more than {SPEC_MAX_DEPTH} levels deep")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has a non-string key {key!r}")
            _check_plain_data(item, f"{where}.{key}", depth - 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain_data(item, f"{where}[{i}]", depth - 1)
    elif isinstance(value, bool) or value is None or isinstance(value, str):
        return
    elif isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise ValueError(f"{where} = {value} does not fit in 64 bits")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} = {value} is not a finite number")
    else:
        raise ValueError(f"{where} holds a {type(value).__name__}, not JSON data")


def check_run_spec(spec: dict[str, Any]) -> RunSpec:
    """The spec as a :class:`peer.protocol.spec.RunSpec`, with ``stop.samples`` set; else an error naming
    the path.

    The coordinator counts samples, not epochs: it does not know the dataset's size, so the launcher turns
    ``stop.epochs`` into samples before posting (``RunSpec.target_samples``).
    """
    try:
        run_spec = RunSpec.model_validate(spec)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = ".".join(["spec", *(str(part) for part in first["loc"])])
        raise field_error(where, describe(e, "spec")) from None
    unresolved = run_spec.unresolved()
    if unresolved is not None:  # the coordinator knows neither the dataset's versions nor its size
        raise field_error(unresolved.split(":", 1)[0], unresolved)
    return run_spec


class BidBody(Body):
    """What a run asks of the market: the spec it trains, its price, peers and VRAM. A run adds its budget
    (:class:`RunBody`); a quote asks what such a run would get now (:class:`QuoteBody`)."""

    spec: dict[str, Any] = Field(
        description="The run spec (data, never code): a valid peer.protocol.spec.RunSpec with stop.samples "
        "set."
    )
    max_price: Money = Field(description="Highest price per effective TFLOP-hour.")
    peers_min: int = Field(ge=1, le=10_000)
    peers_max: int = Field(ge=1, le=10_000)
    min_vram_gb: float = Field(0.0, ge=0, le=10_000)

    @field_validator("spec")
    @classmethod
    def _valid_spec(cls, spec: dict[str, Any]) -> dict[str, Any]:
        _check_plain_data(spec, "spec", SPEC_MAX_DEPTH)
        check_run_spec(spec)
        return spec  # stored as given: defaults the coordinator would fill in stay the launcher's choice

    @field_validator("peers_max")
    @classmethod
    def _at_least_min(cls, peers_max: int, info: ValidationInfo) -> int:
        peers_min = info.data.get("peers_min")
        if peers_min is not None and peers_max < peers_min:
            raise ValueError(f"peers_max ({peers_max}) is below peers_min ({peers_min})")
        return peers_max

    @model_validator(mode="after")
    def _auditable(self) -> BidBody:
        refusal = unauditable(self.peers_min, check_run_spec(self.spec))
        if refusal is not None:
            raise field_error("peers_min", refusal)
        return self


class RunBody(BidBody):
    budget: PositiveMoney


class QuoteBody(BidBody):
    flops_per_sample: float | None = Field(
        None,
        gt=0,
        le=1e18,
        description="Floating-point operations one training sample costs (forward and backward), as the "
        "task on the launcher's machine counts them; without it the estimate leaves compute out.",
    )


def unauditable(peers_min: int, spec: RunSpec) -> str | None:
    """Why a run of at least ``peers_min`` peers could not be verified, if it could not: audits are
    recomputed by another peer of the run, so a run that may train with one peer would never pay nor
    count its work toward the target. (``launch`` asks before it contacts the coordinator.)"""
    if peers_min < 2 and spec.verification.rate > 0:
        return (
            f"peers_min ({peers_min}) must be at least 2 when spec.verification.rate > 0: another peer of "
            "the run recomputes each audit; set verification.rate = 0 to pay one peer unverified"
        )
    return None


class RunPeerView(View):
    """One match of a peer to the run (a peer that dropped and was matched again has two)."""

    account: AccountId
    lease_id: str
    price_per_hour: Money
    state: Literal["active", "dropped", "released", "left", "banned", "withdrawn"] = Field(
        description="dropped: its lease lapsed; withdrawn: its peer withdrew the offer; released: the run "
        "ended; left: it gave the place back; banned: its reports failed their audits."
    )
    matched_at: float
    joined: bool = Field(description="Whether the peer has joined the run's swarm.")
    joined_at: float | None = Field(description="When it first joined; its pay counts from then.")
    peer_id: str | None = Field(description="The libp2p id it joined with.")
    maddrs: list[str] = Field(description="Where other peers reach it.")
    samples: int = Field(description="Samples of its paid reports under this match (audits passed or none).")
    paid: Money = Field(description="Paid for those reports.")
    last_report_at: float | None
    epoch: int | None = Field(None, description="The last epoch it reported under this match.")
    audits_passed: int = Field(0, description="Audits of its reports in this run that passed.")
    audits_failed: int = Field(0, description="Audits of its reports in this run that failed.")
    fees: Money = Field(Decimal(0), description="Earned in this run by auditing other peers' reports.")
    fees_held: Money = Field(
        Decimal(0), description="Audit fees held until it passes a canary or the run ends (forfeit: banned)."
    )
    canaries_passed: int = Field(0, description="Canary audits it answered right in this run.")
    canaries_failed: int = Field(0, description="Canary audits it answered wrong in this run.")
    validator_ban: str | None = Field(
        None, description="Why it may no longer validate this run (wrong canaries), or null."
    )
    tflops: float | None = Field(None, description="The capacity its match was priced on (TFLOP/s).")
    capacity_ratio: float | None = Field(
        None,
        description="What it delivers per TFLOP/s claimed over the median of the run's other peers, at most "
        "1 (coordinator.capacity); null until measured. Its pay is scaled by "
        "min(1, ratio * HIVEMARKET_CAPACITY_TOLERANCE).",
    )
    capacity_flag: Literal["short", "throttled"] | None = Field(
        None, description="short: well below its claim, unexplained; throttled: explained by throttling."
    )
    capacity_reason: str | None = Field(None, description="The measurement behind the ratio and flag.")
    energy_j_per_sample: float | None = Field(
        None,
        description="Joules per sample of its accepted reports: its heartbeats' power times their billed "
        "seconds (null without power readings).",
    )


class ModelView(View):
    sha256: str
    bytes: int
    uploaded_by: AccountId
    uploaded_at: float


class GroupMemberView(View):
    account: AccountId
    rank: int = Field(description="0..n-1, by when the peer was matched (then its account).")
    address: str | None = Field(
        description="The host:port its fast-path listener answers on; None: it cannot be reached directly."
    )


class GroupView(View):
    """Who all-reduces together in a run, decided by the coordinator (``coordinator.groups``); a new version
    means a new process group."""

    version: int = Field(ge=1, description="Grows by one each time the group changes.")
    path: Literal["fast", "hivemind"] = Field(
        description="fast: torch.distributed among the members; hivemind: its averager (a member cannot be "
        "reached directly, or one member could not reach another)."
    )
    members: list[GroupMemberView] = Field(description="In rank order.")
    reason: str = Field(description="Why this version exists, and why on its path.")
    formed_at: float


class RunView(View):
    id: str
    owner: AccountId
    name: str
    state: RunState
    reason: str = Field(description="Why the run is in its state.")
    state_since: float
    spec: dict[str, Any]
    max_price: Money
    peers_min: int
    peers_max: int
    min_vram_gb: float
    market_reason: str | None = Field(
        None,
        description="Why the last clearing round did not give the run every peer it bids for (the "
        "reason a recruiting or paused run waits); None when it got them or no round has looked yet.",
    )
    budget: Money
    escrow: Money
    held: Money = Field(
        Decimal(0), description="Pay of reports whose audits are pending (out of the escrow)."
    )
    spent: Money
    refunded: Money = Field(description="Returned from the escrow to the owner.")
    target_samples: int = Field(
        description="spec.stop.samples (0 for a run created before specs were validated: no target)."
    )
    samples: int = Field(
        description="Samples of paid reports (their audits passed, or the run audits nothing): the progress "
        "toward target_samples; reports held for audits count once they pass."
    )
    epoch: int = Field(description="Highest reported epoch + 1; 0 before any report.")
    loss: float | None = Field(description="Mean loss of the latest epoch that has reports.")
    peers: list[RunPeerView]
    model: ModelView | None
    created_at: float
    group: GroupView | None = Field(
        None, description="The training group's current version; None before any peer checked in."
    )

    @property
    def waiting_for(self) -> str | None:
        """Why the run waits for peers, while it does (recruiting or paused): the market's reason."""
        return self.market_reason if self.state in ("recruiting", "paused") else None


class RunList(View):
    runs: list[RunView]


class QuoteView(View):
    """What a run would get from the market now, and what it would cost: ``launch --dry-run``.

    The figures are ranges (low, mid, high). ``basis`` says what the speed rests on: ``measured`` (the
    epoch times of accepted reports of the same task and batch in this market) or ``probe`` (the matched
    offers' benchmark TFLOP/s for compute, plus a round-time prior), explained in ``basis_note``.
    """

    offers_open: int = Field(description="Open offers that train.")
    offers_with_vram: int = Field(description="Of those, the ones with the VRAM the run needs.")
    offers_affordable: int = Field(description="Of those, the ones asking at most the bid.")
    peers: int = Field(description="Peers a clearing round would give the run now.")
    reason: str | None = Field(description="Why fewer than peers_max, if so (as runs show says it).")
    unit_price: Money | None = Field(description="The clearing price per effective TFLOP-hour.")
    price_per_hour: Money = Field(description="What the matched peers cost together per hour.")
    basis: Literal["measured", "probe"]
    basis_note: str
    steps: int = Field(description="Optimizer steps to the spec's stop.samples.")
    samples_per_second: tuple[float, float, float] = Field(description="The swarm's (low, mid, high).")
    seconds: tuple[float, float, float] = Field(description="Wall clock of training (low, mid, high).")
    cost: tuple[Money, Money, Money] = Field(
        description="Pay and audit fees out of the escrow (low, mid, high)."
    )
    audit_share: float = Field(description="Expected audit fees as a share of the pay.")


# ---------------------------------------------------------------------------------------- joins, reports


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Sketch = Annotated[list[FiniteFloat], Field(min_length=SKETCH_DIMS, max_length=SKETCH_DIMS)]
SQLITE_INT_MAX = 2**63 - 1


class JoinBody(Body):
    peer_id: str = Field(min_length=1, max_length=100, description="The peer's libp2p id in the run's swarm.")
    maddrs: list[Annotated[str, Field(max_length=300)]] = Field(
        max_length=16,
        description="Multiaddrs other peers dial. None: the peer is behind a NAT and cannot be dialed yet "
        "(it joins again with its relayed addresses once it found a peer to relay for it).",
    )


class MicroBatch(Body):
    ids: list[Annotated[int, Field(ge=0, le=SQLITE_INT_MAX)]] = Field(
        min_length=1, max_length=65536, description="Sample ids (the deterministic data assignment)."
    )
    loss: FiniteFloat = Field(ge=0)
    sketch: Sketch = Field(description="Random projection of the micro-batch's gradient.")


#: The most commitments a report forwards (a larger round's members each forward this many, starting at
#: their own, so that every member's commitment reaches the coordinator: peer.trainer).
MAX_ROUND_MEMBERS = 256


class RoundCommitment(Body):
    """A member's signed commitment to what it put into the fast-path round that applied an epoch
    (:class:`peer.protocol.commitment.Commitment`, encoded), as the reporting peer gathered it."""

    account: AccountId
    commitment: str = Field(
        pattern=f"^[0-9a-f]{{{2 * COMMITMENT_BYTES}}}$",
        description=f"The commitment's {COMMITMENT_BYTES} bytes in lowercase hex, signed by `account`.",
    )


class ReportBody(Body):
    """A peer's contribution for one epoch; ``samples`` must equal the number of ids of its micro-batches."""

    epoch: int = Field(ge=0, le=1 << 40)
    samples: int = Field(ge=1, le=1 << 50)
    loss: FiniteFloat = Field(ge=0, description="Mean training loss over the epoch's samples.")
    seconds: FiniteFloat = Field(gt=0, le=86400, description="Compute time of the epoch's work.")
    group_size: int = Field(ge=1, le=100_000, description="Peers in the epoch's averaging round.")
    param_sketch: Sketch = Field(description="Sketch of the parameters at the epoch's start.")
    micro_batches: list[MicroBatch] = Field(min_length=1, max_length=4096)
    device: str = Field(
        "cpu",
        min_length=1,
        max_length=100,
        description="What computed the gradients (`cpu`, or the GPU's name): random layers such as dropout "
        "draw the same masks only on the same kind of device.",
    )
    round: list[RoundCommitment] = Field(
        default_factory=list,
        max_length=MAX_ROUND_MEMBERS,
        description="The signed commitments gathered in the round that applied this epoch, one per "
        "member (on either path): the coordinator checks each against its member's own report.",
    )

    @model_validator(mode="after")
    def _samples_are_the_ids(self) -> ReportBody:
        ids = [i for batch in self.micro_batches for i in batch.ids]
        if self.samples != len(ids):
            raise field_error(
                "samples", f"samples ({self.samples}) must equal the number of micro-batch ids ({len(ids)})"
            )
        if len(set(ids)) != len(ids):
            raise field_error("micro_batches", "a sample id appears twice in one epoch's report")
        accounts = [c.account for c in self.round]
        if len(set(accounts)) != len(accounts):
            raise field_error("round", "a member's commitment appears twice; each member has one per round")
        return self


class BlameBody(Body):
    """A member's accusation after a fast-path round whose result did not match the commitments: every
    member revealed what it had put in, and the ``accused`` revealed other than it committed to
    (:mod:`peer.collective`). A member's epoch fails once most of the round's other members blame it."""

    epoch: int = Field(ge=0, le=1 << 40)
    version: int = Field(ge=1, le=1 << 62, description="The group version the round ran on.")
    accused: list[AccountId] = Field(min_length=1, max_length=64)
    reason: str = Field("", max_length=300)


class BlameView(View):
    failed: list[AccountId] = Field(
        description="The accused whom most of the round's other members have now blamed: their epoch failed."
    )


class MicroBatchView(View):
    ids: list[int]
    loss: float | None = Field(description="Hidden (null) while the report's audits are pending.")
    sketch: list[float] | None = Field(
        description="Hidden (null) while the report's audits are pending: a validator recomputes it blind."
    )


class ReportView(View):
    run_id: str
    account: AccountId
    epoch: int
    samples: int
    loss: float
    seconds: float
    group_size: int
    paid: Money = Field(
        description="The report's pay: the matched price for min(seconds, wall clock), capped by the escrow; "
        "it reaches the peer only once pay_state is paid."
    )
    pay_state: PayState = Field(
        description="held while audits are pending; voided when one failed or expired (back to escrow)."
    )
    pay_reason: str
    accepted_at: float
    param_sketch: list[float]
    micro_batches: list[MicroBatchView]


class ReportList(View):
    reports: list[ReportView]


class LossPoint(View):
    epoch: int
    loss: float = Field(description="Mean training loss of the epoch's reports, weighted by samples.")
    samples: int


class LossCurve(View):
    run_id: str
    points: list[LossPoint]


#: The most audits one claim may take.
MAX_AUDIT_CLAIM = 64


class AuditClaimBody(Body):
    limit: int = Field(4, ge=1, le=MAX_AUDIT_CLAIM, description="Most audits to take at once.")


class AuditTask(View):
    """An audit given to a validator: recompute micro-batch ``index`` of ``account``'s report of ``epoch``
    at the parameters whose sketch is ``param_sketch``, on the samples ``ids``."""

    id: str
    run_id: str
    epoch: int
    account: AccountId
    index: int
    ids: list[int]
    param_sketch: list[float]
    device: str = Field(description="What computed the audited gradients (ReportBody.device).")


class AuditTaskList(View):
    audits: list[AuditTask]


class AuditResultBody(Body):
    """A validator's answer: the recomputed gradient sketch and loss, or why it cannot recompute (it does
    not hold that epoch's parameters, say); a declined audit goes to another validator."""

    sketch: Sketch | None = None
    loss: FiniteFloat | None = Field(None, ge=0)
    declined: str | None = Field(None, min_length=1, max_length=300)

    @model_validator(mode="after")
    def _one(self) -> AuditResultBody:
        if self.declined is None and (self.sketch is None or self.loss is None):
            raise field_error("sketch", "send sketch and loss, or declined with a reason")
        if self.declined is not None and (self.sketch is not None or self.loss is not None):
            raise field_error("declined", "a declined audit carries no sketch or loss")
        return self


class AuditView(View):
    id: str
    run_id: str
    epoch: int
    account: AccountId = Field(description="The audited peer.")
    index: int = Field(description="The micro-batch of its report that is recomputed.")
    samples: int
    state: AuditState
    validator: AccountId | None = Field(description="Who holds or held the audit.")
    distance: float | None = Field(description="Relative distance of the claimed and recomputed sketch.")
    reason: str
    fee: Money = Field(description="Paid to the validators from the run's escrow.")
    first_failure: dict[str, str] | None = Field(
        None,
        description="A failure waiting for (or decided by) a second validator: its validator and reason.",
    )
    canary_of: str | None = Field(
        None,
        description="A decided canary: the audit whose known answer it checked its validator against "
        "(pending canaries are not listed).",
    )
    created_at: float
    decided_at: float | None


class AuditList(View):
    audits: list[AuditView]


# -------------------------------------------------------------------------------- the group, rendezvous


RENDEZVOUS_VALUE_BYTES = 64 << 10
_HOSTNAME = re.compile(
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def check_address(address: str) -> str:
    """``host:port``: a host name, an IPv4 address or a bracketed IPv6 address, and a port 1-65535."""
    host, colon, port = address.rpartition(":")
    if not colon or not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{address[:80]!r} is not host:port with a port 1-65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{host[:80]!r} is not an IPv6 address") from None
    elif not _HOSTNAME.fullmatch(host):
        raise ValueError(f"{host[:80]!r} is not a host name or address (IPv6 goes in brackets)")
    return address


RendezvousKey = Annotated[
    str,
    Field(
        min_length=1,
        max_length=200,
        pattern=r"^[\x20-\x7e]+$",
        description="Printable ASCII. A key whose last '/'-separated part is a number belongs to that rank.",
    ),
]


class CheckinBody(Body):
    """A member's (or would-be member's) word to the coordinator: where it is reached, the group version it
    is on, and what went wrong there. The answer is the group to be in."""

    address: Annotated[str, Field(max_length=300), AfterValidator(check_address)] | None = Field(
        None,
        description="host:port of this peer's fast-path listener; None: it cannot be reached directly "
        "(client mode, behind NAT).",
    )
    version: int | None = Field(None, ge=1, le=1 << 62, description="The group version this peer is on.")
    failed_version: int | None = Field(
        None,
        ge=1,
        le=1 << 62,
        description="A version whose collective failed for this peer: it asks for a new group.",
    )
    unreachable: list[AccountId] = Field(
        default_factory=list,
        max_length=1024,
        description="Members of `version` this peer could not connect to.",
    )
    wait_ms: int = Field(
        0,
        ge=0,
        le=5000,
        description="With `version`: while it is still the current one, wait up to this long for the next "
        "(a long poll); answered as soon as one forms, or when a failed `version` is due to regroup.",
    )


def _check_base64(value: str) -> str:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None
    if len(raw) > RENDEZVOUS_VALUE_BYTES:
        raise ValueError(f"holds {len(raw)} bytes, more than {RENDEZVOUS_VALUE_BYTES}")
    return value


class RendezvousSetBody(Body):
    """Write one key of the run's rendezvous store for a group version (members only, each its own keys)."""

    version: int = Field(ge=1, le=1 << 62, description="The run's current group version.")
    key: RendezvousKey
    value: Annotated[
        str, Field(max_length=4 * -(-RENDEZVOUS_VALUE_BYTES // 3)), AfterValidator(_check_base64)
    ] = Field(description="Base64 of at most 64 KiB.")


class RendezvousGetBody(Body):
    """Read keys of the run's rendezvous store, waiting up to ``wait_ms`` for them all to be written."""

    version: int = Field(ge=1, le=1 << 62, description="The run's current group version.")
    keys: list[RendezvousKey] = Field(min_length=1, max_length=64)
    wait_ms: int = Field(0, ge=0, le=5000, description="Longest wait for a missing key (a long poll).")


class RendezvousWritten(View):
    version: int
    key: str
    bytes: int = Field(description="Length of the value written.")


class RendezvousValues(View):
    values: dict[str, str] = Field(
        description="Key to base64 value, for the keys present (missing: left out)."
    )

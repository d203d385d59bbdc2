"""The run spec: what a researcher launches, as TOML, validated into :class:`RunSpec`.

A spec is data, never code: it names a task that peers have installed (entry-point group
``hivemarket.tasks``) and sets the training recipe. The same model validates the file on the launcher's
machine, the body at the coordinator and the assignment on each peer, so a mistake is reported with the
field's dotted path wherever it is caught.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class SpecError(ValueError):
    """A spec that cannot be used; the message names the field and the reason."""


class Section(BaseModel):
    # strict: `seed = true` or `target = "256"` is a mistake to report, not a value to convert
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DatasetSpec(Section):
    version: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="The dataset's version (manifest SHA-256). `hivemarket launch` fills it in when the "
        "location serves one dataset, or one called `name`.",
    )
    name: str | None = Field(None, max_length=200, description="Picks the dataset by name at launch.")
    location: str = Field(
        min_length=1,
        max_length=500,
        description="Where peers fetch it: a dataset server's URL (e.g. the coordinator's /datasets) or a "
        "folder. `coordinator` means the run's coordinator serves it.",
    )
    test_every: int = Field(
        5, ge=2, le=1000, description="Every N-th sample (id % N == N - 1) is held out for evaluation."
    )


class OptimizerSpec(Section):
    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(3e-3, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0, le=1)
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD only.")


class ScheduleSpec(Section):
    name: Literal["constant", "linear", "cosine"] = "constant"
    warmup_epochs: int = Field(
        0, ge=0, le=1_000_000, description="Linear warm-up from 0, in optimizer steps."
    )


class BatchSpec(Section):
    # bounded so that one epoch's report (every sample id) fits in a request: 65,536 ids, 4,096 micro-batches
    target: int = Field(256, ge=1, le=1 << 16, description="Samples per optimizer step, over all peers.")
    per_peer: int = Field(32, ge=1, le=1 << 16, description="Micro-batch size on one peer.")

    @model_validator(mode="after")
    def _fits(self) -> BatchSpec:
        if self.per_peer > self.target:
            raise ValueError(f"per_peer ({self.per_peer}) exceeds target ({self.target})")
        if -(-self.target // self.per_peer) > 4096:
            raise ValueError(
                f"target / per_peer is more than 4096 micro-batches ({self.target} / {self.per_peer})"
            )
        return self


class StopSpec(Section):
    samples: int | None = Field(None, ge=1, le=1 << 50, description="Total training samples of the run.")
    epochs: float | None = Field(None, gt=0, le=1_000_000, description="Passes over the training split.")

    @model_validator(mode="after")
    def _one(self) -> StopSpec:
        if (self.samples is None) == (self.epochs is None):
            raise ValueError("set exactly one of samples and epochs")
        return self


class AveragingSpec(Section):
    matchmaking_seconds: float = Field(
        1.0, gt=0, le=600, description="How long a round waits for peers that are not there yet."
    )
    timeout_seconds: float = Field(
        15.0, gt=0, le=3600, description="A round that has not finished by then is abandoned."
    )
    compression: Literal["none", "fp16", "8bit"] = "none"
    path: Literal["auto", "hivemind"] = Field(
        "auto",
        description="auto: the run all-reduces on torch.distributed (gloo) while every live peer can reach "
        "every other directly, and on hivemind's averager otherwise; hivemind: always hivemind's averager. "
        "On the fast path 8bit compression sends fp16.",
    )
    overlap: bool = Field(
        False,
        description="On the fast path, the all-reduce of epoch t runs while epoch t+1 computes (at "
        "parameters predicted from the optimizer's state), and the step after epoch t+1 applies epoch t's "
        "average: the round leaves the step's critical path. Off by default: peers replaced mid-run cost "
        "far more with it (docs/training.md, 'Overlapped rounds'). Gradient runs only: with local_updates, "
        "and on hivemind's path, rounds are synchronous.",
    )
    local_updates: bool = Field(
        False,
        description="DiLoCo style: each peer takes inner optimizer steps on its share of the batch and the "
        "peers average the parameter change (an outer step) instead of every gradient.",
    )
    outer_lr: float = Field(0.7, gt=0, le=10, description="Outer step size (local_updates only).")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="Outer Nesterov momentum (local_updates).")

    @model_validator(mode="after")
    def _ordered(self) -> AveragingSpec:
        if self.timeout_seconds <= self.matchmaking_seconds:
            raise ValueError(
                f"timeout_seconds ({self.timeout_seconds:g}) must exceed matchmaking_seconds "
                f"({self.matchmaking_seconds:g})"
            )
        return self


class PeersSpec(Section):
    min: int = Field(1, ge=1, le=10_000)
    max: int = Field(4, ge=1, le=10_000)
    wait_seconds: float = Field(
        120.0, gt=0, le=7 * 24 * 3600, description="How long a paused run waits for replacements."
    )
    recruit_seconds: float = Field(
        600.0,
        gt=0,
        le=7 * 24 * 3600,
        description="How long a new run may recruit before it has min peers; then it fails, with the "
        "market's reason, and its escrow is refunded in full.",
    )
    min_vram_gb: float = Field(
        0.0, ge=0, le=10_000, description="GPU memory each peer needs, in GB; offers with less never match."
    )

    @model_validator(mode="after")
    def _ordered(self) -> PeersSpec:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        return self


class VerificationSpec(Section):
    """How the coordinator audits contributions (:mod:`coordinator.verification`); ``rate = 0`` turns audits
    off and pays reports unverified."""

    rate: float = Field(
        0.03, ge=0, le=1, description="Share of reported micro-batches a validator recomputes."
    )
    min_audits: int = Field(
        2, ge=1, le=64, description="Micro-batches audited in every report at least (all if it has fewer)."
    )
    tolerance: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="Largest relative distance between the reported and the recomputed gradient sketch "
        "(calibrated on honest peers: bench/verification.py).",
    )
    loss_tolerance: float = Field(
        0.05, gt=0, lt=1, description="Largest relative difference between reported and recomputed loss."
    )
    ban_after: int = Field(
        2, ge=1, le=1000, description="Failed epochs after which a peer is banned from the run."
    )
    canary_rate: float = Field(
        0.25,
        ge=0,
        le=1,
        description="Share of a validator's epochs that carry one canary: an audit whose answer the "
        "coordinator already holds (docs/verification.md); 0 turns canaries off and pays audit fees at once.",
    )
    canary_window: int = Field(
        4,
        ge=1,
        le=1000,
        description="Canaries are drawn from the run's last this many epochs (at most the peers' "
        "HIVEMARKET_AUDIT_WINDOW), whose claimed sketches stay hidden while the run takes reports.",
    )


class PriceSpec(Section):
    max: str | None = Field(
        None, max_length=32, description="Highest price per effective TFLOP-hour (launch --max-price wins)."
    )
    budget: str | None = Field(None, max_length=32, description="Escrowed budget (launch --budget wins).")


class RunSpec(Section):
    name: str = Field(pattern=NAME_PATTERN, description="Letters, digits, `_.-`; at most 64 characters.")
    task: str = Field(pattern=NAME_PATTERN, description="A task peers have installed (`hivemarket.tasks`).")
    options: dict[str, float | int | str | bool] = Field(
        default_factory=dict, max_length=64, description="Task options (the task validates them)."
    )
    seed: int = Field(0, ge=0, lt=1 << 63)
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: peers whose GPU computes bfloat16 natively (compute capability 8.0+) train under "
        "bfloat16 autocast; other peers, and every validator, compute in float32 (bench/verification.py "
        "measures honest bf16 work against float32 recomputation well within the audit tolerance).",
    )
    dataset: DatasetSpec
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    batch: BatchSpec = BatchSpec()
    stop: StopSpec
    averaging: AveragingSpec = AveragingSpec()
    peers: PeersSpec = PeersSpec()
    verification: VerificationSpec = VerificationSpec()
    price: PriceSpec = PriceSpec()

    @model_validator(mode="after")
    def _auditable(self) -> RunSpec:
        if self.verification.rate > 0 and self.averaging.local_updates:
            raise ValueError(
                "averaging.local_updates: audits recompute gradients at the epoch's start parameters, which "
                "inner steps move away from; set verification.rate = 0 to run local updates unverified"
            )
        return self

    def unresolved(self) -> str | None:
        """Why the coordinator cannot take this spec as it is (the launcher resolves both), or None."""
        if self.dataset.version is None:
            return "spec.dataset.version: required; `hivemarket launch` fills it in from the location"
        if self.stop.samples is None:
            return "spec.stop.samples: required; `hivemarket launch` converts stop.epochs into samples"
        return None

    def target_samples(self, train_samples: int) -> int:
        """The run's total samples: ``stop.samples``, or ``stop.epochs`` passes over the training split."""
        if self.stop.samples is not None:
            return self.stop.samples
        assert self.stop.epochs is not None
        return max(1, round(self.stop.epochs * train_samples))


def validate_spec(data: Any) -> RunSpec:
    """A spec from plain data, or :class:`SpecError` naming the first bad field (``spec.batch.target``)."""
    try:
        return RunSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(describe(e, "spec")) from None


def describe(error: ValidationError, root: str) -> str:
    """One line: the dotted path of the first error, what is wrong, and the value that was given."""
    first = error.errors(include_url=False)[0]
    where = ".".join([root, *(str(part) for part in first["loc"])])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] not in ("value_error", "missing"):
        given = repr(first.get("input"))
        message += f" (got {given if len(given) <= 60 else given[:57] + '...'})"
    return f"{where}: {message}"


def load_spec(path: Path) -> RunSpec:
    """Read and validate a TOML spec; :class:`SpecError` says which file, field and why."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SpecError(f"cannot read spec {path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"{path} is not valid TOML: {e}") from None
    try:
        return validate_spec(data)
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from None

"""How a peer contributes to an epoch: honestly, or, to show and test that audits catch them, one of four
cheats (``HIVEMARKET_ADVERSARY``, ``hivemarket demo --adversaries``).

A contribution is what the rest of the swarm and the coordinator see of a peer's epoch: the update it
puts into the all-reduce and the micro-batches it reports (sample ids, loss, gradient sketch). The cheats:

- ``free-rider``: computes nothing, puts zeros into the all-reduce and reports its share of the samples
  with made-up sketches;
- ``random-gradient``: computes nothing and sends random noise, reporting sketches of that noise;
- ``inflated-samples``: computes its share honestly, then reports as many samples again (the ids that
  come next in its own order, which it did not process; fewer near the end of a pass) with sketches
  copied from the ones it computed, and weighs its update in the all-reduce by the inflated count;
- ``replay``: computes its first epoch honestly, then sends that epoch's update again every epoch,
  reporting sketches of the old gradients under the new epoch's projections;
- ``capacity-liar``: trains and reports honestly, but its offer claims ``HIVEMARKET_CAPACITY_LIE`` (4)
  times the TFLOP/s its probe measured, to be matched at that many times the hourly price; the
  coordinator's measure of delivered capacity catches it (:mod:`coordinator.capacity`), not audits;
- ``noisy-round`` (fast path only): works and reports honestly, then sends a noisy update into the
  all-reduce; audits cannot see it, the round's commitment check does (:mod:`peer.collective`), and the
  members' reveal of what each sent finds it;
- ``lazy-validator``: trains and reports honestly, but answers the audits it validates without
  recomputing them (:class:`LazyValidator`); the coordinator's canaries catch it;
- ``poisoned-round`` (fast path only): works and reports honestly, then sends, and commits to, four times
  the opposite of its update (gradient ascent, which wrecks the model when applied). The round's check
  passes, since it committed to what it sent; the coordinator's check of its commitment against its own
  report does not (:mod:`peer.protocol.commitment`).

None of them can produce the sketch of a gradient it did not compute, so an audit of any micro-batch
they did not compute fails. A cheater would write its own code, of course; these exist so that users
can watch the audits work and tests can measure how often they do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

import torch

from peer.data.loader import map_tensors
from peer.data.reader import DatasetReader
from peer.protocol.run_schemas import AuditResultBody, AuditTask
from peer.settings import AdversaryKind
from peer.sketch import Sketcher
from peer.tasks import Task, trained_parameters
from peer.validator import compute_micro_batches

#: The capacity liar: caught by the coordinator's measure of delivered capacity, not by audits.
CAPACITY_LIAR: AdversaryKind = "capacity-liar"
#: The cheats of a fast-path round: they report honestly; the round's checks catch them (peer.collective,
#: peer.protocol.commitment).
ROUND_KINDS: tuple[AdversaryKind, ...] = ("noisy-round", "poisoned-round")
#: The cheats that audits catch (``demo --adversaries``).
KINDS: tuple[AdversaryKind, ...] = tuple(
    k for k in get_args(AdversaryKind) if k not in (*ROUND_KINDS, CAPACITY_LIAR, "lazy-validator")
)
#: The cheats of a validator (``demo --adversaries``): they report honestly, canaries catch them.
VALIDATOR_KINDS: tuple[AdversaryKind, ...] = ("lazy-validator",)


@dataclass
class Contribution:
    micro: list[dict[str, Any]]  # {"ids", "loss", "sketch"} per reported micro-batch
    update: list[torch.Tensor]  # what goes into the all-reduce (the samples-weighted mean gradient)
    grads: list[list[torch.Tensor]] | None = None  # per micro-batch, when asked for


@dataclass
class EpochWork:
    """What a peer has at hand for one epoch: its micro-batches, the epoch's sketcher, the honest work
    (``compute(keep_grads)``, run only if called) and ids beyond its share (``spare_ids(n)``)."""

    chunks: list[list[int]]
    sketch: Sketcher
    compute: Callable[[bool], Contribution]
    spare_ids: Callable[[int], list[int]]
    shapes: list[torch.Size]


def local_work(
    task: Task,
    model: torch.nn.Module,
    reader: DatasetReader,
    chunks: list[list[int]],
    sketch: Sketcher,
    seed: Callable[[int], int],
    spare_ids: Callable[[int], list[int]] = lambda n: [],
    device: torch.device | str | None = None,
) -> EpochWork:
    """The epoch of a peer that computes in this process, reading batches one by one (the trainer uses a
    prefetching loader instead): for trials of the audits (bench/verification.py) and tests."""
    params = trained_parameters(model)
    total = sum(len(c) for c in chunks)

    def compute(keep_grads: bool) -> Contribution:
        update = [torch.zeros_like(p) for p in params]

        def accumulate(chunk: list[int], grads: list[torch.Tensor]) -> None:
            for u, g in zip(update, grads, strict=True):
                u.add_(g, alpha=len(chunk) / total)

        batches = (task.batch(reader.read(c)) for c in chunks)
        if device is not None:
            batches = (map_tensors(b, lambda t: t.to(device)) for b in batches)
        micro, kept = compute_micro_batches(
            task, model, params, chunks, batches, sketch, seed, accumulate, keep_grads=keep_grads
        )
        return Contribution(micro, update, kept)

    return EpochWork(chunks, sketch, compute, spare_ids, [p.shape for p in params])


class Honest:
    kind = "honest"

    def contribute(self, work: EpochWork) -> Contribution:
        return work.compute(False)

    def tamper(self, sent: torch.Tensor) -> None:
        """Change what goes into a fast-path round after the commitment to it was signed (an honest peer
        sends what it committed to)."""

    def answer(
        self,
        audit: AuditTask,
        recompute: Callable[[AuditTask], AuditResultBody],
        claim: Callable[[AuditTask], tuple[list[float], float] | None],
    ) -> AuditResultBody:
        """The answer to an audit this peer validates: an honest validator recomputes it (``claim``, what
        it could learn of the audited report's claim, is there for :class:`LazyValidator`)."""
        return recompute(audit)


class FreeRider(Honest):
    kind = "free-rider"

    def contribute(self, work: EpochWork) -> Contribution:
        micro = [{"ids": c, "loss": 1.0, "sketch": [0.0] * work.sketch.dims} for c in work.chunks]
        return Contribution(micro, [torch.zeros(s) for s in work.shapes])


class RandomGradient(Honest):
    kind = "random-gradient"

    def __init__(self, scale: float = 0.01):
        self.scale = scale

    def contribute(self, work: EpochWork) -> Contribution:
        noise = [[torch.randn(s) * self.scale for s in work.shapes] for _ in work.chunks]
        micro = [
            {"ids": c, "loss": 1.0, "sketch": work.sketch(n)} for c, n in zip(work.chunks, noise, strict=True)
        ]
        update = [sum(parts) / len(noise) for parts in zip(*noise, strict=True)]
        return Contribution(micro, update)


class InflatedSamples(Honest):
    kind = "inflated-samples"

    def contribute(self, work: EpochWork) -> Contribution:
        honest = work.compute(False)
        if not work.chunks:
            return honest
        extra = work.spare_ids(sum(len(c) for c in work.chunks))
        size = len(work.chunks[0])
        fakes = [extra[o : o + size] for o in range(0, len(extra), size)]
        copied = [
            {
                "ids": ids,
                "loss": honest.micro[i % len(honest.micro)]["loss"],
                "sketch": honest.micro[i % len(honest.micro)]["sketch"],
            }
            for i, ids in enumerate(fakes)
        ]
        return Contribution(honest.micro + copied, honest.update)


class Replay(Honest):
    kind = "replay"

    def __init__(self) -> None:
        self.saved: Contribution | None = None

    def contribute(self, work: EpochWork) -> Contribution:
        if self.saved is None or not self.saved.micro:
            computed = work.compute(True)
            # its own copy: the trainer reuses the update's tensors next epoch
            self.saved = Contribution(
                computed.micro, [u.detach().clone() for u in computed.update], computed.grads
            )
            return self.saved
        saved, grads = self.saved, self.saved.grads
        assert grads is not None
        micro = [
            {
                "ids": c,
                "loss": saved.micro[i % len(saved.micro)]["loss"],
                "sketch": work.sketch(grads[i % len(grads)]),
            }
            for i, c in enumerate(work.chunks)
        ]
        return Contribution(micro, saved.update)


class NoisyRound(Honest):
    """Computes and reports honestly (every audit of its reports passes), then adds noise as large as its
    update to what it sends into the fast path's all-reduce, after committing to the honest update. The
    commitment check makes every member refuse such a round, and the reveal that follows, where it sends
    the same noise again, blames it (:mod:`peer.collective`)."""

    kind = "noisy-round"

    def tamper(self, sent: torch.Tensor) -> None:
        scale = float(sent.norm()) / max(1.0, sent.numel()) ** 0.5
        sent.add_(torch.randn_like(sent), alpha=scale or 1e-3)


class PoisonedRound(Honest):
    """Reports its honest micro-batches and puts ``-scale`` times its honest update into the round."""

    kind = "poisoned-round"

    def __init__(self, scale: float = 4.0):
        self.scale = scale

    def contribute(self, work: EpochWork) -> Contribution:
        honest = work.compute(False)
        return Contribution(honest.micro, [u.mul(-self.scale) for u in honest.update])


class LazyValidator(Honest):
    """Trains and reports honestly, but never recomputes an audit: it answers with the audited report's
    claimed sketch and loss when it can learn them (``claim``: a colluding reporter, or the API, which
    shows a report's claims once its audits are decided and it can no longer be a canary's source), and
    otherwise with a made-up answer, the sketch and loss of a micro-batch it computed itself. A made-up
    answer fails any audit; an echoed claim passes an honest report's audit but not a canary whose
    claim it cannot learn, nor one drawn from a confirmed failure (:mod:`coordinator.verification`)."""

    kind = "lazy-validator"

    def __init__(self) -> None:
        self.own: dict[str, Any] | None = None  # a micro-batch of its last contribution

    def contribute(self, work: EpochWork) -> Contribution:
        contribution = work.compute(False)
        if contribution.micro:
            self.own = contribution.micro[-1]
        return contribution

    def answer(
        self,
        audit: AuditTask,
        recompute: Callable[[AuditTask], AuditResultBody],
        claim: Callable[[AuditTask], tuple[list[float], float] | None],
    ) -> AuditResultBody:
        known = claim(audit)
        if known is not None:
            return AuditResultBody(sketch=known[0], loss=known[1])
        if self.own is None:
            return AuditResultBody(declined="this peer has not computed anything yet")
        return AuditResultBody(sketch=self.own["sketch"], loss=self.own["loss"])


def behaviour(kind: AdversaryKind | None) -> Honest:
    """The contribution behaviour of a peer: honest unless ``kind`` names a cheat."""
    cheats: dict[str, type[Honest]] = {
        "free-rider": FreeRider,
        "random-gradient": RandomGradient,
        "inflated-samples": InflatedSamples,
        "replay": Replay,
        "noisy-round": NoisyRound,
        "poisoned-round": PoisonedRound,
        CAPACITY_LIAR: Honest,  # it trains honestly: its lie is in its offer (peer.market_cli)
        "lazy-validator": LazyValidator,
    }
    return Honest() if kind is None else cheats[kind]()

"""The trainer's line to the coordinator: blocking calls for a synchronous training loop, and reports
sent in the background so that a slow or absent coordinator never stalls training; and
:func:`live_peers`, how the trainer (and the demo) read the run's live peers from a view it fetched.

Training does not depend on the coordinator: if it is unreachable the trainer keeps the last view of the
run it had, and reports wait in a queue (each is signed once, so a retried report is applied once).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from hivemind.utils import get_logger

from peer.protocol.client import AlreadyApplied, CoordinatorClient, CoordinatorError, CoordinatorUnreachable
from peer.protocol.identity import Identity
from peer.protocol.run_schemas import (
    MAX_AUDIT_CLAIM,
    AuditResultBody,
    AuditTask,
    ReportBody,
    RunPeerView,
    RunView,
)

logger = get_logger(__name__)
T = TypeVar("T")

#: How many answered audits a link remembers so as not to recompute them (a claim returns at most 64).
ANSWERED_KEPT = 1024
#: Answers to a report that mean this peer's part in the run is over (dropped, released, run ended).
FINAL_CODES = frozenset({"not_in_run", "run_ended", "not_joined"})


def live_peers(view: RunView) -> list[RunPeerView]:
    """The run's active peers in match order (the order that picks the bootstrap seed and the uploader)."""
    return sorted((p for p in view.peers if p.state == "active"), key=lambda p: (p.matched_at, p.account))


class RunLink:
    """A coordinator client on its own event loop thread; use as a context manager."""

    def __init__(self, url: str, identity: Identity, run_id: str, refresh: float = 0.0):
        self.run_id = run_id
        self.refresh = refresh  # seconds at least between the background fetches of peek()
        self._client = CoordinatorClient(url, identity)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="run-link", daemon=True)
        self._reports: asyncio.Queue[ReportBody] | None = None
        self._sender: asyncio.Future[None] | None = None
        self.ended: str | None = None  # why the coordinator stopped taking this peer's reports
        self.on_accepted: Callable[[ReportBody], None] | None = None  # called on the link's thread
        self._peeked: RunView | None = None
        self._peeking: concurrent.futures.Future[RunView] | None = None
        self._peek_lock = threading.Lock()  # the trainer's loop and its round thread both peek
        self._peek_started = -math.inf  # when the last background fetch began (time.monotonic)
        self._claiming: concurrent.futures.Future[list[AuditTask]] | None = None
        self._claim_pause = 0.0  # seconds the next claim waits first: claims refused for load back off
        self.not_validating: str | None = None  # why the coordinator refuses this peer's claims for good
        self._asked = 0  # how many audits the claim in flight asked for
        self._unanswered = 0  # reports queued or being sent
        self._answering = 0  # audit answers being sent
        # audits this peer answered or is answering (the most recent ANSWERED_KEPT): a claim still holds
        # them until the answer lands, and a claim in flight meanwhile brings them back (measured on
        # digits: half of every validator's recomputations were of audits it had answered already)
        self._answered: OrderedDict[str, None] = OrderedDict()
        self._counting = threading.Lock()
        self.unreachable = False  # the last report could not reach the coordinator

    def __enter__(self) -> RunLink:
        self._thread.start()
        self.call(self._client.__aenter__)
        self._reports = self.call(lambda: _make_queue())
        self._sender = asyncio.run_coroutine_threadsafe(self._send_reports(), self._loop)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sender is not None:
            self._sender.cancel()
        self.call(lambda: self._client.__aexit__(None, None, None))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def call(self, op: Callable[[], Coroutine[Any, Any, T]], timeout: float | None = None) -> T:
        """Run the coroutine ``op()`` on the link's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(op(), self._loop).result(timeout)

    @property
    def client(self) -> CoordinatorClient:
        return self._client

    def view(self) -> RunView | None:
        """The run as the coordinator sees it now, or None when it cannot be reached."""
        try:
            return self.call(lambda: self._client.run(self.run_id))
        except CoordinatorUnreachable as e:
            logger.warning(f"Coordinator unreachable, training on: {e}")
            return None
        except CoordinatorError as e:
            if e.status >= 500:
                logger.warning(f"Coordinator failed, training on: {e}")
                return None
            raise

    def peek(self) -> RunView | None:
        """The latest view fetched in the background (None before the first), starting a new fetch when
        none is under way: a look at the run that never blocks the caller, for loops that must keep their
        own pace while the coordinator is slow or gone. A new fetch starts at most every ``refresh``
        seconds: each view costs the coordinator a read of the run, its matches and its tallies."""
        with self._peek_lock:
            fetch = self._peeking
            if fetch is not None and not fetch.done():
                return self._peeked
            if fetch is not None and fetch.exception() is None:
                self._peeked = fetch.result()
            if time.monotonic() - self._peek_started >= self.refresh:
                self._peek_started = time.monotonic()
                self._peeking = asyncio.run_coroutine_threadsafe(self._client.run(self.run_id), self._loop)
            return self._peeked

    def join(self, peer_id: str, maddrs: list[str]) -> RunView:
        try:
            return self.call(lambda: self._client.join(self.run_id, peer_id, maddrs))
        except AlreadyApplied:
            return self.call(lambda: self._client.run(self.run_id))

    def report(self, body: ReportBody) -> None:
        """Queue a report; it is sent in order, retried while the coordinator is unreachable."""
        assert self._reports is not None
        with self._counting:
            self._unanswered += 1
        self._loop.call_soon_threadsafe(self._reports.put_nowait, body)

    def keep_up(self, backlog: int, answers: int, stop: threading.Event) -> float:
        """Wait while more than ``backlog`` reports are queued, or more than ``answers`` audit answers are
        being sent, and the coordinator answers (it is merely slow); the seconds waited. Why: a report's
        audits go to peers that keep the start of only their last few epochs
        (``HIVEMARKET_AUDIT_WINDOW``), so a peer whose reports lag further behind its
        training than that is never paid for them (measured: 4 peers at 10 epochs/s on two cores, reports
        acknowledged 300 s late, their audits all declined, and the run never reached its target); the
        same holds for the audits this peer answers. While the coordinator cannot be reached at all,
        training goes on and the reports wait in the queue."""
        began = time.monotonic()
        while (
            (self._unanswered > backlog or self._answering > answers)
            and not self.unreachable
            and not stop.wait(0.005)
        ):
            pass
        return time.monotonic() - began

    def claimed_audits(self, limit: int, wait: bool = False) -> tuple[list[AuditTask], bool]:
        """Audits of other peers' reports for this peer to recompute, claimed in the background: the ones
        of the last claim if it has come back (then the next claim starts), else none yet; and whether
        auditing is behind: that claim came back full with some this peer has not answered yet, or the
        coordinator refused it for load (429, 5xx; the next claim then backs off as a report does).

        A claim asks for ``limit`` more than the answers on their way: the coordinator gives the audits
        this peer holds first, and those would crowd out the new ones. Blocks only with ``wait``, for
        the claim in flight (bounded by its back-off and the client's request timeout), so that claiming
        costs the training loop no round trip unless auditing is behind. None, and not behind, when the
        coordinator cannot be reached or refuses otherwise (this peer is not joined yet, the run ended):
        auditing never stops training."""
        if self.not_validating is not None:  # banned from validating the run: it only trains
            return [], False
        claim = self._claiming
        if claim is not None and not claim.done():
            if not wait:
                return [], False
            concurrent.futures.wait([claim])
        tasks, behind = ([], False) if claim is None else self._claimed(claim)
        self._asked = min(limit + self._answering, MAX_AUDIT_CLAIM)
        claiming = self._claim(self._asked, self._claim_pause)
        self._claiming = asyncio.run_coroutine_threadsafe(claiming, self._loop)
        return tasks, behind

    def _claimed(self, claim: concurrent.futures.Future[list[AuditTask]]) -> tuple[list[AuditTask], bool]:
        """What a claim that came back gives (see :meth:`claimed_audits`); one refused for load sets the
        next claim's back-off."""
        try:
            tasks = claim.result()
        except CoordinatorError as e:
            if e.code == "validator_banned":  # wrong canaries: no more claims, training goes on
                self.not_validating = str(e)
                logger.warning(f"This peer may no longer validate {self.run_id}: {e}")
                return [], False
            if not e.for_load:
                logger.warning(f"No audits taken: {e}")
                return [], False
            settings = self._client.settings
            pause = max(self._claim_pause * 2, settings.retry_backoff)
            self._claim_pause = min(pause, settings.retry_backoff_max)
            logger.info(f"No audits taken, the next claim in {self._claim_pause:g} s: {e}")
            return [], True
        except CoordinatorUnreachable as e:
            logger.warning(f"No audits taken: {e}")
            return [], False
        self._claim_pause = 0.0
        with self._counting:
            new = [t for t in tasks if t.id not in self._answered]
        return new, len(tasks) >= self._asked and bool(new)

    async def _claim(self, limit: int, pause: float) -> list[AuditTask]:
        await asyncio.sleep(pause)
        return await self._client.claim_audits(self.run_id, limit)

    def answer_audit(self, audit_id: str, body: AuditResultBody) -> None:
        """Send an audit's answer in the background (an answer that does not arrive in time goes to
        another validator); later claims leave the audit out unless the answer is not recorded."""
        with self._counting:
            self._answering += 1
            self._answered[audit_id] = None
            while len(self._answered) > ANSWERED_KEPT:
                self._answered.popitem(last=False)
        asyncio.run_coroutine_threadsafe(self._answer_audit(audit_id, body), self._loop)

    async def _answer_audit(self, audit_id: str, body: AuditResultBody) -> None:
        """Send one answer; one the coordinator refused for load (429: a fast swarm's peer sends a report,
        a claim and its answers every epoch; 5xx) is sent again with the reports' backoff, at most
        ``retries`` times (measured: at 8 epochs/s on digits the answers dropped at the 50 requests/s
        limit left every audit to lapse, and the run's reports unpaid). One that is not recorded may be
        claimed and recomputed again."""
        recorded = False
        try:
            recorded = await self._send_answer(audit_id, body)
        finally:
            with self._counting:
                self._answering -= 1
                if not recorded:
                    self._answered.pop(audit_id, None)

    async def _send_answer(self, audit_id: str, body: AuditResultBody) -> bool:
        """Whether the audit is decided or holds this answer."""
        settings = self._client.settings
        for attempt in range(settings.retries + 1):
            try:
                view = await self._client.submit_audit(self.run_id, audit_id, body)
                logger.info(
                    f"Audit of {view.account[:12]}...'s epoch {view.epoch}: {view.state} ({view.reason})"
                )
                return True
            except AlreadyApplied:
                return True
            except CoordinatorError as e:
                if e.code == "audit_decided":  # decided meanwhile (another validator took it over)
                    return True
                if not e.for_load or attempt == settings.retries:
                    logger.warning(f"Answer to audit {audit_id} not recorded: {e}")
                    return False
            except CoordinatorUnreachable as e:  # it goes to another validator in time
                logger.warning(f"Answer to audit {audit_id} not recorded: {e}")
                return False
            await asyncio.sleep(min(settings.retry_backoff * 2**attempt, settings.retry_backoff_max))
        return False

    def upload_model(self, path: Path) -> RunView:
        try:
            return self.call(lambda: self._client.upload_model(self.run_id, path))
        except AlreadyApplied:  # the retried upload's first attempt was recorded
            return self.call(lambda: self._client.run(self.run_id))

    def drain(self, timeout: float) -> bool:
        """Wait until every queued report was answered; False if some are still queued after ``timeout``."""
        assert self._reports is not None
        queue = self._reports

        async def empty() -> None:
            await queue.join()

        try:
            self.call(lambda: asyncio.wait_for(empty(), timeout))
            return True
        except TimeoutError:
            return False

    async def _send_reports(self) -> None:
        assert self._reports is not None
        settings = self._client.settings
        while True:
            body = await self._reports.get()
            try:
                await self._send_one(body, settings.retry_backoff, settings.retry_backoff_max)
            except Exception:  # one report's surprise must not stop the reports after it
                logger.exception(f"Report of epoch {body.epoch} could not be sent")
            finally:
                self._reports.task_done()
                with self._counting:
                    self._unanswered -= 1

    async def _send_one(self, body: ReportBody, backoff: float, backoff_max: float) -> None:
        failures = 0
        while self.ended is None:
            try:
                view = await self._client.report(self.run_id, body)
                self.unreachable = False
                logger.info(
                    f"Report of epoch {body.epoch} accepted: {body.samples} samples, paid {view.paid}"
                )
                break
            except AlreadyApplied:  # an earlier attempt was accepted and its answer lost
                break
            except CoordinatorUnreachable as e:
                self.unreachable = True
                logger.warning(f"Report of epoch {body.epoch} waits for the coordinator: {e}")
            except CoordinatorError as e:
                if e.code in FINAL_CODES:
                    self.ended = f"{e.code}: {e.message}"
                    logger.info(f"The coordinator takes no more reports from this peer ({self.ended})")
                    return
                if not e.for_load:
                    logger.warning(f"Report of epoch {body.epoch} refused: {e}")
                    return
            await asyncio.sleep(min(backoff * 2**failures, backoff_max))
            failures += 1
        else:
            return
        if self.on_accepted is not None:
            self.on_accepted(body)


async def _make_queue() -> asyncio.Queue[Any]:
    return asyncio.Queue()

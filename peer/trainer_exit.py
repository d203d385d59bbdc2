"""How a trainer process ends when it cannot train: the exit codes that tell its worker whether to start
it again, and :class:`TrainerExit`, the exception that carries one up to :func:`peer.trainer.main`.

A module of its own, without torch or hivemind, so that the worker (:mod:`peer.worker`) reads the codes
without importing the trainer, and the trainer's parts that refuse a run (:mod:`peer.samples`,
:mod:`peer.trainer_setup`) raise it without importing :mod:`peer.trainer`.
"""

from __future__ import annotations

EXIT_REFUSED = 3  # the run cannot be trained here (task not installed, bad spec): do not restart
EXIT_RETRY = 4  # something transient (no bootstrap peer, no state donor): the worker may start it again


class TrainerExit(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code

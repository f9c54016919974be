"""Deep Retrieval inside a worker: E-step on every micro-batch, M-step aside, beam search to serve.

The learn thread owns :class:`models.deep_retrieval.DeepRetrieval`: it runs the E-step and the
tracker updates of each micro-batch (:meth:`PathRetrieval.learn`) and, from the same timer that
considers index rebuilds, starts an M-step when one is due. The M-step itself — coordinate descent
over every scored item, minutes for millions of items — runs on a copy of the path scores in a
worker thread, so the event loop keeps learning and answering; its new assignment is installed
back on the learn thread at the next check, and the path → items index is swapped in one step.
Items met while it ran keep the paths they were given on arrival.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.deep_retrieval import DeepRetrieval, DRConfig, MStepResult

from .background import background_executor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MStepPolicy:
    """When to run an M-step: every ``interval_s`` once pairs were learned since the last one,
    or sooner after ``events`` pairs; the M-step thread runs ``niceness`` below the learner's CPU
    priority (:mod:`index_sync.background`)."""

    interval_s: float = 300.0
    events: int = 200_000
    niceness: int = 10


def unit_rows(phis: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length: the structure model's input. Zero rows stay zero, and so
    do rows that are not finite (a NaN norm fails ``> 0``, but an infinite one passed, and
    inf/inf made one NaN input that turned every weight to NaN at the next step)."""
    phis = np.atleast_2d(np.asarray(phis, dtype=np.float64))
    norms = np.linalg.norm(phis, axis=1, keepdims=True)
    return np.divide(phis, norms, out=np.zeros_like(phis),
                     where=(norms > 0) & np.isfinite(norms))


class PathRetrieval:
    """One worker's Deep Retrieval source: learning, M-steps off the loop, retrieval."""

    def __init__(self, config: DRConfig, policy: MStepPolicy = MStepPolicy(),
                 max_candidates: int = 1000, *, track_scores: bool = True) -> None:
        """``track_scores=False``: serving only (see :class:`DeepRetrieval`)."""
        self.model = DeepRetrieval(config, track_scores=track_scores)
        self.policy = policy
        self.max_candidates = max_candidates
        self.failures = 0
        self.last_error: str | None = None
        self._executor = background_executor("dr-m-step", policy.niceness)
        self._stopping = threading.Event()
        self._running: Future | None = None

    # -- learning (learn thread) -----------------------------------------------------------
    def learn(self, phis: np.ndarray, items: list[str]) -> float:
        """E-step and path-score update for one micro-batch; x = φ(u)/‖φ(u)‖, no gradient
        into the embedding model.

        Every item gets its paths here, at its first pair. Pairs whose user vector is zero (a
        first event: nothing known about the user) carry no information on where the user
        belongs; learning them would teach every item's paths to the same x, so they are
        skipped. The unit scaling keeps the softmax layers' input the same size whatever the
        item vectors' norms, which drift as the item model learns."""
        x = unit_rows(phis)
        informative = np.flatnonzero(np.any(x != 0, axis=1))
        if self.model.config.new_item_paths == "beam":  # the beam of a zero x says nothing
            self.model.assign_new([items[k] for k in informative],
                                  x=x[informative].astype(np.float32))
        self.model.assign_new(items)
        if not len(informative):
            return float("nan")
        return self.model.learn(x[informative], [items[k] for k in informative])

    @property
    def events_since_m_step(self) -> int:
        """Pairs learned since the last M-step began (kept in the checkpoint)."""
        return self.model.pairs_since_m_step

    def maybe_m_step(self, now: float | None = None) -> bool:
        """Install a finished M-step; start one if due. True when one was started."""
        self._install_finished()
        now = time.time() if now is None else now
        if self._running is not None or not self._due(now):
            return False
        self._start(now)
        return True

    def _start(self, now: float) -> None:
        """Copy the path scores here (learn thread) and run the descent on the copy aside."""
        snapshot = self.model.m_step_snapshot(now)
        self._running = self._executor.submit(self.model.compute_m_step, snapshot,
                                              self._stopping.is_set)
        self._running.snapshot = snapshot

    def _due(self, now: float) -> bool:
        if self.events_since_m_step == 0 or len(self.model) == 0:
            return False
        return (self.events_since_m_step >= self.policy.events
                or now - self.model.m_step_at >= self.policy.interval_s)

    def _install_finished(self) -> MStepResult | None:
        running = self._running
        if running is None or not running.done():
            return None
        self._running = None
        try:
            result = running.result()
        except Exception as error:  # noqa: BLE001 - the paths in force keep serving
            self.model.m_step_ended(running.snapshot)  # tried again when due, not at once
            self.failures += 1
            self.last_error = repr(error)
            log.exception("M-step failed; the previous paths keep serving")
            return None
        self.model.install_m_step(running.snapshot, result)
        log.info("M-step: %d items, largest path %d, %d non-empty paths, %.2f s",
                 len(result.assignment), result.largest_path, result.nonempty_paths,
                 result.seconds)
        return result

    def run_m_step_now(self, timeout: float | None = None) -> MStepResult | None:
        """Start an M-step regardless of the policy and wait for it (tools and tests)."""
        if self._running is None:
            if len(self.model) == 0:
                return None
            self._start(time.time())
        wait([self._running], timeout)
        return self._install_finished()

    # -- serving (any thread) --------------------------------------------------------------
    def retrieve(self, phi: np.ndarray, exclude: Collection[str], beam: int | None = None, *,
                 skip: Collection[str] = frozenset()) -> list[str]:
        """Items on the beam's paths, best path first, without ``exclude`` or ``skip`` (two
        sets, so that a large one, the withdrawn items, is not copied into a union per
        answer), at most ``max_candidates`` (the rerank's cost is linear in them): the cut
        comes after both, so an item left out leaves room for the next."""
        found = [item for item in self.model.retrieve(unit_rows(phi)[0], beam)
                 if item not in exclude and item not in skip]
        return found[: self.max_candidates]

    def stats(self) -> dict:
        stats = dict(self.model.stats)
        stats.update(m_step_running=float(self._running is not None),
                     m_step_failures=self.failures)
        return stats

    # -- persistence -------------------------------------------------------------------------
    def save(self, directory: Path, *, scores: bool = True) -> None:
        self.model.save(directory, scores=scores)

    def load(self, directory: Path) -> bool:
        return self.model.load(directory)

    def close(self) -> None:
        """Stop an M-step under way (within a chunk of its descent) and wait for it: the
        interpreter's exit joins its thread, and a worker that learns on its event loop waited
        there for minutes at a million items, past its stop deadline."""
        self._stopping.set()
        self._executor.shutdown(wait=True, cancel_futures=True)

"""Continuous batching: one thread owns the engine's batch.

Requests wait in a bounded queue. At every step boundary the scheduler drops cancelled
rows, admits waiting requests while the batch has room (each newcomer's prefill runs
between two decode steps of the others, at most ``prefill_tokens_per_step`` prompt
tokens per boundary), then runs one batched decode step for every active row and
samples each row with the request's own sampler, so a request's tokens never depend on
its neighbours. A row leaves the batch, and its cache is released, when it finishes or
is cancelled. The HTTP layer only submits, cancels and listens to events.
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..cache import SequenceCache
from ..generate import decode_one_token, make_sampler, prefill

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` requests already."""


class SchedulerStopped(Exception):
    """The scheduler thread is not running."""


@dataclass
class Event:
    """What the scheduler tells a request's listener.

    kind : ``"delta"`` (new text), ``"done"`` (``finish_reason`` set) or ``"error"`` (``message``).
    """

    kind: str
    text: str = ""
    finish_reason: Optional[str] = None
    message: str = ""


@dataclass
class GenerationRequest:
    """One request: prompt ids, limits and sampling; filled in by the scheduler as it runs.

    Parameters
    ----------
    prompt_ids : token ids of the prompt (at least one)
    max_tokens : tokens to generate at most
    temperature : 0 (default) is greedy
    top_k, top_p : sampling filters (None: off)
    seed : the request's own generator seed; None draws a fresh random seed
    stop : stop strings; the text ends before the first one (OpenAI semantics)
    on_event : called from the scheduler thread with every Event
    """

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    on_event: Callable[[Event], None] = lambda event: None
    # Filled in by the scheduler.
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # text sent so far
    finish_reason: Optional[str] = None
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: Optional[float] = None
    finished_at: Optional[float] = None
    cancelled: bool = False

    @property
    def time_to_first_token(self) -> Optional[float]:
        return None if self.first_token_at is None else self.first_token_at - self.submitted_at


@dataclass
class _Row:
    request: GenerationRequest
    cache: SequenceCache
    sample: Callable
    next_token: int = -1  # sampled, not yet fed to the model


class Scheduler:
    """Owns the engine and its batch; thread-safe ``submit``/``cancel``; ``stats`` for monitoring.

    Parameters
    ----------
    engine : quicksilver Engine (its config's mechanisms apply; fusion is prefill-only in the engine)
    tokenizer : decodes generated tokens (stop strings, streaming text)
    max_batch : int, default 8. Rows decoded together at most.
    max_queue : int, default 64. Requests waiting for a row at most; more raise QueueFull.
    prefill_tokens_per_step : int, default 512. Prompt tokens prefilled between two decode
        steps at most (one newcomer always fits), so newcomers delay running rows by a bounded amount.
    eos_token_ids : ids that end a request with finish_reason ``stop``.
    """

    def __init__(self, engine, tokenizer, max_batch: int = 8, max_queue: int = 64, prefill_tokens_per_step: int = 512,
                 eos_token_ids=()):
        if max_batch < 1 or max_queue < 0 or prefill_tokens_per_step < 1:
            raise ValueError("max_batch and prefill_tokens_per_step must be >= 1 and max_queue >= 0")
        self.engine, self.tokenizer = engine, tokenizer
        self.max_batch, self.max_queue, self.prefill_tokens_per_step = max_batch, max_queue, prefill_tokens_per_step
        self.eos = set(eos_token_ids)
        self.device = next(engine.model.parameters()).device
        spec = engine.spec
        self._entry_bytes = spec.n_layers * 2 * spec.kv_dim * next(engine.model.parameters()).element_size()
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._rows: list[_Row] = []
        self._cv = threading.Condition()
        self._count_lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        # Read by monitoring from other threads: plain values replaced whole, never mutated in place.
        self.generated_tokens = 0
        self.finished = collections.Counter()  # finish reason or "cancelled"/"error" -> requests
        self.failed = 0
        self.last_error: Optional[str] = None
        self.batch_size = 0
        self.kv_bytes = 0
        self.kv_full_bytes = 0
        self.steps = 0
        self.step_tokens_per_second = 0.0

    # ---- called from other threads -------------------------------------------------------

    def outcomes(self) -> dict:
        """Finished requests by outcome (finish reason, ``cancelled`` or ``error``), a copy."""
        with self._count_lock:
            return dict(self.finished)

    def _count(self, outcome: str) -> None:
        with self._count_lock:
            self.finished[outcome] += 1

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._loop, name="quicksilver-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; raises QueueFull when ``max_queue`` requests wait already."""
        with self._cv:
            if not self.alive or self._stopping:
                raise SchedulerStopped("the scheduler is not running")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already (max_queue {self.max_queue})")
            request.submitted_at = time.perf_counter()
            self._waiting.append(request)
            self._cv.notify()

    def cancel(self, request: GenerationRequest) -> None:
        """Cancel a request: a waiting one leaves the queue now, a running one at the next step boundary."""
        with self._cv:
            request.cancelled = True
            try:
                self._waiting.remove(request)
                self._count("cancelled")
            except ValueError:
                pass  # running or finished: the loop drops it
            self._cv.notify()

    # ---- the scheduler thread ------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stopping and not self._waiting and not self._rows:
                        self._cv.wait()
                    if self._stopping:
                        break
                    newcomers = self._take_newcomers()
                try:
                    self._drop_cancelled()
                    for request in newcomers:
                        self._admit(request)
                    if self._rows:
                        self._step()
                except Exception as e:  # a bug outside any one request: fail the batch, keep serving
                    for row in self._rows:
                        self._fail(row.request, e)
                    self._rows = []
                self._note_state()
        for row in self._rows:
            row.request.on_event(Event("error", message="the server is shutting down"))

    def _take_newcomers(self) -> list[GenerationRequest]:
        taken, budget = [], self.prefill_tokens_per_step
        while self._waiting and len(self._rows) + len(taken) < self.max_batch:
            n = len(self._waiting[0].prompt_ids)
            if taken and n > budget:
                break
            taken.append(self._waiting.popleft())
            budget -= n
        return taken

    def _drop_cancelled(self) -> None:
        kept = []
        for row in self._rows:
            if row.request.cancelled:
                self._count("cancelled")
            else:
                kept.append(row)
        self._rows = kept  # dropping the row drops its cache

    def _fail(self, request: GenerationRequest, error: BaseException) -> None:
        log.exception("request failed", exc_info=error)
        self.failed += 1
        self._count("error")
        self.last_error = f"{type(error).__name__}: {error}"
        request.finished_at = time.perf_counter()
        request.on_event(Event("error", message=f"internal error ({type(error).__name__}: {error})"))

    def _admit(self, request: GenerationRequest) -> None:
        if request.cancelled:
            self._count("cancelled")
            return
        try:
            seed = request.seed if request.seed is not None else secrets.randbits(63)
            sample = make_sampler(request.temperature, request.top_k, request.top_p, seed)
            cache = SequenceCache(self.engine.spec.n_layers)
            ids = torch.tensor(request.prompt_ids, dtype=torch.long, device=self.device)
            logits, _ = prefill(self.engine, ids, cache)  # (1, V)
            token = int(sample(logits)[0])
        except Exception as e:  # this request alone fails
            self._fail(request, e)
            return
        row = _Row(request, cache, sample)
        if self._advance(row, token):
            self._rows.append(row)

    def _step(self) -> None:
        """One decode step for every active row; a row that fails (alone) leaves, the others go on."""
        rows = self._rows
        tokens = torch.tensor([r.next_token for r in rows], dtype=torch.long, device=self.device)
        snapshots = [_snapshot(r.cache) for r in rows]
        t0 = time.perf_counter()
        try:
            logits, _ = decode_one_token(self.engine, tokens, [r.cache for r in rows])  # (B, V)
            outcome = [logits[j : j + 1] for j in range(len(rows))]
        except Exception:
            # Find the culprit: restore every cache and run each row alone.
            outcome = []
            for row, snap, token in zip(rows, snapshots, tokens):
                _restore(row.cache, snap)
                try:
                    outcome.append(decode_one_token(self.engine, token[None], [row.cache])[0])
                except Exception as e:
                    outcome.append(e)
        elapsed = time.perf_counter() - t0
        self.steps += 1
        self.step_tokens_per_second = len(rows) / elapsed if elapsed > 0 else 0.0
        kept = []
        for row, result in zip(rows, outcome):
            if isinstance(result, Exception):
                self._fail(row.request, result)
                continue
            try:
                token = int(row.sample(result)[0])
            except Exception as e:
                self._fail(row.request, e)
                continue
            if self._advance(row, token):
                kept.append(row)
        self._rows = kept

    def _advance(self, row: _Row, token: int) -> bool:
        """Record a sampled token, send the new text; False when the request is finished."""
        req = row.request
        if req.cancelled:
            self._count("cancelled")
            return False
        req.tokens.append(token)
        self.generated_tokens += 1
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        text = self.tokenizer.decode(req.tokens, skip_special_tokens=True)
        reason = None
        if token in self.eos:
            reason = "stop"
        cut = _first_stop(text, req.stop)
        if cut is not None:
            text, reason = text[:cut], "stop"
        elif reason is None and len(req.tokens) >= req.max_tokens:
            reason = "length"
        if reason is None:
            text = _safe_prefix(text, req.stop)
        if len(text) > len(req.text):
            delta, req.text = text[len(req.text):], text
            req.on_event(Event("delta", text=delta))
        if reason is not None:
            req.finish_reason, req.finished_at = reason, time.perf_counter()
            self._count(reason)
            req.on_event(Event("done", finish_reason=reason))
            return False
        row.next_token = token
        return True

    def _note_state(self) -> None:
        self.batch_size = len(self._rows)
        self.kv_bytes = sum(r.cache.nbytes() for r in self._rows)
        self.kv_full_bytes = sum(r.cache.length for r in self._rows) * self._entry_bytes


def _first_stop(text: str, stops: tuple[str, ...]) -> Optional[int]:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _safe_prefix(text: str, stops: tuple[str, ...]) -> str:
    """What can be sent now: no half-decoded character, no tail that may begin a stop string."""
    text = text.rstrip("\ufffd")  # the rest of a multi-byte character comes with the next token
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return text[: len(text) - hold]


def _snapshot(cache: SequenceCache):
    # A decode step only appends at positions >= length (window eviction keeps what later queries
    # can read), so rolling back to the length before the step restores what the rerun needs.
    return cache.length, cache.peak_bytes


def _restore(cache: SequenceCache, snap) -> None:
    cache.truncate(snap[0])
    cache.peak_bytes = snap[1]

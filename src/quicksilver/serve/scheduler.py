"""Continuous batching: one thread owns the engine's batch.

Requests wait in a bounded queue. At every step boundary the scheduler drops cancelled
rows, admits waiting requests while the batch has room (the newcomers' prompts are
prefilled together, in one pass, between two decode steps of the others, at most
``prefill_tokens_per_step`` prompt tokens per boundary), then runs one step of the decode
core (``decoding.DecodeBatch``) for every active row: the same step ``generate`` runs, with
speculative decoding's verify passes when the engine's preset turns it on. Each row samples
with the request's own sampler, so a request's tokens never depend on its neighbours.

The caches are rows of one preallocated ``CachePool`` of ``max_batch`` rows, so a decode
step attends for every row in one call per layer: a request takes a free row when it
joins and gives it back when it finishes, is cancelled or fails. The pool grows (live
rows copied over) when a newcomer needs more entries than a row holds. With KV skipping
on, whose caches shrink row by row, every request gets a cache of its own instead (as
``generate`` does). The HTTP layer only submits, cancels and listens to events.
"""

from __future__ import annotations

import collections
import heapq
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..cache import CachePool, SequenceCache
from ..decoding import DecodeBatch, Sampler, Sequence, StopCheck
from ..decoding.stop import first_stop, safe_prefix

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


class Scheduler:
    """Owns the engine and its batch; thread-safe ``submit``/``cancel``; ``stats`` for monitoring.

    Parameters
    ----------
    engine : quicksilver Engine (its config's mechanisms apply, speculative decoding included; fusion is
        prefill-only in the engine)
    tokenizer : decodes generated tokens (stop strings, streaming text)
    max_batch : int, default 8. Rows decoded together at most (the rows of the cache pool).
    max_queue : int, default 64. Requests waiting for a row at most once the batch is full:
        ``max_batch + max_queue`` requests, running and waiting, are admitted; more raise QueueFull.
    prefill_tokens_per_step : int, default 512. Prompt tokens prefilled between two decode
        steps at most (one newcomer always fits), so newcomers delay running rows by a bounded amount.
    eos_token_ids : ids that end a request with finish_reason ``stop``.
    pool_bytes : int, default 2 GiB. Largest cache pool (keys and values of ``max_batch`` rows);
        a request that needs longer rows than that allows gets a cache of its own, and
        while it runs the batch attends row by row.
    """

    def __init__(self, engine, tokenizer, max_batch: int = 8, max_queue: int = 64, prefill_tokens_per_step: int = 512,
                 eos_token_ids=(), pool_bytes: int = 2 << 30):
        if max_batch < 1 or max_queue < 0 or prefill_tokens_per_step < 1:
            raise ValueError("max_batch and prefill_tokens_per_step must be >= 1 and max_queue >= 0")
        self.engine, self.tokenizer = engine, tokenizer
        self.max_batch, self.max_queue, self.prefill_tokens_per_step = max_batch, max_queue, prefill_tokens_per_step
        self.eos = set(eos_token_ids)
        param = next(engine.model.parameters())
        self.device, self._dtype = param.device, param.dtype
        spec = engine.spec
        self._entry_bytes = spec.n_layers * 2 * spec.kv_dim * param.element_size()  # one token, every layer
        # As generate.new_caches: KV skipping shrinks caches row by row, so its rows are not pooled.
        self._pooling = not engine.config.kv.enabled
        self._pool: Optional[CachePool] = None
        self._pool_capacity = 0  # entries per row and layer
        self._max_pool_capacity = min(spec.max_positions, pool_bytes // (max_batch * self._entry_bytes))
        self._free = list(range(max_batch))  # a heap: the lowest free rows first, so a batch's rows stay contiguous
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        # The decode core, stepped by this thread; whether a step compiles is measured as steps come.
        self.batch = DecodeBatch(engine, compile=None, speculative_batch=max_batch)
        self._slot: dict[int, int] = {}  # sequence id -> its pool row (absent: a cache of its own)
        self._running = 0  # requests taken from the queue and not yet finished (written under _cv, or whole)
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
        self.free_rows = max_batch  # pool rows not held by a request
        self.pool_bytes = 0  # keys and values allocated for the pool
        self.kv_bytes = 0
        self.kv_full_bytes = 0
        self._kv_noted_at = 0.0
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
            if len(self._waiting) + self._running >= self.max_batch + self.max_queue:
                raise QueueFull(f"{self._running} requests run and {len(self._waiting)} wait already "
                                f"(max_batch {self.max_batch} + max_queue {self.max_queue})")
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

    @property
    def _rows(self) -> list[Sequence]:
        return self.batch.active

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stopping and not self._waiting and not self._rows:
                        self._cv.wait()
                    if self._stopping:
                        break
                    newcomers = self._take_newcomers()
                    self._running = len(self._rows) + len(newcomers)
                try:
                    self._drop_cancelled()
                    if newcomers:
                        self._admit(newcomers)
                    if self._rows:
                        self._step()
                except Exception as e:  # a bug outside any one request: fail the batch, keep serving
                    for seq in list(self._rows):
                        self.batch.remove(seq)
                        self._fail(seq, e)
                self._note_state()
        for seq in self._rows:
            seq.tag.on_event(Event("error", message="the server is shutting down"))

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
        for seq in [s for s in self._rows if s.tag.cancelled]:
            self.batch.remove(seq)
            self._count("cancelled")
            self._release(seq)

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        log.exception("request failed", exc_info=error)
        self._release(seq)
        self.failed += 1
        self._count("error")
        self.last_error = f"{type(error).__name__}: {error}"
        seq.tag.finished_at = time.perf_counter()
        seq.tag.on_event(Event("error", message=f"internal error ({type(error).__name__}: {error})"))

    # ---- cache rows ----------------------------------------------------------------------

    def _acquire(self, request: GenerationRequest) -> tuple[SequenceCache, int]:
        """A cache for the request: a free pool row when pooling applies and one fits, else its own."""
        need = len(request.prompt_ids) + request.max_tokens + self.batch.extra_entries
        if not self._pooling or need > self._max_pool_capacity:
            return SequenceCache(self.engine.spec.n_layers, capacity=need, margin=self.batch.margin), -1
        if need > self._pool_capacity:
            self._grow_pool(need)
        slot = heapq.heappop(self._free)
        cache = self._pool.rows[slot]
        cache.truncate(0)  # forget the previous holder's entries (every position is >= 0)
        cache.peak_bytes = 0
        return cache, slot

    def _release(self, seq: Sequence) -> None:
        """Give the sequence's pool row back (idempotent); a cache of its own is simply dropped."""
        slot = self._slot.pop(seq.id, -1)
        if slot >= 0:
            heapq.heappush(self._free, slot)

    def _grow_pool(self, need: int) -> None:
        """Replace the pool by one with rows of at least ``need`` entries; live rows move over."""
        spec = self.engine.spec
        capacity = min(self._max_pool_capacity, max(need, 2 * self._pool_capacity, 256))
        pool = CachePool(spec.n_layers, self.max_batch, capacity, spec.n_kv_heads, spec.head_dim, self._dtype, self.device,
                         self.batch.margin)
        for seq in self._rows:
            slot = self._slot.get(seq.id, -1)
            if slot >= 0:
                new = pool.rows[slot]
                for layer in range(spec.n_layers):
                    e = seq.cache.get(layer)
                    if e is not None:
                        new.append(layer, e.k, e.v, e.pos)
                new.length, new.peak_bytes = seq.cache.length, seq.cache.peak_bytes
                seq.cache = new
        self._pool, self._pool_capacity = pool, capacity
        self.pool_bytes = sum(k.nbytes + v.nbytes for k, v in zip(pool.k, pool.v))

    # ---- prefill and decode --------------------------------------------------------------

    def _admit(self, requests: list[GenerationRequest]) -> None:
        """Prefill the newcomers together, each into its own row; emit their first tokens."""
        seqs = []
        for request in requests:
            if request.cancelled:
                self._count("cancelled")
                continue
            try:
                seed = request.seed if request.seed is not None else secrets.randbits(63)
                sampler = Sampler(request.temperature, request.top_k, request.top_p, seed)
                stop = StopCheck(self.eos, request.stop, request.max_tokens, self.tokenizer, text=True)
                cache, slot = self._acquire(request)
            except Exception as e:  # this request alone fails
                request.finished_at = time.perf_counter()
                self.failed += 1
                self._count("error")
                self.last_error = f"{type(e).__name__}: {e}"
                request.on_event(Event("error", message=f"internal error ({type(e).__name__}: {e})"))
                continue
            seq = Sequence(torch.tensor(request.prompt_ids, dtype=torch.long, device=self.device), cache, sampler, stop,
                           self._on_token, tag=request)
            if slot >= 0:
                self._slot[seq.id] = slot
            seqs.append(seq)
        self._finish(self.batch.admit(seqs, isolate=True))

    def _step(self) -> None:
        """One step of the decode core for every active row; a row that fails (alone) leaves, the others go on."""
        before, rows = self.generated_tokens, len(self._rows)
        t0 = time.perf_counter()
        done = self.batch.step(isolate=True)
        elapsed = time.perf_counter() - t0
        self.steps += 1
        self.step_tokens_per_second = (self.generated_tokens - before) / elapsed if elapsed > 0 and rows else 0.0
        self._finish(done)

    def _finish(self, done: list[Sequence]) -> None:
        """Sequences the core finished: a failed one gets its error, every one its row back."""
        for seq in done:
            if seq.error is not None:
                self._fail(seq, seq.error)
            else:
                self._release(seq)

    def _on_token(self, seq: Sequence, token: int) -> None:
        """A token the core emitted: record it, send the new text, and the end when it ends."""
        req = seq.tag
        if req.cancelled:
            return  # the row leaves at the next step boundary
        req.tokens.append(token)
        self.generated_tokens += 1
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        reason = {"eos": "stop", "stop_string": "stop", "length": "length", None: None}[seq.finish_reason]
        text = seq.text
        cut = first_stop(text, req.stop)
        if cut is not None:
            text, reason = text[:cut], "stop"
        elif reason is None:
            text = safe_prefix(text, req.stop)
        if len(text) > len(req.text):
            delta, req.text = text[len(req.text):], text
            req.on_event(Event("delta", text=delta))
        if reason is not None:
            req.finish_reason, req.finished_at = reason, time.perf_counter()
            self._count(reason)
            req.on_event(Event("done", finish_reason=reason))

    def _note_state(self) -> None:
        rows = self._rows
        self.batch_size = self._running = len(rows)
        self.free_rows = len(self._free)
        now = time.perf_counter()
        # Counting KV bytes walks every layer of every row (about 1 ms a step at 8 rows, 1% of a
        # decode step): a few times a second is enough for monitoring, and at once when the batch empties.
        if rows and now - self._kv_noted_at < 0.2:
            return
        self._kv_noted_at = now
        self.kv_bytes = sum(s.cache.nbytes() for s in rows)
        self.kv_full_bytes = sum(s.cache.length for s in rows) * self._entry_bytes

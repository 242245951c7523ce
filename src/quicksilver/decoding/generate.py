"""``generate``: the decode core driven to the end over a batch of prompts.

Each row has its own cache holding only the K/V entries that were written, so KV skipping
shrinks the cache for real. Mechanisms apply to every new token exactly as they apply to that
token in a full forward pass (decisions are per token and causal), so decoding with the cache
equals recomputing the prefix each step. Prompts are prefilled together, and rows of a batch
share the projections and MLP of each step (one matmul over the rows that compute) and attend
to their own caches. Contextual Token Fusion applies to prefill only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence as Seq

import torch

from .batch import DecodeBatch, Sequence
from .requests import check_request
from .runner import new_caches, wants_compiled
from .sampling import Sampler, check_sampling
from .stop import StopCheck


@dataclass
class GenerationResult:
    """Generated tokens per row (prompt excluded) and what generating them cost."""

    tokens: list[list[int]]
    prompt_tokens: list[int]
    stop_reasons: list[str]
    time_to_first_token: float
    decode_seconds: float
    total_seconds: float
    kv_bytes: int  # peak bytes of the engine's caches, summed over rows
    kv_full_bytes: int  # what a full cache of the same tokens would hold
    mean_exit_layer: float  # over generated tokens (decode steps)
    ledger: dict = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_seconds if self.total_seconds > 0 else float("inf")


@dataclass
class SpeculativeResult(GenerationResult):
    """``GenerationResult`` plus what speculation did (``speculative``: per source and overall)."""

    speculative: dict = field(default_factory=dict)


@torch.inference_mode()
def generate(
    engine,
    prompts,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | Seq[int] | None = None,
    stop_strings: Seq[str] = (),
    tokenizer=None,
    on_token: Callable[[int, int], None] | None = None,
) -> GenerationResult:
    """Generate continuations of one or more prompts with the engine's mechanisms.

    Parameters
    ----------
    engine : an ``Engine`` (with speculative decoding on, the result is a ``SpeculativeResult``:
        greedy output equals decoding one token at a time, sampling follows the same distribution)
    prompts : (T,) or (B, T) tensor, or a list of 1-D token sequences (ragged is fine).
    max_new_tokens : int, default 64
    temperature, top_k, top_p : sampling; temperature 0 (default) is greedy.
    seed : row i samples with its own generator seeded ``seed + i`` (None: 0), so a row of a
        batch equals that prompt generated alone with the same seed.
    eos_token_id : int or list of int; a row stops after emitting one.
    stop_strings : a row stops once its decoded continuation contains one (needs ``tokenizer``).
    on_token : called as ``on_token(row, token_id)`` for every generated token (streaming).
    """
    spec = engine.spec
    rows, eos = check_request(prompts, max_new_tokens, spec.max_positions, eos_token_id, stop_strings, tokenizer, spec.vocab_size)
    check_sampling(temperature, top_k, top_p, seed)
    device = next(engine.model.parameters()).device
    # Measured once per machine and shape: whether the compiled loop pays for this many steps.
    batch = DecodeBatch(engine, compile=wants_compiled(engine, len(rows), max_new_tokens - 1), speculative_batch=len(rows))
    caches = new_caches(engine, [r.numel() + max_new_tokens + batch.extra_entries for r in rows], margin=batch.margin)
    emit = None if on_token is None else (lambda s, tok: on_token(s.tag, tok))
    seqs = [Sequence(r.to(device), cache, Sampler(temperature, top_k, top_p, None if seed is None else seed + i),
                     StopCheck(eos, stop_strings, max_new_tokens, tokenizer), emit, tag=i)
            for i, (r, cache) in enumerate(zip(rows, caches))]
    t0 = time.perf_counter()
    batch.admit(seqs)
    _sync(device)
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    while batch.active:
        batch.step()
    _sync(device)
    end = time.perf_counter()
    elem = next(engine.model.parameters()).element_size()
    full_bytes = sum((r.numel() + len(s.tokens) - 1) * spec.n_layers * 2 * spec.kv_dim * elem for r, s in zip(rows, seqs))
    decode = batch.decode_ledger
    fields = dict(
        tokens=[s.tokens for s in seqs],
        prompt_tokens=[r.numel() for r in rows],
        stop_reasons=[s.finish_reason for s in seqs],
        time_to_first_token=ttft,
        decode_seconds=end - t1,
        total_seconds=end - t0,
        kv_bytes=sum(c.peak_bytes for c in caches),
        kv_full_bytes=full_bytes,
        mean_exit_layer=decode.as_dict()["mean_exit_layer"] if decode.tokens else float(spec.n_layers),
        ledger=batch.ledger.as_dict(),
    )
    if batch.drafter is not None:
        return SpeculativeResult(**fields, speculative=batch.drafter.summary())
    return GenerationResult(**fields)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

"""Autoregressive generation with the engine: prefill, then one token per step per row.

Each row has its own SequenceCache holding only the K/V entries that were written, so
KV skipping shrinks the cache for real. Mechanisms apply to every new token exactly as
they apply to that token in a full forward pass (decisions are per token and causal),
so decoding with the cache equals recomputing the prefix each step. Prompts are prefilled together and rows of a batch
share the projections and MLP of each step (one matmul over the rows that compute) and
attend to their own caches. Contextual Token Fusion, once added, applies to prefill only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import compiled
from .cache import CachePool, SequenceCache
from .errors import QuicksilverError
from .ledger import Ledger


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


def make_sampler(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int | None = None):
    """A function (logits (N, V), rows' tokens so far) -> next tokens (N,); greedy at temperature 0.

    Warping uses transformers' public logits processors (temperature, top-k, top-p).
    """
    if temperature < 0:
        raise QuicksilverError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise QuicksilverError(f"top-k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise QuicksilverError(f"top-p must be in (0, 1], got {top_p}")
    if temperature == 0:
        from .kernels import argmax

        return argmax
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    gen = torch.Generator()
    gen.manual_seed(0 if seed is None else seed)

    def sample(logits):
        scores = warpers(None, logits.float())
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(1).to(logits.device)

    return sample


def token_ids(x, vocab: int, what: str = "input_ids") -> torch.Tensor:
    """``x`` (a tensor, or a list of ints or of such lists) as a long tensor of ids in [0, vocab).

    Anything else raises ``QuicksilverError`` saying what was wrong; the shape is the caller's to check.
    """
    try:
        t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError):
        raise QuicksilverError(f"{what} must be token ids: a list of ints or an integer tensor") from None
    if t.numel() == 0:
        return t.long()
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise QuicksilverError(f"{what} must be token ids (integers), got {t.dtype}")
    low, high = int(t.min()), int(t.max())
    if low < 0 or high >= vocab:
        raise QuicksilverError(f"{what} must lie in [0, {vocab}) (the vocabulary), got {low if low < 0 else high}")
    return t.long()


def _check_request(prompts, max_new_tokens: int, max_positions: int, eos_token_id, stop_strings, tokenizer, vocab: int):
    """The prompts as 1-D tensors and the EOS ids as a set, after the checks every generation path shares."""
    rows = _check_prompts(prompts, max_new_tokens, max_positions, vocab)
    if stop_strings and tokenizer is None:
        raise QuicksilverError("stop strings need a tokenizer to decode with")
    return rows, set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))


def _check_prompts(prompts, max_new_tokens: int, max_positions: int, vocab: int) -> list[torch.Tensor]:
    if max_new_tokens < 1:
        raise QuicksilverError(f"max-new-tokens must be at least 1, got {max_new_tokens}")
    if isinstance(prompts, torch.Tensor):
        prompts = [prompts] if prompts.dim() == 1 else list(prompts)
    rows = [token_ids(p, vocab, "prompts").flatten() for p in prompts]
    if not rows:
        raise QuicksilverError("no prompt given")
    for r in rows:
        if r.numel() == 0:
            raise QuicksilverError("empty prompt: give at least one token")
        if r.numel() + max_new_tokens > max_positions:
            raise QuicksilverError(
                f"prompt of {r.numel()} tokens plus {max_new_tokens} new tokens exceeds the model's context of {max_positions}"
            )
    return rows


def new_caches(engine, capacities: Sequence[int]) -> list[SequenceCache]:
    """One cache per row, preallocated: rows of one pool (batched decode attention) unless
    KV skipping is on, whose caches shrink row by row and so get buffers of their own."""
    spec = engine.spec
    if engine.config.kv.enabled:
        return [SequenceCache(spec.n_layers, capacity=c) for c in capacities]
    param = next(engine.model.parameters())
    return CachePool(spec.n_layers, len(capacities), max(capacities), spec.n_kv_heads, spec.head_dim,
                     param.dtype, param.device).rows


def prefill(engine, prompt: torch.Tensor, cache: SequenceCache):
    """Run the prompt through every layer, filling ``cache``; logits of the last position (1, V)."""
    return prefill_batch(engine, [prompt], [cache])


def prefill_batch(engine, prompts: Sequence[torch.Tensor], caches: Sequence[SequenceCache]):
    """Prefill ragged prompts together: one pass whose linears run over every prompt's rows.

    The prompts are concatenated (no padding); each attends only to itself (one segment per
    prompt). Returns the logits of each prompt's last position (B, V) and the ledger.
    """
    device = prompts[0].device
    lengths = [p.numel() for p in prompts]
    ids = torch.cat(list(prompts))
    pos = torch.cat([torch.arange(n, device=device) for n in lengths])
    ends = torch.tensor(lengths, device=device).cumsum(0)
    segments = [(int(b) - n, int(b)) for b, n in zip(ends, lengths)]
    return engine.run(ids, pos, segments, list(caches), logit_rows=ends - 1)


def decode_one_token(engine, tokens: torch.Tensor, caches: Sequence[SequenceCache], compile: bool = False):
    """One step for several rows: ``tokens`` (B,) at each cache's next position; logits (B, V).
    ``compile``: through the compiled layer loop where it applies (``quicksilver.compiled``)."""
    pos = torch.tensor([c.length for c in caches], device=tokens.device)
    segments = [(i, i + 1) for i in range(len(caches))]
    if compile:
        return engine.run(tokens, pos, segments, list(caches), compile=True)
    return engine.run(tokens, pos, segments, list(caches))  # engine-like wrappers need not know ``compile``


@torch.inference_mode()
def generate(
    engine,
    prompts,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    on_token: Callable[[int, int], None] | None = None,
) -> GenerationResult:
    """Generate continuations of one or more prompts with the engine's mechanisms.

    Parameters
    ----------
    prompts : (T,) or (B, T) tensor, or a list of 1-D token sequences (ragged is fine).
    max_new_tokens : int, default 64
    temperature, top_k, top_p, seed : sampling; temperature 0 (default) is greedy.
    eos_token_id : int or list of int; a row stops after emitting one.
    stop_strings : a row stops once its decoded continuation contains one (needs ``tokenizer``).
    on_token : called as ``on_token(row, token_id)`` for every generated token (streaming).
    """
    if engine.config.speculative.enabled:  # same tokens (greedy) or distribution (sampling), drafted and verified
        from .speculative import generate_speculative

        return generate_speculative(engine, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id,
                                    stop_strings, tokenizer, on_token)
    spec = engine.spec
    rows, eos = _check_request(prompts, max_new_tokens, spec.max_positions, eos_token_id, stop_strings, tokenizer, spec.vocab_size)
    sample = make_sampler(temperature, top_k, top_p, seed)
    device = next(engine.model.parameters()).device
    caches = new_caches(engine, [r.numel() + max_new_tokens for r in rows])
    out: list[list[int]] = [[] for _ in rows]
    reasons = ["length"] * len(rows)
    decode_ledger = Ledger(n_layers=spec.n_layers)
    total = Ledger(n_layers=spec.n_layers)

    use_compiled = compiled.wanted(engine, len(rows), max_new_tokens - 1)  # measured once per machine and shape
    t0 = time.perf_counter()
    logits, ledger = prefill_batch(engine, [r.to(device) for r in rows], caches)
    total.merge(ledger)
    next_tokens = sample(logits)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ttft = time.perf_counter() - t0
    active = list(range(len(rows)))
    t1 = time.perf_counter()
    for step in range(max_new_tokens):
        still = []
        for j, i in enumerate(active):
            tok = int(next_tokens[j])
            out[i].append(tok)
            if on_token:
                on_token(i, tok)
            if tok in eos:
                reasons[i] = "eos"
            elif stop_strings and any(s in tokenizer.decode(out[i]) for s in stop_strings):
                reasons[i] = "stop_string"
            elif step + 1 < max_new_tokens:
                still.append((j, i))
        if not still:
            break
        active = [i for _, i in still]
        feed = next_tokens[torch.tensor([j for j, _ in still], device=next_tokens.device)]
        logits, ledger = decode_one_token(engine, feed, [caches[i] for i in active], use_compiled)
        decode_ledger.merge(ledger)
        total.merge(ledger)
        next_tokens = sample(logits)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    end = time.perf_counter()
    elem = next(engine.model.parameters()).element_size()
    full_bytes = sum((r.numel() + len(o) - 1) * spec.n_layers * 2 * spec.kv_dim * elem for r, o in zip(rows, out))
    stats = total.as_dict()
    return GenerationResult(
        tokens=out,
        prompt_tokens=[r.numel() for r in rows],
        stop_reasons=reasons,
        time_to_first_token=ttft,
        decode_seconds=end - t1,
        total_seconds=end - t0,
        kv_bytes=sum(c.peak_bytes for c in caches),
        kv_full_bytes=full_bytes,
        mean_exit_layer=decode_ledger.as_dict()["mean_exit_layer"] if decode_ledger.tokens else float(spec.n_layers),
        ledger=stats,
    )

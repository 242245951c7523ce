"""Continuation perplexity: compress a long prefix's cache, then score the tokens that follow.

For each chunk of ``prefix + continuation`` tokens, the prefix is prefilled with the
configuration (an eviction rule compresses the cache to ``keep_fraction`` of it at the end
of prefill; the window rule keeps sinks + its window), then the continuation runs after it
reading the compressed prefix and itself in full (``quest`` reads itself in full too, and
chooses the prefix pages each query block reads, ``keep_fraction`` of the prefix). The stock model runs the same chunks with its full cache. The kept
fraction is measured: prefix entries read by the continuation's queries, over all of them.
"""

from __future__ import annotations

import math

import torch

from .cache import SequenceCache
from .needle import _reading_in_full, extend


@torch.inference_mode()
def score_chunk(engine, prefix: torch.Tensor, cont: torch.Tensor) -> tuple[float, float]:
    """Summed NLL of ``cont`` after ``prefix`` and the kept fraction of the prefix its queries read."""
    from .decoding import prefill

    spec, c, p = engine.spec, cont.numel(), prefix.numel()
    cache = SequenceCache(spec.n_layers, capacity=p + c)
    first, _ = prefill(engine, prefix, cache)
    with _reading_in_full(engine):
        logits, ledger = extend(engine, cont, cache, logit_rows=torch.arange(c - 1, device=cont.device))
    logp = torch.log_softmax(torch.cat([first, logits]).float(), dim=-1)
    nll = -logp.gather(1, cont[:, None]).sum().item()
    kept = (ledger.pairs_seen / spec.n_layers - c * (c + 1) // 2) / (c * p)
    return nll, kept


def continuation_perplexity(engine, baseline, ids: torch.Tensor, prefix: int, continuation: int, max_chunks: int | None = None,
                            bos_id: int | None = None, progress=None) -> dict:
    """Perplexity of the continuations under ``engine`` and ``baseline`` on consecutive chunks of ``ids``."""
    from .errors import QuicksilverError

    size = prefix + continuation - (1 if bos_id is not None else 0)
    n = ids.numel() // size
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n < 1:
        raise QuicksilverError(f"the text has {ids.numel()} tokens; one chunk needs {size}")
    nll = base_nll = kept = 0.0
    for i in range(n):
        chunk = ids[i * size : (i + 1) * size]
        if bos_id is not None:
            chunk = torch.cat([torch.tensor([bos_id], device=chunk.device), chunk])
        pre, cont = chunk[:prefix], chunk[prefix:]
        a, k = score_chunk(engine, pre, cont)
        b, _ = score_chunk(baseline, pre, cont)
        nll, base_nll, kept = nll + a, base_nll + b, kept + k
        if progress:
            progress(i + 1, n)
    tokens = n * continuation
    ppl, base = math.exp(nll / tokens), math.exp(base_nll / tokens)
    return {"chunks": n, "prefix_tokens": prefix, "continuation_tokens": continuation, "tokens": tokens, "perplexity": ppl,
            "baseline_perplexity": base, "relative_delta_perplexity": ppl / base - 1, "kv_fraction": kept / n}

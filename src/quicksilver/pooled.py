"""Attention of a batch whose caches are rows of one ``CachePool``: one call per layer for every row.

A decode step (one query row per sequence) and a speculative verify pass (a few rows per
sequence) write every new entry with one indexed copy into the pool (``CachePool.write``) and
attend over the pool's rows at once, each row masked to its own live entries, instead of a
write and an attention call per sequence. The index tensors and masks are built once per
step and shared by the layers with the same counts (``plans``).
"""

from __future__ import annotations

import torch

from .attention import _additive
from .attn_kernels import decode_attention


def shared_pool(segments, caches) -> bool:
    """Every segment is one row whose cache is a row of the same, still pooled, CachePool."""
    first = caches[0] if caches else None
    pool = None if first is None else first.pool
    if pool is None:
        return False
    return all(b - a == 1 for a, b in segments) and all(c is not None and c.pool is pool for c in caches)


def verify_applies(l: int, segments, caches, most_rows: int = 64) -> bool:
    """Short segments (a verify pass, not a prefill) whose caches are non-empty rows of one pool with room."""
    pool = caches[0].pool if caches and caches[0] is not None else None
    if pool is None:
        return False
    room = pool.k[l].shape[2]
    for (a, b), c in zip(segments, caches):
        if c is None or c.pool is not pool or b - a > most_rows or c.count(l) == 0 or c.count(l) + b - a > room:
            return False
    return True


def _decode_plan(n, slots, q):
    """(slot index, next free entry per row, additive (B, T) mask or None) of one pooled decode step."""
    slot_t, at = torch.tensor(slots, device=q.device), torch.tensor(n, device=q.device)
    mask = None
    if min(n) != max(n):  # rows of different lengths: each row reads only its own entries
        T = max(n) + 1
        mask = _additive(torch.arange(T, device=q.device)[None, :] <= at[:, None], q.dtype)  # (B, T)
    return slot_t, at, mask


def decode(l, q, k, v, pos, caches, scale, plans):
    """One query row per cache, caches rows of one pool: write the new entries, attend in one call.

    q (B, H, hd), k/v (B, Hkv, hd), pos (B,). Returns ((B, H*hd), pairs seen).
    """
    pool = caches[0].pool
    n = [c.count(l) for c in caches]
    slots = [c.slot for c in caches]
    key = ("pooled", tuple(n), tuple(slots))
    if key not in plans:
        plans[key] = _decode_plan(n, slots, q)
    slot_t, at, mask = plans[key]
    if len(n) == 1:
        pool.write_one(l, slots[0], n[0], k[0], v[0], pos[0])
    else:
        pool.write(l, slot_t, at, k, v, pos)  # row i's new entry into its next free slot
    for c in caches:
        c.written(l, 1)
    keys, values = pool.view(l, slots, max(n) + 1)  # (B, Hkv, T, hd)
    return decode_attention(q, keys, values, mask, scale), sum(n) + len(n)


def verify(l, q, k, v, pos, segments, caches, scale, plans):
    """A few query rows per cache (a speculative verify pass), caches rows of one pool: one
    indexed write of every new entry and one batched attention call, each row masked to its
    own sequence's entries up to its position.

    q (N, H, hd), k/v (N, Hkv, hd), pos (N,). Returns ((N, H*hd), pairs seen).
    """
    pool, B = caches[0].pool, len(caches)
    n = [c.count(l) for c in caches]
    lens = [b - a for a, b in segments]
    slots = [c.slot for c in caches]
    key = ("verify", tuple(n), tuple(lens), tuple(slots))
    if key not in plans:
        dev, Q = q.device, max(lens)
        slot_t = torch.tensor([s for s, m in zip(slots, lens) for _ in range(m)], device=dev)
        at = torch.tensor([c + j for c, m in zip(n, lens) for j in range(m)], device=dev)
        where = torch.tensor([i * Q + j for i, m in enumerate(lens) for j in range(m)], device=dev)  # row -> padded row
        T = max(c + m for c, m in zip(n, lens))
        last = torch.tensor(n, device=dev)[:, None] + torch.arange(Q, device=dev)[None, :]  # (B, Q) newest visible entry
        seen = torch.arange(T, device=dev)[None, None, :] <= last[:, :, None]
        mask = torch.zeros(seen.shape).masked_fill_(~seen, float("-inf"))  # (B, Q, T), float32 scores
        pairs = sum(c + j + 1 for c, m in zip(n, lens) for j in range(m))
        plans[key] = (slot_t, at, where, mask, T, pairs)
    slot_t, at, where, mask, T, pairs = plans[key]
    pool.write(l, slot_t, at, k, v, pos)  # each row's entry into its sequence's next free slots
    for c, m in zip(caches, lens):
        c.written(l, m)
    keys, values = pool.view(l, slots, T)
    H, hd, Hkv, Q = q.shape[1], q.shape[2], keys.shape[1], mask.shape[1]
    G = H // Hkv  # a query head's group shares its key head (GQA), as in the decode kernels
    qp = q.new_zeros(B * Q, H, hd)
    qp[where] = q
    qg = qp.view(B, Q, Hkv, G, hd).permute(0, 2, 1, 3, 4).reshape(B, Hkv, Q * G, hd)
    scores = torch.matmul(qg, keys.transpose(2, 3)).float() * scale  # (B, Hkv, Q*G, T)
    scores = scores.view(B, Hkv, Q, G, T) + mask[:, None, :, None, :]
    probs = torch.softmax(scores, dim=-1).to(q.dtype).view(B, Hkv, Q * G, T)
    out = torch.matmul(probs, values).view(B, Hkv, Q, G, hd).permute(0, 2, 1, 3, 4).reshape(B * Q, H * hd)
    return out[where], pairs

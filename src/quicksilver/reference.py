"""The masked reference path of the engine's layer (``Engine(...)(ids, compact=False)``).

It computes every row and keeps each update only where the compact path computes it, with
the mechanisms' choices written as attention masks. It saves nothing; it exists so that tests
can prove the compact path (gather, compute, scatter) computes the same thing.
"""

from __future__ import annotations

import torch

from .attention import _additive, _sdpa, attend_selected


def layer_masked(engine, l, h, pos, rope, attn_rows, kv_rows, mlp_rows, segments, caches, plans, bits, bias=None):
    """Layer ``l`` over every row of one sequence (no cache), masked as the compact path chooses."""
    p, kv, T = engine.adapter.layers[l], engine.config.kv, h.shape[0]

    def mask_of(rows):
        m = torch.zeros(T, dtype=torch.bool, device=h.device)
        m[pos if rows is None else rows] = True
        return m

    is_q, has_kv, is_mlp = mask_of(attn_rows), mask_of(kv_rows), mask_of(mlp_rows)
    q, k, v = engine.qkv(l, p.attn_norm(h), None, None, None, rope, bits)
    if kv.selects(l) and not kv.dense_prefill:  # the importance rule's visibility per KV head, as its compact path chooses it
        mask = torch.zeros(k.shape[1], T, T, dtype=torch.bool, device=h.device)
        kr = has_kv.nonzero().squeeze(1)
        qr = is_q.nonzero().squeeze(1)
        if qr.numel():
            chosen = attend_selected(q[qr], k[kr], v[kr], pos[qr], pos[kr], p.attn_scale, kv, bias, return_mask=True,
                                     own_window=p.window)[2]
            mask[:, qr[:, None], kr[None, :]] = chosen
    else:
        mask = p.attention_rule(kv, l)[2](pos, pos) & has_kv[None, :]
    mask |= torch.eye(T, dtype=torch.bool, device=h.device) & ~is_q[:, None]  # rows whose output is discarded
    scores_bias = _additive(mask, q.dtype)
    if bias is not None:
        scores_bias = scores_bias + bias(pos, pos).to(q.dtype)
    a = _sdpa(q, k, v, p.attn_scale, mask=scores_bias)
    lin, b = engine.linears[l], engine.bits_of(bits, None)
    h = torch.where(is_q[:, None], h + p.post_attn(lin("o", a, b)), h)
    h = torch.where(is_mlp[:, None], h + p.post_mlp(p.mlp(p.mlp_norm(h), lambda name, t: lin(name, t, b))), h)
    return h, int((mask & is_q[:, None]).sum()) // (mask.shape[0] if mask.dim() == 3 else 1)  # pairs per head

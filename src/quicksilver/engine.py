"""The token-level engine: runs a frozen model's layers itself and skips work row by row.

Per layer, the rows that still compute are gathered into a dense tensor, run through
the projections, attention and MLP, and scattered back (index_add). Mechanisms decide
between layers which rows compute. A masked reference path (``compact=False``) computes
every row and masks the updates instead; it exists to prove in tests that the compact
path computes the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import flops as F_
from .adapters import adapter_for
from .adapters.base import apply_rotary
from .attention import _sdpa, attend, block_plan
from .config import Config


@dataclass
class Ledger:
    """What one forward pass executed, counted as it ran."""

    n_layers: int
    tokens: int = 0
    flops: dict = field(default_factory=lambda: {k: 0 for k in ("projections", "mlp", "attention", "head", "probes")})
    attn_rows: int = 0  # token-layers that computed attention (as queries)
    mlp_rows: int = 0  # token-layers that computed the MLP
    kv_written: int = 0  # K/V entries written, summed over layers
    pairs_seen: int = 0  # (query, key) pairs attended, summed over layers
    pairs_full: int = 0  # the same with every causal pair
    exit_layer_sum: int = 0
    halted_tokens: int = 0

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())

    def as_dict(self) -> dict:
        slots = max(self.tokens * self.n_layers, 1)
        return {
            "tokens": self.tokens,
            "flops": {**self.flops, "total": self.total_flops},
            "mean_exit_layer": self.exit_layer_sum / max(self.tokens, 1),
            "halted_fraction": self.halted_tokens / max(self.tokens, 1),
            "attn_layer_fraction": self.attn_rows / slots,
            "mlp_layer_fraction": self.mlp_rows / slots,
            "kv_written_fraction": self.kv_written / slots,
            "kv_fraction": self.pairs_seen / max(self.pairs_full, 1),
        }

    def merge(self, other: "Ledger") -> None:
        for k in self.flops:
            self.flops[k] += other.flops[k]
        for name in ("tokens", "attn_rows", "mlp_rows", "kv_written", "pairs_seen", "pairs_full", "exit_layer_sum", "halted_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class EngineOutput:
    logits: torch.Tensor  # (rows, vocab) for 1-D input; (B, rows, vocab) for a batch
    ledger: Ledger


def _n(rows: torch.Tensor | None, total: int) -> int:
    return total if rows is None else rows.numel()


def _take(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x.index_select(0, rows)


def _add(h: torch.Tensor, rows: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
    return h + delta if rows is None else h.index_add(0, rows, delta)


class Engine:
    """Run a GPT-2- or Llama-family HF model with QuickSilver's mechanisms.

    Parameters
    ----------
    model : a loaded HF causal LM (its weights are used in place, never copied).
    config : Config, default all mechanisms off (then logits equal the stock forward).
    """

    def __init__(self, model, config: Config | None = None):
        self.model = model
        self.adapter = adapter_for(model)
        self.spec = self.adapter.arch
        self.config = config or Config()
        self.config.halting.check_model(self.spec.n_layers)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, logit_rows: torch.Tensor | None = None, compact: bool = True) -> EngineOutput:
        """Logits at ``logit_rows`` (default: every position) and the run's ledger.

        ``input_ids`` is (T,) or (B, T); rows of a batch run independently.
        """
        if input_ids.dim() == 2:
            outs = [self._forward(row, logit_rows, compact) for row in input_ids]
            ledger = outs[0][1]
            for _, other in outs[1:]:
                ledger.merge(other)
            return EngineOutput(torch.stack([o[0] for o in outs]), ledger)
        logits, ledger = self._forward(input_ids, logit_rows, compact)
        return EngineOutput(logits, ledger)

    def _forward(self, ids: torch.Tensor, logit_rows: torch.Tensor | None, compact: bool):
        A, spec, cfg = self.adapter, self.spec, self.config
        L, T, dev = spec.n_layers, ids.numel(), ids.device
        halting = cfg.halting if cfg.halting.enabled else None
        tail_start = L - halting.tail_layers if halting else L
        pos = torch.arange(T, device=dev)
        h = A.embed(ids, pos)  # (T, d)
        rope = A.rotary(pos)
        computing = torch.ones(T, dtype=torch.bool, device=dev)
        under = torch.zeros(T, dtype=torch.long, device=dev)
        exit_layer = torch.full((T,), L, dtype=torch.long, device=dev)
        ledger = Ledger(n_layers=L, tokens=T)
        self._plans = {}  # block plans of windowed attention over all rows, shared by layers
        for l in range(L):
            if halting is None or not halting.may_skip(l, L) or bool(computing.all()):
                attn_rows = mlp_rows = None  # None: every row
            else:
                mlp_rows = computing.nonzero().squeeze(1)
                attn_rows = None if halting.skip == "mlp" else mlp_rows
            propagate = not cfg.kv.enabled or cfg.kv.policy == "propagate"
            kv_rows = None if (attn_rows is None or propagate) else attn_rows
            h_before = _take(h, mlp_rows)
            layer = self._layer_compact if compact else self._layer_masked
            h = layer(l, h, pos, rope, attn_rows, kv_rows, mlp_rows, ledger)
            if halting and l + 1 < tail_start:
                rows = mlp_rows if mlp_rows is not None else pos
                drift = halting.drift(_take(h, mlp_rows), h_before)
                ledger.flops["probes"] += halting.probe_flops(rows.numel(), spec.d_model)
                under_r, halt_r = halting.decide(drift, under[rows], l + 1, rows)
                under[rows] = under_r
                newly = rows[halt_r]
                computing[newly] = False
                exit_layer[newly] = l + 1
        ledger.exit_layer_sum = int(exit_layer.sum())
        ledger.halted_tokens = int((~computing).sum())
        hx = A.final_norm(_take(h, logit_rows))
        ledger.flops["head"] += F_.head_flops(spec, hx.shape[0])
        return A.head(hx), ledger

    def _qkv(self, l, x_kv, q_in_kv, pos_q, pos_k, rope):
        """Projections of the rows with K/V (x_kv) and of the query rows among them."""
        p, spec = self.adapter.layers[l], self.spec
        k = p.k(x_kv).view(-1, spec.n_kv_heads, spec.head_dim)  # (Tk, Hkv, hd)
        v = p.v(x_kv).view(-1, spec.n_kv_heads, spec.head_dim)
        q = p.q(_take(x_kv, q_in_kv)).view(-1, spec.n_heads, spec.head_dim)  # (Tq, H, hd)
        if rope is not None:
            cos, sin = rope
            q = apply_rotary(q, cos[pos_q], sin[pos_q])
            k = apply_rotary(k, cos[pos_k], sin[pos_k])
        return q, k, v

    def _layer_compact(self, l, h, pos, rope, attn_rows, kv_rows, mlp_rows, ledger):
        p, spec, kv, T = self.adapter.layers[l], self.spec, self.config.kv, h.shape[0]
        x_kv = p.attn_norm(_take(h, kv_rows))  # (Tk, d)
        # Query rows are a subset of the K/V rows (a row that computes writes its K/V).
        q_in_kv = None
        if attn_rows is not None and kv_rows is None:
            q_in_kv = attn_rows
        pos_q, pos_k = _take(pos, attn_rows), _take(pos, kv_rows)
        q, k, v = self._qkv(l, x_kv, q_in_kv, pos_q, pos_k, rope)
        window = kv.window_at(l)
        full = attn_rows is None and kv_rows is None and window is None
        visible = lambda qp, kp: kv.visible(qp, kp, l)  # noqa: E731
        plan = None
        if window is not None and attn_rows is None and kv_rows is None:
            if window not in self._plans:
                self._plans[window] = block_plan(pos_q, pos_k, visible, window, kv.sink_tokens)
            plan = self._plans[window]
        a, pairs = attend(q, k, v, pos_q, pos_k, p.attn_scale, visible, window, kv.sink_tokens, full, plan)
        h = _add(h, attn_rows, p.o(a))
        h = _add(h, mlp_rows, p.mlp(p.mlp_norm(_take(h, mlp_rows))))
        self._count(ledger, T, attn_rows, kv_rows, mlp_rows, pairs, l)
        return h

    def _layer_masked(self, l, h, pos, rope, attn_rows, kv_rows, mlp_rows, ledger):
        """Reference: compute every row, then keep updates only where the compact path computes."""
        p, spec, kv, T = self.adapter.layers[l], self.spec, self.config.kv, h.shape[0]

        def mask_of(rows):
            m = torch.zeros(T, dtype=torch.bool, device=h.device)
            m[pos if rows is None else rows] = True
            return m

        is_q, has_kv, is_mlp = mask_of(attn_rows), mask_of(kv_rows), mask_of(mlp_rows)
        q, k, v = self._qkv(l, p.attn_norm(h), None, pos, pos, rope)
        mask = kv.visible(pos, pos, l) & has_kv[None, :]
        mask |= torch.eye(T, dtype=torch.bool, device=h.device) & ~is_q[:, None]  # rows whose output is discarded
        a = _sdpa(q, k, v, p.attn_scale, mask=mask)
        h = torch.where(is_q[:, None], h + p.o(a), h)
        h = torch.where(is_mlp[:, None], h + p.mlp(p.mlp_norm(h)), h)
        pairs = int((mask & is_q[:, None]).sum())
        self._count(ledger, T, attn_rows, kv_rows, mlp_rows, pairs, l)
        return h

    def _count(self, ledger, T, attn_rows, kv_rows, mlp_rows, pairs, l):
        spec = self.spec
        nq, nk, nm = _n(attn_rows, T), _n(kv_rows, T), _n(mlp_rows, T)
        ledger.flops["projections"] += F_.q_proj_flops(spec, nq) + F_.kv_proj_flops(spec, nk) + F_.o_proj_flops(spec, nq)
        ledger.flops["attention"] += F_.attention_flops(spec, pairs)
        ledger.flops["mlp"] += F_.mlp_flops(spec, nm)
        ledger.attn_rows += nq
        ledger.mlp_rows += nm
        ledger.kv_written += nk
        ledger.pairs_seen += pairs
        ledger.pairs_full += T * (T + 1) // 2

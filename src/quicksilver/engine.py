"""The token-level engine: runs a frozen model's layers itself and skips work row by row.

Per layer, the rows that still compute are gathered into a dense tensor, run through
the projections, attention and MLP, and scattered back (index_add). Mechanisms decide
between layers which rows compute. A masked reference path (``compact=False``) computes
every row and masks the updates instead; it exists to prove in tests that the compact
path computes the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import flops as F_
from .adapters import adapter_for
from .adapters.base import apply_rotary_signed, signed_sin, to_device
from .attention import _additive, _sdpa, attend, attend_selected, block_plan
from .config import Config
from .errors import QuicksilverError
from .generate import token_ids
from .kernels import decode_attention
from .ledger import Ledger
from .mechanisms import kv_select
from .mechanisms.halting import relative_drift


@dataclass
class EngineOutput:
    logits: torch.Tensor  # (rows, vocab) for 1-D input; (B, rows, vocab) for a batch
    ledger: Ledger


def _n(rows: torch.Tensor | None, total: int) -> int:
    return total if rows is None else rows.numel()


def _take(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x.index_select(0, rows)


def _rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Row indices of a mask; None (every row) when there is no mask or it is all true."""
    if mask is None or bool(mask.all()):
        return None
    return mask.nonzero().squeeze(1)


def _positions_in(sub: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    """Where the rows ``sub`` sit inside ``rows`` (both sorted, sub within rows); None: all of them."""
    if sub is None:
        return None
    if rows is None:
        return sub
    if sub.numel() == rows.numel():
        return None
    return torch.searchsorted(rows, sub)


def _group_size_bias(rep: torch.Tensor, members: torch.Tensor, pos: torch.Tensor):
    """Fusion's attention bias: log(1 + members of the key's group at or before the query).

    One sequence, rows in position order. Returns ``bias(q_pos, k_pos) -> (Tq, Tk)``.
    """
    n = rep.numel()
    counts = torch.zeros(n, n, device=rep.device)  # counts[r, t]: members of r at position t
    m_idx = members.nonzero().squeeze(1)
    counts[rep[m_idx], pos[m_idx]] = 1.0
    log_size = torch.log1p(counts.cumsum(dim=1))  # (key row, query position)
    return lambda q_pos, k_pos: log_size[k_pos][:, q_pos].T


def _bounds(rows: torch.Tensor | None, a: int, b: int) -> tuple[int, int]:
    """The index range, within a sorted row list, of the rows in [a, b)."""
    if rows is None:
        return a, b
    return int(torch.searchsorted(rows, a)), int(torch.searchsorted(rows, b))


def _add(h: torch.Tensor, rows: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
    return h + delta if rows is None else h.index_add(0, rows, delta)


class Engine:
    """Run a GPT-2- or Llama-family HF model with QuickSilver's mechanisms.

    Parameters
    ----------
    model : a loaded HF causal LM. Its weights are used in place, never copied; q/k/v and gate/up
        weights are moved once into one buffer each and the HF parameters re-pointed at their rows
        (same values, same memory), so that each group runs as one matmul.
    config : Config or preset name, default all mechanisms off (then logits equal the stock forward).
    calibration_ids : (T,) token ids, optional
        Calibration text for settings that need activation statistics (``amq.smoothing``).
    """

    def __init__(self, model, config: Config | str | None = None, calibration_ids: torch.Tensor | None = None):
        self.model = model
        self.adapter = adapter_for(model)
        self.spec = self.adapter.arch
        self.config = Config.resolve(config)
        spec = self.spec
        self.config.halting.check_model(spec.n_layers)
        self.config.amq.check_model(spec.n_layers, spec.d_model, spec.d_ff)
        self.config.fusion.check_model(spec.n_layers)
        self._linears = [p.linears() for p in self.adapter.layers]
        self._shapes = {n: m.weight.shape for n, m in self._linears[0].items()}
        self._elem = self._linears[0]["q"].weight.element_size()
        self._group_bytes = {(g, b): sum(self._weight_bytes(m, b) for m in _LINEAR_GROUPS[g] if m in self._shapes)
                             for g in _LINEAR_GROUPS for b in (16, 8, 4, 2)}
        self._quant = None
        self._head_q = None  # (QuantizedLinear, bits) when the LM head is quantized
        amq = self.config.amq
        # Every token at one precision: no per-row bit bookkeeping in the layer loop.
        self._uniform_bits = amq.initial_bits() if amq.enabled and not amq.adaptive else None
        self._fused = None  # per layer: {"qkv": ..., "gate_up": ...} quantized linears over concatenated weights
        self._record = None  # per (layer, linear): running max |x| of inputs, while calibrating
        if amq.enabled:
            from .quant import QuantizedLinear, smoothing_factors

            smooth = [{n: None for n in lins} for lins in self._linears]
            if amq.smoothing is not None:
                if calibration_ids is None:
                    from .errors import QuicksilverError

                    raise QuicksilverError("amq.smoothing needs calibration text (Engine(..., calibration_ids=...))")
                absmax = self._activation_absmax(calibration_ids)
                smooth = [{n: smoothing_factors(absmax[l][n], m.weight, amq.smoothing) for n, m in lins.items()}
                          for l, lins in enumerate(self._linears)]
            self._quant = [_LazyQuantized(lins, smooth[l], amq) for l, lins in enumerate(self._linears)]
            if amq.smoothing is None:  # without per-linear smoothing, linears that share an input fuse
                self._fused = [_fused_linears(lins, amq) for lins in self._linears]
            if amq.head_bits is not None:
                head = self.adapter.head_linear()
                group = amq.group_size if amq.group_size and head.in_features % amq.group_size == 0 else None
                self._head_q = (QuantizedLinear(head.weight, head.bias, group), amq.head_bits)
        self._step_key = self._compile_structure()  # None: decode steps always run the eager loop
        self._step_norms = [w for p in self.adapter.layers for w in (p.rms_weights or ())]
        self._step_fns: dict = {}  # linear index of the compiled step -> its callable, resolved once

    @torch.inference_mode()
    def _activation_absmax(self, ids: torch.Tensor, window: int = 512) -> list[dict]:
        """Per layer and linear, the max |input| per channel over the calibration text (unquantized pass)."""
        self._record = [{} for _ in self._linears]
        saved, self.config = self.config, Config()
        ids = ids.to(next(self.model.parameters()).device)
        try:
            for start in range(0, ids.numel(), window):
                self._forward(ids[start : start + window], None, True)
            return self._record
        finally:
            self._record, self.config = None, saved

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, logit_rows: torch.Tensor | None = None, compact: bool = True) -> EngineOutput:
        """Logits at ``logit_rows`` (default: every position) and the run's ledger.

        ``input_ids`` is (T,) or (B, T) token ids (a tensor, or a list of ints); rows of a batch
        run independently. Anything else raises ``QuicksilverError`` with what was wrong.
        """
        input_ids = self._check_ids(input_ids)
        if input_ids.dim() == 2:
            outs = [self._forward(row, logit_rows, compact) for row in input_ids]
            ledger = outs[0][1]
            for _, other in outs[1:]:
                ledger.merge(other)
            return EngineOutput(torch.stack([o[0] for o in outs]), ledger)
        logits, ledger = self._forward(input_ids, logit_rows, compact)
        return EngineOutput(logits, ledger)

    def _check_ids(self, ids) -> torch.Tensor:
        """``ids`` as a non-empty (T,) or (B, T) integer tensor of ids below the vocabulary size."""
        ids = token_ids(ids, self.spec.vocab_size)
        if ids.dim() not in (1, 2) or ids.numel() == 0:
            raise QuicksilverError(f"input_ids must be a non-empty (T,) or (B, T) tensor, got shape {tuple(ids.shape)}")
        return ids

    def _forward(self, ids: torch.Tensor, logit_rows: torch.Tensor | None, compact: bool):
        T = ids.numel()
        return self.run(ids, torch.arange(T, device=ids.device), [(0, T)], [None], logit_rows, compact)

    def run(self, ids, pos, segments, caches, logit_rows=None, compact: bool = True, compile: bool = False):
        """The layer loop over rows that may come from several sequences.

        Parameters
        ----------
        ids, pos : (N,) token ids and their true positions; rows of one sequence are
            contiguous and in order.
        segments : list of (start, stop) row ranges, one per sequence.
        caches : list of SequenceCache or None, one per segment: earlier entries that the
            segment's queries also see; the segment's new K/V are appended (prefill/decode).
        logit_rows : (n,) rows whose logits are returned; None: every row.
        compile : run a pooled decode step through the compiled layer loop where it applies
            (``quicksilver.compiled``); the eager loop otherwise or if compiling fails.

        Returns (logits (n, vocab), Ledger).
        """
        if compile and compact and self._step_key is not None and logit_rows is None and _shared_pool(segments, caches):
            out = self._run_compiled(ids, pos, caches)
            if out is not None:
                return out
        A, spec, cfg = self.adapter, self.spec, self.config
        L, N, dev = spec.n_layers, ids.numel(), ids.device
        if not compact and (len(segments) > 1 or any(c is not None for c in caches)):
            raise ValueError("the masked reference path runs one sequence without a cache")
        halting = cfg.halting if cfg.halting.enabled else None
        tail_start = L - halting.tail_layers if halting else L
        h = A.embed(ids, pos)  # (N, d)
        rope = A.rotary(pos)
        if rope is not None:  # the sign of rotate_half folded into the table once per pass, not per layer
            rope = {k: (c, signed_sin(s)) for k, (c, s) in rope.items()} if isinstance(rope, dict) else (rope[0], signed_sin(rope[1]))
        computing = torch.ones(N, dtype=torch.bool, device=dev)
        under = torch.zeros(N, dtype=torch.long, device=dev)
        exit_layer = torch.full((N,), L, dtype=torch.long, device=dev)
        amq = cfg.amq if cfg.amq.enabled else None
        bits = torch.full((N,), amq.initial_bits() if amq else 16, dtype=torch.long, device=dev)
        ledger = Ledger(n_layers=L, tokens=N)
        full_pairs = int((pos + 1).sum())  # every query sees its whole past in the stock model
        plans: dict = {}  # block plans of windowed attention, shared by layers with the same window
        layer = self._layer_compact if compact else self._layer_masked
        # Fusion applies to one sequence without a cache (a forward pass or a prefill-free eval).
        fusion = cfg.fusion if cfg.fusion.enabled and len(segments) == 1 and caches[0] is None else None
        alive = rep = h_at_fusion = bias = None  # set once fusion has decided
        propagate = not cfg.kv.enabled or cfg.kv.policy == "propagate"
        for l in range(L):
            if A.layers[l].device != h.device:  # a device_map: the rows' state follows the layer's weights
                dev = A.layers[l].device
                h, pos, rope, computing, under, exit_layer, bits, alive, rep, h_at_fusion = to_device(
                    dev, h, pos, rope, computing, under, exit_layer, bits, alive, rep, h_at_fusion)
                plans.clear()
                bias = _group_size_bias(rep, ~alive, pos) if alive is not None else None
            skipping = halting is not None and halting.may_skip(l, L) and not bool(computing.all())
            mlp_m = computing if skipping else None
            attn_m = computing if skipping and halting.skip == "layer" else None
            kv_m = None if propagate else attn_m  # propagate: skipped rows still get K/V
            if alive is not None:  # fused members compute nothing and write no K/V
                mlp_m, attn_m, kv_m = (alive if m is None else m & alive for m in (mlp_m, attn_m, kv_m))
            mlp_rows, attn_rows, kv_rows = _rows(mlp_m), _rows(attn_m), _rows(kv_m)
            h_in, h_before = h, _take(h, mlp_rows)  # layers return new tensors: h_in stays intact
            h, pairs = layer(l, h, pos, rope, attn_rows, kv_rows, mlp_rows, segments, caches, plans, bits, bias)
            self._count(ledger, N, attn_rows, kv_rows, mlp_rows, pairs, full_pairs, bits)
            if halting and l + 1 < tail_start:
                rows = mlp_rows if mlp_rows is not None else torch.arange(N, device=dev)
                drift = halting.drift(_take(h, mlp_rows), h_before)
                ledger.flops["probes"] += halting.probe_flops(rows.numel(), spec.d_model)
                under_r, halt_r = halting.decide(drift, under[rows], l + 1, pos[rows])
                under[rows] = under_r
                newly = rows[halt_r]
                computing[newly] = False
                exit_layer[newly] = l + 1
            if amq and amq.adaptive and l + 1 == amq.decision_layer:
                bits = amq.bits_for(relative_drift(h, h_in), pos)
                ledger.flops["probes"] += amq.probe_flops(N, spec.d_model)
            if fusion and l + 1 == fusion.layer:
                rep = fusion.representatives(h, pos)
                ledger.flops["probes"] += fusion.probe_flops(N, spec.d_model)
                members = rep != torch.arange(N, device=dev)
                if bool(members.any()):
                    alive, h_at_fusion = ~members, h
                    bias = _group_size_bias(rep, members, pos)
                    exit_layer[members] = torch.minimum(exit_layer[members], torch.full_like(exit_layer[members], l + 1))
                    ledger.fused_tokens = int(members.sum())
        if alive is not None:  # a member's final state comes from its representative
            m_idx = (~alive).nonzero().squeeze(1)
            r_idx = rep[m_idx]
            if fusion.output == "delta":
                final = h_at_fusion[m_idx] + (h[r_idx] - h_at_fusion[r_idx])
            else:
                final = h[r_idx]
            h = h.index_copy(0, m_idx, final)
        for (a, b), cache in zip(segments, caches):
            if cache is not None:
                cache.length = int(pos[b - 1]) + 1
                cache.note_peak()
        ledger.exit_layer_sum = int(exit_layer.sum())
        ledger.halted_tokens = int((~computing).sum())
        return self._logits(h, ids, logit_rows, ledger)

    def _logits(self, h, ids, logit_rows, ledger):
        """Final norm and LM head of the rows ``logit_rows`` (None: every row); (logits, ledger)."""
        A, spec = self.adapter, self.spec
        h, logit_rows = to_device(A.output_device, h, logit_rows)
        hx = A.final_norm(_take(h, logit_rows))
        ledger.flops["head"] += F_.head_flops(spec, hx.shape[0])
        if self._head_q is not None:
            head, head_bits = self._head_q
            return head(hx, head_bits).to(ids.device), ledger
        return A.head(hx).to(ids.device), ledger

    def _compile_structure(self):
        """The shape of this engine's compiled decode step (``compiled.llama_step``'s arguments),
        or None where the step cannot be compiled: a mechanism that changes the layer loop, per-row
        precisions, layers spread over devices, or layers other than plain Llama ones."""
        cfg, spec, layers = self.config, self.spec, self.adapter.layers
        if cfg.halting.enabled or cfg.kv.enabled or cfg.fusion.enabled:
            return None
        if self._quant is not None and self._uniform_bits is None:
            return None
        plain = all(p.rms_eps is not None and p.rms_eps == layers[0].rms_eps and p.q_norm is None and p.k_norm is None
                    and p.attn_out_norm is None and p.mlp_out_norm is None and p.window is None and p.rope_key is None
                    and p.device == layers[0].device for p in layers)
        if not plain or not spec.gated_mlp:
            return None
        return (spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.d_model, spec.d_ff, layers[0].rms_eps)

    def _run_compiled(self, ids, pos, caches):
        """A pooled decode step (one row per cache) through the compiled layer loop; None if the
        compiler failed (the caches are then as before the call, and the caller runs eagerly)."""
        from . import compiled

        A, spec = self.adapter, self.spec
        N = ids.numel()
        seen = sum(c.count(0) for c in caches) + N  # every row reads its whole past and itself
        saved = [(c.length, list(c._n)) for c in caches]
        h = A.embed(ids, pos)
        cos, sin = A.rotary(pos)
        fn = compiled.compiled_step(self._step_key, lambda: compiled.llama_step(*self._step_key))
        h = compiled.run(self, fn, (h, cos, signed_sin(sin), pos, self._step_norms), caches, {})
        if h is None:  # nothing was kept of a failed call: the eager loop runs the step again
            for c, (length, n) in zip(caches, saved):
                c.length, c._n = length, n
            return None
        ledger = Ledger(n_layers=spec.n_layers, tokens=N)
        full_pairs = int((pos + 1).sum())
        for _ in range(spec.n_layers):
            self._count(ledger, N, None, None, None, seen, full_pairs, None)
        for c, p in zip(caches, pos.tolist()):
            c.length = p + 1
            c.note_peak()
        ledger.exit_layer_sum = N * spec.n_layers
        return self._logits(h, ids, None, ledger)

    def _compile_pays(self, rows: int) -> bool:
        """Whether the compiled decode step measured faster than the eager one on this machine, for
        this model's shape and dtype, at ``rows`` rows (bucketed 1 / 8 as the kernels; cached)."""
        from .kernels import kernel_table

        dtype = next(self.model.parameters()).dtype
        b = 1 if rows < 3 else 8
        key = f"decode-step/{'x'.join(map(str, self._step_key))}/{str(dtype).removeprefix('torch.')}"
        return kernel_table().fastest(key, str(b), ["eager", "compiled"], lambda: self._measure_step(b)) == "compiled"

    def _measure_step(self, rows: int, keys: int = 128) -> dict[str, float]:
        """Microseconds of one pooled decode step, eager and compiled (compiling first), over a
        scratch cache of ``keys`` entries per row; a compiler failure measures as infinitely slow."""
        from . import compiled
        from .cache import CachePool
        from .kernels import time_call

        param = next(self.model.parameters())
        spec = self.spec
        caches = CachePool(spec.n_layers, rows, keys + 1, spec.n_kv_heads, spec.head_dim, param.dtype, param.device).rows
        ids = torch.zeros(rows, dtype=torch.long, device=param.device)
        pos = torch.full((rows,), keys, dtype=torch.long, device=param.device)
        segments = [(i, i + 1) for i in range(rows)]

        def step(use):
            for c in caches:  # the same step again: entries past ``keys`` are overwritten
                c._n, c.length = [keys] * spec.n_layers, keys
            self.run(ids, pos, segments, caches, compile=use)

        eager = time_call(lambda: step(False), reps=15, budget_s=1.0) * 1e6
        step(True)  # compiles
        if compiled.failed() is not None:
            return {"eager": eager, "compiled": float("inf")}
        return {"eager": eager, "compiled": time_call(lambda: step(True), reps=15, budget_s=1.0) * 1e6}

    def _step_linear(self, fn: int, x: torch.Tensor) -> torch.Tensor:
        """Linear ``fn = 4 l + j`` of the compiled step (j: qkv, o, gate_up, down), as the eager layer runs it."""
        f = self._step_fns.get(fn)
        if f is None:
            f = self._step_fns[fn] = self._step_linear_fn(fn)
        return f(x)

    def _step_linear_fn(self, fn: int):
        l, j = divmod(fn, 4)
        p = self.adapter.layers[l]
        if j in (0, 2):
            group, names, plain = ("qkv", ("q", "k", "v"), p.qkv) if j == 0 else ("gate_up", ("gate", "up"), p.gate_up)
            if self._fused is not None and group in self._fused[l]:
                return lambda x, f=self._fused[l][group], b=self._uniform_bits: f(x, b)
            if self._quant is None and plain is not None:
                return plain
            return lambda x: torch.cat([self._lin(l, n, x, None, None) for n in names], dim=-1)
        name = "o" if j == 1 else "down"
        if self._quant is None:
            return self._linears[l][name]
        return lambda x, f=self._quant[l][name], b=self._uniform_bits: f(x, b)

    def _step_attend(self, l, q, k, v, pos, caches, plans):
        """Attention of layer l in the compiled step: the pooled decode attention, cache writes included."""
        return self._pooled_decode(l, q, k, v, pos, caches, self.adapter.layers[l].attn_scale, plans)[0]

    def generate(self, prompts, max_new_tokens: int = 64, **kwargs):
        """Autoregressive generation with this engine's mechanisms; see ``quicksilver.generate.generate``."""
        from .generate import generate

        return generate(self, prompts, max_new_tokens, **kwargs)

    def _lin(self, l, name, x, rows, bits):
        """Linear ``name`` of layer l on rows ``rows`` (None: all), each at its bit-width."""
        if self._quant is None:
            if self._record is not None:
                seen = x.detach().abs().amax(dim=0)
                prev = self._record[l].get(name)
                self._record[l][name] = seen if prev is None else torch.maximum(prev, seen)
            return self._linears[l][name](x)
        return self._quant[l][name](x, self._bits_of(bits, rows))

    def _lin_fn(self, l, rows, bits):
        return lambda name, x: self._lin(l, name, x, rows, bits)

    def _qkv(self, l, x_kv, q_in_kv, q_rows, k_rows, rope, bits):
        """Projections of the rows with K/V (x_kv) and of the query rows among them.

        ``rope`` holds per-row (cos, sin) tables; ``q_rows``/``k_rows`` pick the rows (None: all).
        """
        spec = self.spec
        fused = None
        if q_in_kv is None:  # queries are the K/V rows: one matmul for q, k and v
            if self._fused is not None:
                fused = self._fused[l]["qkv"](x_kv, self._bits_of(bits, k_rows))
            elif self._quant is None and self._record is None and self.adapter.layers[l].qkv is not None:
                fused = self.adapter.layers[l].qkv(x_kv)
        if fused is not None:
            q, k, v = fused.split([spec.q_dim, spec.kv_dim, spec.kv_dim], dim=-1)
            q = q.reshape(-1, spec.n_heads, spec.head_dim)
            k = k.reshape(-1, spec.n_kv_heads, spec.head_dim)
            v = v.reshape(-1, spec.n_kv_heads, spec.head_dim)
        else:
            k = self._lin(l, "k", x_kv, k_rows, bits).view(-1, spec.n_kv_heads, spec.head_dim)  # (Nk, Hkv, hd)
            v = self._lin(l, "v", x_kv, k_rows, bits).view(-1, spec.n_kv_heads, spec.head_dim)
            q = self._lin(l, "q", _take(x_kv, q_in_kv), q_rows, bits).view(-1, spec.n_heads, spec.head_dim)  # (Nq, H, hd)
        q, k = self.adapter.layers[l].qk_norm(q, k)  # identity unless the family has QK-norm (Gemma-3)
        if rope is not None:
            cos, sin = self.adapter.layers[l].rope_tables(rope)  # sin carries rotate_half's sign (signed_sin)
            q = apply_rotary_signed(q, _take(cos, q_rows), _take(sin, q_rows))
            k = apply_rotary_signed(k, _take(cos, k_rows), _take(sin, k_rows))
        return q, k, v

    def _layer_compact(self, l, h, pos, rope, attn_rows, kv_rows, mlp_rows, segments, caches, plans, bits, bias=None):
        p, kv = self.adapter.layers[l], self.config.kv
        x_kv = p.attn_norm(_take(h, kv_rows))  # (Nk, d)
        q_in_kv = _positions_in(attn_rows, kv_rows)
        pos_q, pos_k = _take(pos, attn_rows), _take(pos, kv_rows)
        q, k, v = self._qkv(l, x_kv, q_in_kv, attn_rows, kv_rows, rope, bits)
        layer_window, sinks, visible = p.attention_rule(kv, l)  # KV skipping within the family's own window
        selecting = kv.selects(l)
        outs, pairs = [], 0
        # A decode step of a batch whose caches share a pool: one attention call for every row.
        pooled = (not kv.enabled and layer_window is None and bias is None and attn_rows is None and kv_rows is None
                  and _shared_pool(segments, caches))
        if pooled:
            out, pairs = self._pooled_decode(l, q, k, v, pos, caches, p.attn_scale, plans)
            outs.append(out)
        elif (not kv.enabled and layer_window is None and bias is None and attn_rows is None and kv_rows is None
              and _pooled_verify_applies(l, segments, caches)):  # a speculative verify pass over pooled rows
            out, pairs = self._pooled_verify(l, q, k, v, pos, segments, caches, p.attn_scale, plans)
            outs.append(out)
            pooled = True
        for (a, b), cache in ([] if pooled else zip(segments, caches)):
            qa, qb = _bounds(attn_rows, a, b)
            ka, kb = _bounds(kv_rows, a, b)
            keys, values, k_pos = k[ka:kb], v[ka:kb], pos_k[ka:kb]
            fresh = cache is None or cache.count(l) == 0
            if cache is not None:  # written in place into the preallocated cache; attend to its live view
                cache.append(l, keys, values, k_pos)
                if not fresh:
                    e = cache.get(l)
                    keys, values, k_pos = e.k, e.v, e.pos
            if qb > qa and selecting and (cache is None or kv.selection == "quest") and not (kv.dense_prefill and fresh):
                pages = None
                if cache is not None:  # quest's page summaries live beside the cache, computed once per page
                    pages, coarse = cache.pages[l], (kv.block_pages or kv.page_size) // kv.page_size
                    if pages is None or (pages.page, pages.coarse) != (kv.page_size, coarse):  # another engine's pages
                        pages = cache.pages[l] = kv_select.PageSummaries(kv.page_size, coarse)
                out, seen, _ = attend_selected(q[qa:qb], keys, values, pos_q[qa:qb], k_pos, p.attn_scale, kv, bias, pages=pages)
                outs.append(out)
                pairs += seen
            elif qb > qa:  # an eviction rule's cache holds only what its queries may read: plain causal
                whole = fresh and attn_rows is None and kv_rows is None
                plan, window = None, layer_window
                if window is not None and int(pos_q[qb - 1]) - int(k_pos[0]) < window:
                    window = None  # every key of this segment lies inside every query's window: nothing to skip
                if window is not None and whole and len(segments) == 1:
                    if (window, sinks, p.window) not in plans:
                        plans[(window, sinks, p.window)] = block_plan(pos_q, k_pos, visible, window, sinks, q.dtype)
                    plan = plans[(window, sinks, p.window)]
                out, seen = attend(q[qa:qb], keys, values, pos_q[qa:qb], k_pos, p.attn_scale, visible, window,
                                   sinks, whole and window is None, plan, bias)
                outs.append(out)
                pairs += seen
            if cache is not None:
                if layer_window is not None:
                    cache.evict(l, int(pos[b - 1]) + 1, layer_window, sinks)
                elif qb > qa and kv.evicts(l) and (fresh or kv.selection != "snapkv"):  # snapkv compresses prompts only
                    self._compress(cache, l, kv, q[qa:qb], pos_q[qa:qb], p.attn_scale, 0 if fresh else max(8, cache.count(l) // 32))
        if outs:  # a decode step whose only row halted has no query here
            h = _add(h, attn_rows, p.post_attn(self._lin(l, "o", torch.cat(outs), attn_rows, bits)))
        if mlp_rows is None or mlp_rows.numel():
            gate_up = None
            if self._fused is not None and "gate_up" in self._fused[l]:
                gate_up = lambda x, f=self._fused[l]["gate_up"], b=self._bits_of(bits, mlp_rows): f(x, b)  # noqa: E731
            elif self._quant is None and self._record is None:
                gate_up = p.gate_up
            h = _add(h, mlp_rows, p.post_mlp(p.mlp(p.mlp_norm(_take(h, mlp_rows)), self._lin_fn(l, mlp_rows, bits), gate_up)))
        return h, pairs

    def _pooled_decode(self, l, q, k, v, pos, caches, scale, plans):
        """One query row per cache, caches rows of one pool: write the new entries, attend in one call.

        q (B, H, hd), k/v (B, Hkv, hd), pos (B,). Returns ((B, H*hd), pairs seen). The index
        tensors and the mask are built once per step and shared by layers with the same counts.
        """
        pool = caches[0].pool
        n = [c.count(l) for c in caches]
        slots = [c.slot for c in caches]
        step = plans.get(("pooled", tuple(n), tuple(slots)))
        if step is None:
            step = plans[("pooled", tuple(n), tuple(slots))] = self._pooled_step(n, slots, q)
        slot_t, at, mask = step
        if len(n) == 1:  # one row: a plain copy, no advanced indexing
            pool.k[l][slots[0], :, n[0]] = k[0]
            pool.v[l][slots[0], :, n[0]] = v[0]
            pool.pos[l][slots[0], n[0]] = pos[0]
        else:
            pool.k[l][slot_t, :, at] = k  # row i's new entry into its next free slot (buffers are head-major)
            pool.v[l][slot_t, :, at] = v
            pool.pos[l][slot_t, at] = pos
        for c, m in zip(caches, n):
            c._n[l] = m + 1
        T = max(n) + 1
        if slots == list(range(slots[0], slots[0] + len(slots))):  # (B, Hkv, T, hd) views, no copy
            keys, values = pool.k[l][slots[0] : slots[-1] + 1, :, :T], pool.v[l][slots[0] : slots[-1] + 1, :, :T]
        else:
            keys, values = pool.k[l][slot_t, :, :T], pool.v[l][slot_t, :, :T]
        return decode_attention(q, keys, values, mask, scale), sum(n) + len(n)

    def _pooled_verify(self, l, q, k, v, pos, segments, caches, scale, plans):
        """A few query rows per cache (a speculative verify pass), caches rows of one pool: one
        indexed write of every new entry and one batched attention call, each row masked to its
        own sequence's entries up to its position (instead of a write and a call per sequence).

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
        pool.k[l][slot_t, :, at] = k  # each row's entry into its sequence's next free slots (head-major)
        pool.v[l][slot_t, :, at] = v
        pool.pos[l][slot_t, at] = pos
        for c, m, L in zip(caches, n, lens):
            c._n[l] = m + L
        if slots == list(range(slots[0], slots[0] + B)):  # (B, Hkv, T, hd) views, no copy
            keys, values = pool.k[l][slots[0] : slots[0] + B, :, :T], pool.v[l][slots[0] : slots[0] + B, :, :T]
        else:
            idx = torch.tensor(slots, device=q.device)
            keys, values = pool.k[l][idx, :, :T], pool.v[l][idx, :, :T]
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

    @staticmethod
    def _pooled_step(n, slots, q):
        """(slot index, next free entry per row, additive (B, T) mask or None) of one pooled decode step."""
        slot_t, at = torch.tensor(slots, device=q.device), torch.tensor(n, device=q.device)
        mask = None
        if min(n) != max(n):  # rows of different lengths: each row reads only its own entries
            T = max(n) + 1
            mask = _additive(torch.arange(T, device=q.device)[None, :] <= at[:, None], q.dtype)  # (B, T)
        return slot_t, at, mask

    @staticmethod
    def _compress(cache, l, kv, q, q_pos, scale, slack):
        """Drop the cache entries an eviction rule ranks lowest (prefill: down to its target at once)."""
        e = cache.get(l)
        index = kv_select.compress_index(kv.selection, kv.keep_fraction, e.k, e.pos, q, q_pos, scale, kv.sink_tokens,
                                         kv.recent_at(l), kv.observation, slack, kv.min_keys)
        if index is not None:
            cache.keep(l, index)

    def _layer_masked(self, l, h, pos, rope, attn_rows, kv_rows, mlp_rows, segments, caches, plans, bits, bias=None):
        """Reference: compute every row, then keep updates only where the compact path computes."""
        p, kv, T = self.adapter.layers[l], self.config.kv, h.shape[0]

        def mask_of(rows):
            m = torch.zeros(T, dtype=torch.bool, device=h.device)
            m[pos if rows is None else rows] = True
            return m

        is_q, has_kv, is_mlp = mask_of(attn_rows), mask_of(kv_rows), mask_of(mlp_rows)
        q, k, v = self._qkv(l, p.attn_norm(h), None, None, None, rope, bits)
        if kv.selects(l) and not kv.dense_prefill:  # the importance rule's visibility per KV head, as its compact path chooses it
            mask = torch.zeros(k.shape[1], T, T, dtype=torch.bool, device=h.device)
            kr = has_kv.nonzero().squeeze(1)
            qr = is_q.nonzero().squeeze(1)
            if qr.numel():
                chosen = attend_selected(q[qr], k[kr], v[kr], pos[qr], pos[kr], p.attn_scale, kv, bias, return_mask=True)[2]
                mask[:, qr[:, None], kr[None, :]] = chosen
        else:
            mask = p.attention_rule(kv, l)[2](pos, pos) & has_kv[None, :]
        mask |= torch.eye(T, dtype=torch.bool, device=h.device) & ~is_q[:, None]  # rows whose output is discarded
        scores_bias = _additive(mask, q.dtype)
        if bias is not None:
            scores_bias = scores_bias + bias(pos, pos).to(q.dtype)
        a = _sdpa(q, k, v, p.attn_scale, mask=scores_bias)
        h = torch.where(is_q[:, None], h + p.post_attn(self._lin(l, "o", a, None, bits)), h)
        h = torch.where(is_mlp[:, None], h + p.post_mlp(p.mlp(p.mlp_norm(h), self._lin_fn(l, None, bits))), h)
        return h, int((mask & is_q[:, None]).sum()) // (mask.shape[0] if mask.dim() == 3 else 1)  # pairs per head

    def _count(self, ledger, T, attn_rows, kv_rows, mlp_rows, pairs, full_pairs, bits):
        spec = self.spec
        nq, nk, nm = _n(attn_rows, T), _n(kv_rows, T), _n(mlp_rows, T)
        ledger.flops["projections"] += F_.q_proj_flops(spec, nq) + F_.kv_proj_flops(spec, nk) + F_.o_proj_flops(spec, nq)
        ledger.flops["attention"] += F_.attention_flops(spec, pairs)
        ledger.flops["mlp"] += F_.mlp_flops(spec, nm)
        ledger.attn_rows += nq
        ledger.mlp_rows += nm
        ledger.kv_written += nk
        ledger.pairs_seen += pairs
        ledger.pairs_full += full_pairs
        # Precision ledger: linear FLOPs weighted by bits/16 and the weight bytes each call reads.
        parts = (("q", attn_rows, F_.q_proj_flops(spec, 1)), ("k", kv_rows, F_.kv_proj_flops(spec, 1)),
                 ("o", attn_rows, F_.o_proj_flops(spec, 1)), ("mlp", mlp_rows, F_.mlp_flops(spec, 1)))
        if self._quant is None or self._uniform_bits is not None:  # one precision: no per-row bookkeeping
            value = 16 if self._quant is None else self._uniform_bits
            for name, rows, per_row in parts:
                n = _n(rows, T)
                ledger.bit_linear_flops += per_row * n * value / 16
                if n:
                    ledger.weight_bytes += self._group_bytes[name, value]
            ledger.bits_hist[value] += nm
            return
        for name, rows, per_row in parts:
            b = _take(bits, rows)
            if b.numel() == 0:
                continue
            ledger.bit_linear_flops += per_row * float(b.sum()) / 16
            for present in torch.unique(b).tolist():  # each precision group reads its weights once
                for m in _LINEAR_GROUPS[name]:
                    if m in self._shapes:
                        ledger.weight_bytes += self._weight_bytes(m, present)
        for b_val, count in zip(*torch.unique(_take(bits, mlp_rows), return_counts=True)):
            ledger.bits_hist[int(b_val)] += int(count)

    def _bits_of(self, bits: torch.Tensor, rows: torch.Tensor | None):
        """The rows' bit-widths: one int when every token runs the same precision, else (n,)."""
        return self._uniform_bits if self._uniform_bits is not None else _take(bits, rows)

    def _weight_bytes(self, name: str, bits: int) -> int:
        from .quant import weight_bytes

        shape = self._shapes[name]
        if bits == 16:  # unquantized: the weights in the model's own dtype
            return shape[0] * shape[1] * self._elem
        return weight_bytes(shape, bits, self.config.amq.group_size)


class _LazyQuantized(dict):
    """One layer's quantized linears by name, each quantized on first use (a layer whose q/k/v
    and gate/up always run fused never builds them separately)."""

    def __init__(self, lins: dict, smooth: dict, amq):
        super().__init__()
        self._lins, self._smooth, self._amq = lins, smooth, amq

    def __missing__(self, name: str):
        from .quant import QuantizedLinear

        m, amq = self._lins[name], self._amq
        self[name] = QuantizedLinear(m.weight, m.bias, amq.group_size, self._smooth[name], amq.activation_quant)
        return self[name]


def _shared_pool(segments, caches) -> bool:
    """Every segment is one row whose cache is a row of the same, still pooled, CachePool."""
    first = caches[0] if caches else None
    pool = None if first is None else first.pool
    if pool is None:
        return False
    return all(b - a == 1 for a, b in segments) and all(c is not None and c.pool is pool for c in caches)


def _pooled_verify_applies(l: int, segments, caches, most_rows: int = 64) -> bool:
    """Short segments (a verify pass, not a prefill) whose caches are non-empty rows of one pool with room."""
    pool = caches[0].pool if caches and caches[0] is not None else None
    if pool is None:
        return False
    room = pool.k[l].shape[2]
    for (a, b), c in zip(segments, caches):
        if c is None or c.pool is not pool or b - a > most_rows or c.count(l) == 0 or c.count(l) + b - a > room:
            return False
    return True


def _fused_linears(lins: dict, amq) -> dict:
    """Quantized linears over concatenated weights of linears that read the same input.

    Scales are per output channel (or per output channel and input group), so quantizing
    the concatenation gives exactly the codes of each part: the same function, fewer calls.
    """
    from .quant import QuantizedLinear

    def cat(names):
        ws = [lins[n].weight for n in names]
        bs = [lins[n].bias for n in names]
        bias = None if all(b is None for b in bs) else torch.cat(
            [b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(ws, bs)])
        return QuantizedLinear(torch.cat(ws), bias, amq.group_size, None, amq.activation_quant)

    fused = {"qkv": cat(("q", "k", "v"))}
    if "gate" in lins:
        fused["gate_up"] = cat(("gate", "up"))
    return fused


_LINEAR_GROUPS = {"q": ("q",), "k": ("k", "v"), "o": ("o",), "mlp": ("gate", "up", "down", "fc", "proj")}

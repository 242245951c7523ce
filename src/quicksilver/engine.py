"""The token-level engine: runs a frozen model's layers itself and skips work row by row.

Per layer, the rows that still compute are gathered into a dense tensor, run through
the projections, attention and MLP, and scattered back (index_add). Mechanisms decide
between layers which rows compute. A masked reference path (``compact=False``,
``quicksilver.reference``) computes every row and masks the updates instead; it exists to
prove in tests that the compact path computes the same thing.

``Engine.run`` is the runner contract the decoding core drives (``decoding.Runner``): ids,
true positions, one row range per sequence and one cache per sequence in; logits and the
ledger of what ran out. Other step implementations (``quicksilver.compiled``, the native
layer) run a pooled decode step through this engine's public pieces: ``linears``,
``logits``, ``count_layer`` and the pooled attention of ``quicksilver.pooled``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import pooled, reference
from . import rows as R
from .adapters import adapter_for
from .adapters.base import apply_rotary_signed, signed_sin
from .attention import attend, attend_selected, block_plan
from .config import Config
from .errors import QuicksilverError
from .flops import head_flops
from .ledger import Ledger
from .linears import LayerLinears, QuantizedLinear, WeightBytes, smoothing
from .mechanisms import kv_select
from .mechanisms.halting import relative_drift
from .tokens import token_ids


@dataclass
class EngineOutput:
    logits: torch.Tensor  # (rows, vocab) for 1-D input; (B, rows, vocab) for a batch
    ledger: Ledger


class Engine:
    """Run a GPT-2-, Llama- or Gemma-3-family HF model with QuickSilver's mechanisms.

    Parameters
    ----------
    model : a loaded HF causal LM. Its weights are used in place, never copied; q/k/v and gate/up
        weights are moved once into one buffer each and the HF parameters re-pointed at their rows
        (same values, same memory), so that each group runs as one matmul.
    config : Config or preset name, default all mechanisms off (then logits equal the stock forward).
    calibration_ids : (T,) token ids, optional
        Calibration text for settings that need activation statistics (``amq.smoothing``).

    Attributes
    ----------
    linears : per layer, its linears resolved once (``linears.LayerLinears``: plain, fused or quantized)
    uniform_bits : the one precision every token runs at (16: stock weights), None when AMQ picks per token
    """

    def __init__(self, model, config: Config | str | None = None, calibration_ids: torch.Tensor | None = None):
        self.model = model
        self.adapter = adapter_for(model)
        self.spec = spec = self.adapter.arch
        self.config = Config.resolve(config)
        amq = self.config.amq
        self.config.halting.check_model(spec.n_layers)
        amq.check_model(spec.n_layers, spec.d_model, spec.d_ff)
        self.config.fusion.check_model(spec.n_layers)
        plain = [p.linears() for p in self.adapter.layers]
        self.weight_bytes = WeightBytes(plain[0], amq.group_size, amq.scheme == "q4_1")
        self.quantized = amq.enabled
        self.uniform_bits = 16 if not amq.enabled else None if amq.adaptive else amq.initial_bits()
        self.head_q = None  # (QuantizedLinear, bits) when the LM head is quantized
        self.linears = [LayerLinears(lins, p.qkv, p.gate_up) for lins, p in zip(plain, self.adapter.layers)]
        if amq.enabled:
            smooth = [None] * spec.n_layers
            if amq.smoothing is not None:
                if calibration_ids is None:
                    raise QuicksilverError("amq.smoothing needs calibration text (Engine(..., calibration_ids=...))")
                smooth = smoothing(plain, self._activation_absmax(plain, calibration_ids), amq.smoothing)
            self.linears = [LayerLinears.quantized(lins, amq, smooth[l]) for l, lins in enumerate(plain)]
            if amq.head_bits is not None:
                head = self.adapter.head_linear()
                # per output channel under q4_1 (its groups are the decoder's grid; the head is int8)
                group = amq.group_size if amq.group_size and head.in_features % amq.group_size == 0 and amq.scheme != "q4_1" else None
                self.head_q = (QuantizedLinear(head.weight, head.bias, group), amq.head_bits)

    @torch.inference_mode()
    def _activation_absmax(self, plain: list[dict], ids: torch.Tensor, window: int = 512) -> list[dict]:
        """Per layer and linear, the max |input| per channel over the calibration text (stock weights, mechanisms off)."""
        seen = [{} for _ in plain]
        saved = self.config, self.quantized, self.uniform_bits, self.linears
        self.config, self.quantized, self.uniform_bits = Config(), False, 16
        self.linears = [LayerLinears.recording(lins, s) for lins, s in zip(plain, seen)]
        ids = ids.to(next(self.model.parameters()).device)
        try:
            for start in range(0, ids.numel(), window):
                self._forward(ids[start : start + window], None, True)
            return seen
        finally:
            self.config, self.quantized, self.uniform_bits, self.linears = saved

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, logit_rows: torch.Tensor | None = None, compact: bool = True) -> EngineOutput:
        """Logits at ``logit_rows`` (default: every position) and the run's ledger.

        ``input_ids`` is (T,) or (B, T) token ids (a tensor, or a list of ints); rows of a batch
        run independently. Anything else raises ``QuicksilverError`` with what was wrong.
        """
        input_ids = token_ids(input_ids, self.spec.vocab_size)
        if input_ids.dim() not in (1, 2) or input_ids.numel() == 0:
            raise QuicksilverError(f"input_ids must be a non-empty (T,) or (B, T) tensor, got shape {tuple(input_ids.shape)}")
        if input_ids.dim() == 2:
            outs = [self._forward(row, logit_rows, compact) for row in input_ids]
            ledger = outs[0][1]
            for _, other in outs[1:]:
                ledger.merge(other)
            return EngineOutput(torch.stack([o[0] for o in outs]), ledger)
        return EngineOutput(*self._forward(input_ids, logit_rows, compact))

    def _forward(self, ids: torch.Tensor, logit_rows: torch.Tensor | None, compact: bool):
        T = ids.numel()
        return self.run(ids, torch.arange(T, device=ids.device), [(0, T)], [None], logit_rows, compact)

    def run(self, ids, pos, segments, caches, logit_rows=None, compact: bool = True):
        """The layer loop over rows that may come from several sequences.

        Parameters
        ----------
        ids, pos : (N,) token ids and their true positions; rows of one sequence are
            contiguous and in order.
        segments : list of (start, stop) row ranges, one per sequence.
        caches : list of SequenceCache or None, one per segment: earlier entries that the
            segment's queries also see; the segment's new K/V are appended (prefill/decode).
        logit_rows : (n,) rows whose logits are returned; None: every row.

        Returns (logits (n, vocab), Ledger).
        """
        A, spec, cfg = self.adapter, self.spec, self.config
        L, N, dev = spec.n_layers, ids.numel(), ids.device
        if not compact and (len(segments) > 1 or any(c is not None for c in caches)):
            raise ValueError("the masked reference path runs one sequence without a cache")
        halting = cfg.halting if cfg.halting.enabled else None
        tail_start = L - halting.tail_layers if halting else L
        rope = A.rotary(pos)
        if rope is not None:  # the sign of rotate_half folded into the table once per pass, not per layer
            rope = {k: (c, signed_sin(s)) for k, (c, s) in rope.items()} if isinstance(rope, dict) else (rope[0], signed_sin(rope[1]))
        amq = cfg.amq if cfg.amq.enabled else None
        s = R.RowState(A.embed(ids, pos), pos, rope, torch.ones(N, dtype=torch.bool, device=dev),
                       torch.zeros(N, dtype=torch.long, device=dev), torch.full((N,), L, dtype=torch.long, device=dev),
                       torch.full((N,), amq.initial_bits() if amq else 16, dtype=torch.long, device=dev))
        ledger = Ledger(n_layers=L, tokens=N)
        full_pairs = int((pos + 1).sum())  # every query sees its whole past in the stock model
        plans: dict = {}  # block plans of windowed attention, shared by layers with the same window
        layer = self._layer_compact if compact else (lambda *a: reference.layer_masked(self, *a))
        # Fusion applies to one sequence without a cache (a forward pass or a prefill-free eval).
        fusion = cfg.fusion if cfg.fusion.enabled and len(segments) == 1 and caches[0] is None else None
        bias = None  # fusion's group-size attention bias, once fusion has decided
        propagate = not cfg.kv.enabled or cfg.kv.policy == "propagate"
        for l in range(L):
            if A.layers[l].device != s.h.device:  # a device_map: the rows' state follows the layer's weights
                s.to(A.layers[l].device)
                dev = s.h.device
                plans.clear()
                bias = R.group_size_bias(s.rep, ~s.alive, s.pos) if s.alive is not None else None
            skipping = halting is not None and halting.may_skip(l, L) and not bool(s.computing.all())
            mlp_m = s.computing if skipping else None
            attn_m = s.computing if skipping and halting.skip == "layer" else None
            kv_m = None if propagate else attn_m  # propagate: skipped rows still get K/V
            if s.alive is not None:  # fused members compute nothing and write no K/V
                mlp_m, attn_m, kv_m = (s.alive if m is None else m & s.alive for m in (mlp_m, attn_m, kv_m))
            mlp_rows, attn_rows, kv_rows = R.of_mask(mlp_m), R.of_mask(attn_m), R.of_mask(kv_m)
            h_in, h_before = s.h, R.take(s.h, mlp_rows)  # layers return new tensors: h_in stays intact
            s.h, pairs = layer(l, s.h, s.pos, s.rope, attn_rows, kv_rows, mlp_rows, segments, caches, plans, s.bits, bias)
            self.count_layer(ledger, N, attn_rows, kv_rows, mlp_rows, pairs, full_pairs, s.bits)
            if halting and l + 1 < tail_start:
                rows = mlp_rows if mlp_rows is not None else torch.arange(N, device=dev)
                drift = halting.drift(R.take(s.h, mlp_rows), h_before)
                ledger.flops["probes"] += halting.probe_flops(rows.numel(), spec.d_model)
                under_r, halt_r = halting.decide(drift, s.under[rows], l + 1, s.pos[rows])
                s.under[rows] = under_r
                newly = rows[halt_r]
                s.computing[newly] = False
                s.exit_layer[newly] = l + 1
            if amq and amq.adaptive and l + 1 == amq.decision_layer:
                s.bits = amq.bits_for(relative_drift(s.h, h_in), s.pos)
                ledger.flops["probes"] += amq.probe_flops(N, spec.d_model)
            if fusion and l + 1 == fusion.layer:
                rep = fusion.representatives(s.h, s.pos)
                ledger.flops["probes"] += fusion.probe_flops(N, spec.d_model)
                members = rep != torch.arange(N, device=dev)
                if bool(members.any()):
                    s.alive, s.rep, s.h_at_fusion = ~members, rep, s.h
                    bias = R.group_size_bias(rep, members, s.pos)
                    s.exit_layer[members] = torch.minimum(s.exit_layer[members], torch.full_like(s.exit_layer[members], l + 1))
                    ledger.fused_tokens = int(members.sum())
        h = s.h
        if s.alive is not None:  # a member's final state comes from its representative
            m_idx = (~s.alive).nonzero().squeeze(1)
            r_idx = s.rep[m_idx]
            final = s.h_at_fusion[m_idx] + (h[r_idx] - s.h_at_fusion[r_idx]) if fusion.output == "delta" else h[r_idx]
            h = h.index_copy(0, m_idx, final)
        for (a, b), cache in zip(segments, caches):
            if cache is not None:
                cache.length = int(s.pos[b - 1]) + 1
                cache.note_peak()
        ledger.exit_layer_sum = int(s.exit_layer.sum())
        ledger.halted_tokens = int((~s.computing).sum())
        return self.logits(h, ids, logit_rows, ledger)

    def logits(self, h, ids, logit_rows, ledger):
        """Final norm and LM head of the rows ``logit_rows`` (None: every row); (logits, ledger)."""
        A = self.adapter
        h, logit_rows = R.to_device(A.output_device, h, logit_rows)
        hx = A.final_norm(R.take(h, logit_rows))
        ledger.flops["head"] += head_flops(self.spec, hx.shape[0])
        if self.head_q is not None:
            head, head_bits = self.head_q
            return head(hx, head_bits).to(ids.device), ledger
        return A.head(hx).to(ids.device), ledger

    def bits_of(self, bits: torch.Tensor, rows: torch.Tensor | None):
        """The rows' bit-widths as their linears take them: None (stock weights), one int, or (n,)."""
        if not self.quantized:
            return None
        return self.uniform_bits if self.uniform_bits is not None else R.take(bits, rows)

    def qkv(self, l, x_kv, q_in_kv, q_rows, k_rows, rope, bits):
        """Projections of the rows with K/V (x_kv) and of the query rows among them.

        ``rope`` holds per-row (cos, sin) tables; ``q_rows``/``k_rows`` pick the rows (None: all).
        """
        spec, lin = self.spec, self.linears[l]
        if q_in_kv is None and lin.qkv is not None:  # queries are the K/V rows: one matmul for q, k and v
            q, k, v = lin.qkv(x_kv, self.bits_of(bits, k_rows)).split([spec.q_dim, spec.kv_dim, spec.kv_dim], dim=-1)
            q = q.reshape(-1, spec.n_heads, spec.head_dim)
            k = k.reshape(-1, spec.n_kv_heads, spec.head_dim)
            v = v.reshape(-1, spec.n_kv_heads, spec.head_dim)
        else:
            kb = self.bits_of(bits, k_rows)
            k = lin("k", x_kv, kb).view(-1, spec.n_kv_heads, spec.head_dim)  # (Nk, Hkv, hd)
            v = lin("v", x_kv, kb).view(-1, spec.n_kv_heads, spec.head_dim)
            q = lin("q", R.take(x_kv, q_in_kv), self.bits_of(bits, q_rows)).view(-1, spec.n_heads, spec.head_dim)  # (Nq, H, hd)
        q, k = self.adapter.layers[l].qk_norm(q, k)  # identity unless the family has QK-norm (Gemma-3)
        if rope is not None:
            cos, sin = self.adapter.layers[l].rope_tables(rope)  # sin carries rotate_half's sign (signed_sin)
            q = apply_rotary_signed(q, R.take(cos, q_rows), R.take(sin, q_rows))
            k = apply_rotary_signed(k, R.take(cos, k_rows), R.take(sin, k_rows))
        return q, k, v

    def mlp(self, l, x, rows, bits):
        """Layer l's MLP on the (normed) rows ``x``, through its resolved linears."""
        lin, b = self.linears[l], self.bits_of(bits, rows)
        gate_up = None if lin.gate_up is None else (lambda t: lin.gate_up(t, b))
        return self.adapter.layers[l].mlp(x, lambda name, t: lin(name, t, b), gate_up)

    def _layer_compact(self, l, h, pos, rope, attn_rows, kv_rows, mlp_rows, segments, caches, plans, bits, bias=None):
        p, kv = self.adapter.layers[l], self.config.kv
        x_kv = p.attn_norm(R.take(h, kv_rows))  # (Nk, d)
        q_in_kv = R.positions_in(attn_rows, kv_rows)
        pos_q, pos_k = R.take(pos, attn_rows), R.take(pos, kv_rows)
        q, k, v = self.qkv(l, x_kv, q_in_kv, attn_rows, kv_rows, rope, bits)
        layer_window, sinks, visible = p.attention_rule(kv, l)  # KV skipping within the family's own window
        outs, pairs = [], 0
        plain_rows = not kv.enabled and layer_window is None and bias is None and attn_rows is None and kv_rows is None
        if plain_rows and pooled.shared_pool(segments, caches):  # a decode step: one attention call for every row
            out, pairs = pooled.decode(l, q, k, v, pos, caches, p.attn_scale, plans)
            outs.append(out)
        elif plain_rows and pooled.verify_applies(l, segments, caches):  # a speculative verify pass over pooled rows
            out, pairs = pooled.verify(l, q, k, v, pos, segments, caches, p.attn_scale, plans)
            outs.append(out)
        else:
            pairs = self._attend_segments(l, p, kv, q, k, v, pos, pos_q, pos_k, attn_rows, kv_rows, segments, caches, plans,
                                          bias, layer_window, sinks, visible, outs)
        if outs:  # a decode step whose only row halted has no query here
            h = R.add(h, attn_rows, p.post_attn(self.linears[l]("o", torch.cat(outs), self.bits_of(bits, attn_rows))))
        if mlp_rows is None or mlp_rows.numel():
            h = R.add(h, mlp_rows, p.post_mlp(self.mlp(l, p.mlp_norm(R.take(h, mlp_rows)), mlp_rows, bits)))
        return h, pairs

    def _attend_segments(self, l, p, kv, q, k, v, pos, pos_q, pos_k, attn_rows, kv_rows, segments, caches, plans, bias,
                         layer_window, sinks, visible, outs) -> int:
        """Attention sequence by sequence (each its own cache); outputs appended to ``outs``; pairs seen."""
        pairs = 0
        for (a, b), cache in zip(segments, caches):
            qa, qb = R.bounds(attn_rows, a, b)
            ka, kb = R.bounds(kv_rows, a, b)
            keys, values, k_pos = k[ka:kb], v[ka:kb], pos_k[ka:kb]
            fresh = cache is None or cache.count(l) == 0
            if cache is not None:  # written in place into the preallocated cache; attend to its live view
                cache.append(l, keys, values, k_pos)
                if not fresh:
                    e = cache.get(l)
                    keys, values, k_pos = e.k, e.v, e.pos
            rule = kv.rule
            if qb > qa and kv.selects(l) and (cache is None or rule.reads_pages) and not (kv.dense_prefill and fresh):
                pages = None if cache is None else kv_select.pages_of(cache, l, kv)
                out, seen, _ = attend_selected(q[qa:qb], keys, values, pos_q[qa:qb], k_pos, p.attn_scale, kv, bias, pages=pages,
                                               own_window=p.window)
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
                elif qb > qa and kv.evicts(l) and (fresh or rule.compresses_appended):
                    kv_select.compress_cache(cache, l, kv, q[qa:qb], pos_q[qa:qb], p.attn_scale,
                                             0 if fresh else max(8, cache.count(l) // 32))
        return pairs

    def step_ledger(self, caches, pos) -> Ledger:
        """The ledger of a plain decode step run outside the layer loop (a compiled or native step):
        every row through every layer, reading its whole past, and the head (its caches not yet advanced)."""
        N, L = pos.numel(), self.spec.n_layers
        ledger = Ledger(n_layers=L, tokens=N)
        seen, full_pairs = sum(c.count(0) for c in caches) + N, int((pos + 1).sum())
        layer = Ledger(n_layers=L)
        self.count_layer(layer, N, None, None, None, seen, full_pairs, None)
        ledger.merge(layer, times=L)  # every layer counts alike: counted once (0.44 ms a step for 30 layers in Python)
        ledger.exit_layer_sum = N * L
        return ledger

    def count_layer(self, ledger, T, attn_rows, kv_rows, mlp_rows, pairs, full_pairs, bits):
        """Count one layer into ``ledger``: FLOPs by part, rows, K/V entries, pairs, bits and weight bytes."""
        nq, nk, nm = R.count(attn_rows, T), R.count(kv_rows, T), R.count(mlp_rows, T)
        ledger.count_layer(self.spec, nq, nk, nm, pairs, full_pairs)
        if self.uniform_bits is not None:
            ledger.count_bits(self.spec, {"q": nq, "k": nk, "o": nq, "mlp": nm}, self.weight_bytes.groups, self.uniform_bits)
        else:
            ledger.count_bits(self.spec, {"q": R.take(bits, attn_rows), "k": R.take(bits, kv_rows), "o": R.take(bits, attn_rows),
                                          "mlp": R.take(bits, mlp_rows)}, self.weight_bytes.groups)

"""The engine's own KV cache: per sequence and per layer, only the entries that were written.

Each layer holds preallocated buffers (keys, values, true positions) and a count of live
entries; appending writes into the next free slots, so a decode step allocates nothing
(buffers grow by doubling when a capacity hint was too small). Tokens that KV skipping
leaves without K/V at a layer get no entry there. Three ways to shrink a layer, all
in place:

- ``evict``: entries that a recent window makes invisible to every future query;
- ``keep``: an arbitrary subset chosen by an importance policy (the rest are dropped);
- ``truncate``: every entry at or after a position (rollback of rejected speculative drafts).

Positions are stored beside the keys: RoPE used the true positions, and visibility rules
read them. Entries stay in increasing position order.

Buffers are head-major, (Hkv, capacity, hd): one head's keys are one contiguous block, which is
what attention reads (a decode step's attention ran 2-3x faster than over token-major
buffers on a 2-core CPU). ``get`` still returns token-major views, (n, Hkv, hd).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerKV:
    """A view of one layer's live entries."""

    k: torch.Tensor  # (n, Hkv, hd), RoPE applied
    v: torch.Tensor  # (n, Hkv, hd)
    pos: torch.Tensor  # (n,) true positions, increasing


class SequenceCache:
    """One sequence's cache.

    Parameters
    ----------
    n_layers : int
    capacity : int, optional
        Entries per layer to preallocate at the first write (e.g. prompt + new tokens);
        default: what the first write needs, doubled on growth.
    margin : int, default 0
        Window eviction keeps this many extra positions, so that a rollback by up to
        ``margin`` tokens (speculative decoding) never needs an evicted entry.
    """

    def __init__(self, n_layers: int, capacity: int | None = None, margin: int = 0):
        self.n_layers = n_layers
        self.capacity = capacity
        self.margin = margin
        self.length = 0  # positions consumed so far (the next token's position)
        self.peak_bytes = 0
        self._k: list[torch.Tensor | None] = [None] * n_layers
        self._v: list[torch.Tensor | None] = [None] * n_layers
        self._pos: list[torch.Tensor | None] = [None] * n_layers
        self._n = [0] * n_layers
        self.pages: list = [None] * n_layers  # per layer: quest's page summaries (kv_select.PageSummaries)
        self.pool: CachePool | None = None  # set while this cache's buffers are rows of a shared pool
        self.slot = -1

    def count(self, layer: int) -> int:
        """Live entries at ``layer``."""
        return self._n[layer]

    def get(self, layer: int) -> LayerKV | None:
        n = self._n[layer]
        if n == 0:
            return None
        return LayerKV(self._k[layer][:, :n].transpose(0, 1), self._v[layer][:, :n].transpose(0, 1), self._pos[layer][:n])

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        m = k.shape[0]
        if m == 0:
            return
        n = self._n[layer]
        buf = self._k[layer]
        if buf is None or n + m > buf.shape[1]:
            self._grow(layer, n + m, k, v)
        self._k[layer][:, n : n + m] = k.transpose(0, 1)
        self._v[layer][:, n : n + m] = v.transpose(0, 1)
        self._pos[layer][n : n + m] = pos
        self._n[layer] = n + m

    def _grow(self, layer: int, needed: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.pool = None  # outgrew its pool row: from now on its own buffers (attention per row)
        old = self._k[layer]
        cap = max(needed, self.capacity or 0, 2 * old.shape[1] if old is not None else 0)
        n = self._n[layer]
        new_k = k.new_empty((k.shape[1], cap, k.shape[2]))  # head-major
        new_v = v.new_empty((v.shape[1], cap, v.shape[2]))
        new_pos = torch.empty(cap, dtype=torch.long, device=k.device)
        if n:
            new_k[:, :n], new_v[:, :n], new_pos[:n] = self._k[layer][:, :n], self._v[layer][:, :n], self._pos[layer][:n]
        self._k[layer], self._v[layer], self._pos[layer] = new_k, new_v, new_pos

    def keep(self, layer: int, index: torch.Tensor) -> None:
        """Keep only the entries at ``index`` (sorted, within the live entries); drop the rest.

        ``index`` is (m,) for every head, or (Hkv, m) for each KV head its own entries (the
        same count). Per head, entry i's stored position becomes the latest among the heads'
        i-th kept positions: RoPE is already applied, and a per-head choice only differs in
        entries older than every future query, so visibility rules still read them right.
        """
        n = self._n[layer]
        if n == 0:
            return
        index = index.to(self._pos[layer].device)
        if index.dim() == 2:  # per KV head: buffers are head-major, so each head gathers along its own row
            m = index.shape[1]
            gather = index[:, :, None].expand(-1, -1, self._k[layer].shape[2])
            for buf in (self._k[layer], self._v[layer]):
                buf[:, :m] = torch.gather(buf[:, :n], 1, gather)
            self._pos[layer][:m] = self._pos[layer][:n][index].amax(dim=0)
        else:
            m = index.numel()
            for buf in (self._k[layer], self._v[layer]):
                buf[:, :m] = buf[:, :n].index_select(1, index)
            self._pos[layer][:m] = self._pos[layer][:n].index_select(0, index)
        self._n[layer] = m

    def evict(self, layer: int, next_pos: int, window: int, sinks: int) -> None:
        """Drop entries no query at ``next_pos`` or later can see (outside sinks and the window).

        Compaction is lazy: it runs once the invisible entries exceed a slack of 1/32 of
        the window, so that a decode step does not move the whole window every time.
        """
        n = self._n[layer]
        if n == 0:
            return
        pos = self._pos[layer][:n]
        oldest = next_pos - window - self.margin  # entries at or before this are invisible
        n_sink = int(torch.searchsorted(pos, sinks))
        first_recent = int(torch.searchsorted(pos, oldest, right=True))
        stale = first_recent - n_sink
        if stale <= 0 or stale < max(1, window // 32):
            return
        index = torch.cat([torch.arange(n_sink), torch.arange(first_recent, n)]).to(pos.device)
        self.keep(layer, index)

    def written(self, layer: int, n: int) -> None:
        """``n`` entries were written in place after the live ones at ``layer`` (by the pool, ``CachePool.write``)."""
        self._n[layer] += n

    def snapshot(self) -> tuple:
        """What ``restore`` needs to undo every write since (entries past the counts are simply overwritten later)."""
        return self.length, list(self._n), self.peak_bytes

    def restore(self, snap: tuple) -> None:
        self.length, n, self.peak_bytes = snap
        self._n = list(n)

    def truncate(self, length: int) -> None:
        """Forget every entry at position >= ``length`` in every layer; the next token's position becomes ``length``."""
        if length > self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        for layer in range(self.n_layers):
            n = self._n[layer]
            if n:
                self._n[layer] = int(torch.searchsorted(self._pos[layer][:n], length))
        self.length = length

    def nbytes(self) -> int:
        """Bytes of the live entries (keys and values)."""
        total = 0
        for k, v, n in zip(self._k, self._v, self._n):
            if n:  # head-major buffers (heads, capacity, head_dim): arithmetic, no views (called every step)
                total += n * (k.shape[0] * k.shape[-1] + v.shape[0] * v.shape[-1]) * k.element_size()
        return total

    def allocated_bytes(self) -> int:
        """Bytes of the preallocated key and value buffers."""
        return sum(k.nbytes + v.nbytes for k, v in zip(self._k, self._v) if k is not None)

    def note_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.nbytes())


class CachePool:
    """Preallocated caches for a batch: row ``i`` of every layer's buffer is one sequence's cache.

    Decode steps of a batch whose caches are rows of one pool attend in one call over the
    pool (each row masked to its own live entries) instead of one call per row. Buffers are
    zero-initialised so that masked slots hold finite values.

    Parameters
    ----------
    n_layers, batch, capacity : layers, rows, entries per row and layer
    n_kv_heads, head_dim : the K/V shape of one entry
    dtype, device : of the keys and values
    margin : passed to every row (see ``SequenceCache``)
    """

    def __init__(self, n_layers: int, batch: int, capacity: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", margin: int = 0):
        shape = (batch, n_kv_heads, capacity, head_dim)  # head-major rows, as SequenceCache
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.pos = [torch.zeros(batch, capacity, dtype=torch.long, device=device) for _ in range(n_layers)]
        self.bindings: dict = {}  # what a step implementation bound to these buffers (``native_decode``), kept as long as they are
        self.rows: list[SequenceCache] = []
        for i in range(batch):
            cache = SequenceCache(n_layers, capacity, margin)
            cache._k = [k[i] for k in self.k]
            cache._v = [v[i] for v in self.v]
            cache._pos = [p[i] for p in self.pos]
            cache.pool, cache.slot = self, i
            self.rows.append(cache)

    def write(self, layer: int, slots: torch.Tensor, at: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              pos: torch.Tensor) -> None:
        """Entry i of k/v (N, Hkv, hd) and pos (N,) into row ``slots[i]`` at index ``at[i]`` (head-major).

        The caller marks each row's new count (``SequenceCache.written``)."""
        self.k[layer][slots, :, at] = k
        self.v[layer][slots, :, at] = v
        self.pos[layer][slots, at] = pos

    def write_one(self, layer: int, slot: int, at: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """One entry (Hkv, hd) into row ``slot`` at index ``at``: a plain copy, no advanced indexing."""
        self.k[layer][slot, :, at] = k
        self.v[layer][slot, :, at] = v
        self.pos[layer][slot, at] = pos

    def view(self, layer: int, slots: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, Hkv, length, hd) of rows ``slots``: a view when the rows are contiguous, else a gather."""
        if slots == list(range(slots[0], slots[0] + len(slots))):
            a, b = slots[0], slots[-1] + 1
            return self.k[layer][a:b, :, :length], self.v[layer][a:b, :, :length]
        idx = torch.tensor(slots, device=self.k[layer].device)
        return self.k[layer][idx, :, :length], self.v[layer][idx, :, :length]

"""Row bookkeeping of the engine's layer loop: which rows compute, and their state between layers.

A forward pass runs rows (tokens) that may come from several sequences. Mechanisms decide
between layers which rows compute the next one; the compact path gathers those rows, runs the
layer on them and scatters the result back. Row sets are sorted index tensors, or None for
"every row" (the common case, which costs no indexing).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .adapters.base import to_device


def count(rows: torch.Tensor | None, total: int) -> int:
    return total if rows is None else rows.numel()


def take(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x.index_select(0, rows)


def add(h: torch.Tensor, rows: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
    """``h`` with ``delta`` added to ``rows`` (a new tensor: the caller's ``h`` stays intact)."""
    return h + delta if rows is None else h.index_add(0, rows, delta)


def of_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Row indices of a mask; None (every row) when there is no mask or it is all true."""
    if mask is None or bool(mask.all()):
        return None
    return mask.nonzero().squeeze(1)


def positions_in(sub: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    """Where the rows ``sub`` sit inside ``rows`` (both sorted, sub within rows); None: all of them."""
    if sub is None:
        return None
    if rows is None:
        return sub
    if sub.numel() == rows.numel():
        return None
    return torch.searchsorted(rows, sub)


def bounds(rows: torch.Tensor | None, a: int, b: int) -> tuple[int, int]:
    """The index range, within a sorted row list, of the rows in [a, b)."""
    if rows is None:
        return a, b
    return int(torch.searchsorted(rows, a)), int(torch.searchsorted(rows, b))


def group_size_bias(rep: torch.Tensor, members: torch.Tensor, pos: torch.Tensor):
    """Fusion's attention bias: log(1 + members of the key's group at or before the query).

    One sequence, rows in position order. Returns ``bias(q_pos, k_pos) -> (Tq, Tk)``.
    """
    n = rep.numel()
    counts = torch.zeros(n, n, device=rep.device)  # counts[r, t]: members of r at position t
    m_idx = members.nonzero().squeeze(1)
    counts[rep[m_idx], pos[m_idx]] = 1.0
    log_size = torch.log1p(counts.cumsum(dim=1))  # (key row, query position)
    return lambda q_pos, k_pos: log_size[k_pos][:, q_pos].T


@dataclass
class RowState:
    """Every row's state in the layer loop, (N, ...) each; what follows the layers across devices.

    h : hidden states (N, d); pos : true positions; rope : the RoPE tables of ``pos`` (sign folded)
    computing : rows not halted; under : consecutive layers under the halting threshold
    exit_layer : the layer a row stopped computing at (n_layers: never)
    bits : each row's weight precision (AMQ; 16 when unquantized)
    alive, rep, h_at_fusion : fusion's survivors, each row's representative, and the states
        when fusion decided (None until it has)
    """

    h: torch.Tensor
    pos: torch.Tensor
    rope: object
    computing: torch.Tensor
    under: torch.Tensor
    exit_layer: torch.Tensor
    bits: torch.Tensor
    alive: torch.Tensor | None = None
    rep: torch.Tensor | None = None
    h_at_fusion: torch.Tensor | None = None

    def to(self, device: torch.device) -> None:
        """Move every field to ``device`` (a layer of a ``device_map`` lives there)."""
        names = [f.name for f in fields(self)]
        for name, value in zip(names, to_device(device, *(getattr(self, n) for n in names))):
            setattr(self, name, value)

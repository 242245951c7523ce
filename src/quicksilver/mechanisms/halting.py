"""Dynamic Token Halting: stop computing a token whose representation has stopped changing.

The paper (QuickSilver, arXiv 2506.22396, Sec. 3.1) halts a token when the absolute
norm of its layer update falls under 0.045. Residual norms of real models grow into the
hundreds, so we use a scale-free signal: the relative L2 drift ||h_l - h_{l-1}|| / ||h_{l-1}||
(or 1 - cosine similarity). A token halts after ``patience`` consecutive layers under
``threshold``, never before ``min_layer``, and never among the first ``protect_first``
positions (BOS and attention sinks).

Where a halted token goes is measured, not assumed (DESIGN.md: sending the state straight
to the head is catastrophic on the default model): the last ``tail_layers`` layers run for
every token (SkipDecode-style), and ``skip`` chooses what a halted token skips in the layers
before: the whole layer, or only the MLP (it still attends and writes K/V).

The rule only reads the token's own states, so it is causal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_choice, check_range

SIGNALS = ("relative_l2", "cosine")
SKIPS = ("layer", "mlp")


def relative_drift(h_new: torch.Tensor, h_old: torch.Tensor) -> torch.Tensor:
    """||h_new - h_old|| / ||h_old|| per row; (N, d) -> (N,). Scale-free."""
    return (h_new - h_old).float().norm(dim=-1) / h_old.float().norm(dim=-1).clamp_min(1e-12)


def cosine_drift(h_new: torch.Tensor, h_old: torch.Tensor) -> torch.Tensor:
    """1 - cos(h_new, h_old) per row; (N, d) -> (N,)."""
    return 1.0 - torch.nn.functional.cosine_similarity(h_new.float(), h_old.float(), dim=-1, eps=1e-12)


@dataclass
class DynamicTokenHalting:
    """Settings of Dynamic Token Halting.

    Parameters
    ----------
    enabled : bool, default False
    signal : {"relative_l2", "cosine"}, default "relative_l2"
        How much layer l changed the token, scale-free.
    threshold : float, default 0.05
        A layer "did little" when the signal is below this. 0 never halts.
    min_layer : int, default 8
        No token halts before this many layers have run.
    patience : int, default 2
        Consecutive layers under threshold before halting.
    protect_first : int, default 4
        The first positions of a sequence never halt (BOS and attention sinks).
    tail_layers : int, default 4
        The last layers run for every token; 0 sends a halted state straight to the head.
    skip : {"layer", "mlp"}, default "layer"
        What a halted token skips before the tail: the whole layer, or only the MLP.
    skippable_layers : list of int or None, default None
        The only layers a halted token skips (it still computes the others); None: every
        layer before the tail. With ``threshold=2`` and ``min_layer=1`` every token halts at
        once and this is static depth reduction.
    """

    enabled: bool = False
    signal: str = "relative_l2"
    threshold: float = 0.05
    min_layer: int = 8
    patience: int = 2
    protect_first: int = 4
    tail_layers: int = 4
    skip: str = "layer"
    skippable_layers: list[int] | None = None

    def __post_init__(self):
        check_choice("halting", "signal", self.signal, SIGNALS)
        check_choice("halting", "skip", self.skip, SKIPS)
        check_range("halting", "threshold", self.threshold, 0.0, 2.0)
        check_range("halting", "min_layer", self.min_layer, 1, integer=True)
        check_range("halting", "patience", self.patience, 1, integer=True)
        check_range("halting", "protect_first", self.protect_first, 0, integer=True)
        check_range("halting", "tail_layers", self.tail_layers, 0, integer=True)
        if self.skippable_layers is not None:
            self.skippable_layers = sorted(set(self.skippable_layers))
            for layer in self.skippable_layers:
                check_range("halting", "skippable_layers[]", layer, 0, integer=True)

    def check_model(self, n_layers: int) -> None:
        from ..errors import QuicksilverError

        if self.enabled and self.tail_layers >= n_layers:
            raise QuicksilverError(f"halting.tail_layers={self.tail_layers} leaves no layer to skip in a {n_layers}-layer model")
        if self.enabled and self.min_layer >= n_layers:
            raise QuicksilverError(f"halting.min_layer={self.min_layer} is past the model's last layer ({n_layers - 1})")
        if self.enabled and self.skippable_layers and self.skippable_layers[-1] >= n_layers:
            raise QuicksilverError(f"halting.skippable_layers names layer {self.skippable_layers[-1]}, past the model's last layer ({n_layers - 1})")

    def may_skip(self, layer: int, n_layers: int) -> bool:
        """Whether a halted token skips ``layer`` (it is before the tail and allowed)."""
        if layer >= n_layers - self.tail_layers:
            return False
        return self.skippable_layers is None or layer in self.skippable_layers

    def drift(self, h_new: torch.Tensor, h_old: torch.Tensor) -> torch.Tensor:
        """The halting signal of each row; (N, d), (N, d) -> (N,)."""
        return relative_drift(h_new, h_old) if self.signal == "relative_l2" else cosine_drift(h_new, h_old)

    def probe_flops(self, rows: int, d_model: int) -> int:
        """Cost of the signal: a difference, two squared norms (and a dot for cosine), per row."""
        per_row = 3 * 2 * d_model if self.signal == "cosine" else 2 * 2 * d_model
        return rows * per_row

    def decide(self, drift: torch.Tensor, under: torch.Tensor, layers_done: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pure rule: update the under-threshold streak and say which rows halt now.

        Parameters
        ----------
        drift : (N,) signal of the layer just computed.
        under : (N,) int, consecutive layers under threshold before this one.
        layers_done : how many layers these rows have now computed.
        positions : (N,) true positions (for ``protect_first``).

        Returns
        -------
        (under, halt): the new streak (N,) and a bool mask (N,) of rows that halt.
        """
        under = torch.where(drift < self.threshold, under + 1, torch.zeros_like(under))
        halt = (under >= self.patience) & (positions >= self.protect_first)
        if layers_done < self.min_layer:
            halt = torch.zeros_like(halt)
        return under, halt

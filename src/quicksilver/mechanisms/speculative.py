"""Settings of lossless speculative decoding (the algorithm lives in ``quicksilver.decoding.speculative``).

Speculation changes how fast tokens come, never which tokens come: drafts from cheap paths
of the same frozen model are verified by the engine's own configuration, so greedy output
equals the same configuration with ``speculative`` off and sampled output follows its
distribution. It is therefore not a mechanism in the calibration sense (it saves no work per
token and changes no perplexity) and ``quicksilver calibrate`` does not search it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._checks import check_range

SOURCES = ("lookup", "int8", "int4", "skip")


@dataclass
class SpeculativeDecoding:
    """Settings of speculative decoding.

    Parameters
    ----------
    enabled : bool, default False
    sources : str, default "lookup,int8"
        Draft sources, comma-separated: for each sequence and step the source with the best
        expected rate (tokens per unit of time at its measured acceptance and cost; ties in
        the order given) that proposes something drafts. ``lookup``: n-gram match in the
        prompt and the text generated so far (no model); ``int8`` / ``int4``: the same weights
        through AMQ's weight-only int8 codes or their int4 slice (every linear and the head at
        int8); ``skip``: the engine with ``skip_layers`` skipped. A list is accepted too.
    max_draft : int, default 16
        Most tokens drafted per step (also the rollback margin of windowed caches).
    initial_draft : int, default 8
        Draft length of a source's first step for a sequence; afterwards the length that
        maximises expected tokens per unit of time at the measured per-token acceptance, the
        measured cost of a verified row and, for a model draft, of a draft pass.
    confidence : float, default 0.0
        A model draft stops before a token whose draft probability is below this (0: never;
        the draft length from measured acceptance and costs already bounds a poor draft).
    lookup_min_ngram, lookup_max_ngram : int, default 1 and 4
        Lengths of the suffix n-gram that prompt lookup matches, longest first.
    skip_layers : list of int or None, default None
        Layers the ``skip`` source skips; None: every other layer of the middle half.
    off_below : float, default 0.0
        A source stops drafting for a sequence when drafting does not pay by the measured
        costs, or when its acceptance there (running average of accepted / drafted) falls
        below this (0: the costs alone decide) ...
    retry_after : int, default 8
        ... for this many steps, doubled each time it is switched off again.
    """

    enabled: bool = False
    sources: str = "lookup,int8"
    max_draft: int = 16
    initial_draft: int = 8
    confidence: float = 0.0
    lookup_min_ngram: int = 1
    lookup_max_ngram: int = 4
    skip_layers: list[int] | None = None
    off_below: float = 0.0
    retry_after: int = 8

    def __post_init__(self):
        from ..errors import QuicksilverError

        if isinstance(self.sources, (list, tuple)):
            self.sources = ",".join(self.sources)
        if not isinstance(self.sources, str):
            raise QuicksilverError(f"speculative.sources must be a comma-separated string, got {self.sources!r}")
        names = self.source_list
        if not names:
            raise QuicksilverError("speculative.sources names no draft source")
        for name in names:
            if name not in SOURCES:
                raise QuicksilverError(f"speculative.sources: unknown source {name!r} (known: {', '.join(SOURCES)})")
        if len(set(names)) != len(names):
            raise QuicksilverError(f"speculative.sources names a source twice: {self.sources!r}")
        check_range("speculative", "max_draft", self.max_draft, 1, 64, integer=True)
        check_range("speculative", "initial_draft", self.initial_draft, 1, 64, integer=True)  # capped at max_draft
        check_range("speculative", "confidence", self.confidence, 0.0, 1.0)
        check_range("speculative", "lookup_min_ngram", self.lookup_min_ngram, 1, integer=True)
        check_range("speculative", "lookup_max_ngram", self.lookup_max_ngram, self.lookup_min_ngram, integer=True)
        check_range("speculative", "off_below", self.off_below, 0.0, 1.0)
        check_range("speculative", "retry_after", self.retry_after, 1, integer=True)
        if self.skip_layers is not None:
            if isinstance(self.skip_layers, str):  # --set speculative.skip_layers=3,5,7
                try:
                    self.skip_layers = [int(x) for x in self.skip_layers.split(",") if x.strip()]
                except ValueError:
                    raise QuicksilverError(f"speculative.skip_layers must be layer numbers, got {self.skip_layers!r}") from None
            self.skip_layers = sorted(set(self.skip_layers))
            for layer in self.skip_layers:
                check_range("speculative", "skip_layers[]", layer, 0, integer=True)

    @property
    def source_list(self) -> list[str]:
        return [s.strip() for s in self.sources.split(",") if s.strip()]

    def check_model(self, n_layers: int) -> None:
        from ..errors import QuicksilverError

        if self.enabled and self.skip_layers and self.skip_layers[-1] >= n_layers:
            raise QuicksilverError(f"speculative.skip_layers names layer {self.skip_layers[-1]}, past the model's last layer ({n_layers - 1})")

    def layers_to_skip(self, n_layers: int) -> list[int]:
        """The ``skip`` source's skipped layers: ``skip_layers``, or every other layer of the middle half."""
        if self.skip_layers is not None:
            return list(self.skip_layers)
        return list(range(n_layers // 4, (3 * n_layers) // 4, 2))

"""Perplexity with a sliding window, and the three ledgers: quality, FLOPs, wall clock.

Every runner (the stock HF model, the engine with a preset) sees the same windows in
the same process; windows are interleaved between runners, after one untimed warm-up
window each, so the wall-clock ratio compares like with like. A sweep of many configs on
the same windows passes a ``BaselineCache``: the stock model then runs (and is timed) once,
in the first row, and every later row compares against those results.
"""

from __future__ import annotations

import hashlib

import math
import re
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

import torch
import torch.nn.functional as F

from .errors import QuicksilverError, check_int
from .flops import dense_forward_flops
from .ledger import Ledger
from .results_io import code_version


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` form the context; targets ``[score_from, end)`` are scored."""

    begin: int
    end: int
    score_from: int


def window_plan(n_tokens: int, window: int, stride: int, bos: bool) -> list[Window]:
    """Sliding windows that score every token exactly once (HF's strided perplexity recipe).

    With ``bos`` each window is BOS plus ``window - 1`` text tokens, and every token is
    scored; without it the first token has no context and is not scored. Each later
    window moves by ``stride`` (at most ``window - 1``, so that every scored token has at
    least one token of context in its window) and scores only tokens no earlier window scored.
    """
    for name, value in (("n_tokens", n_tokens), ("window", window), ("stride", stride)):
        check_int(name, value)
    ctx = window - (1 if bos else 0)
    if window < 2:
        raise QuicksilverError(f"window must be at least 2 tokens, got {window}")
    if stride < 1:
        raise QuicksilverError(f"stride must be a positive number of tokens, got {stride}")
    if stride > window - 1:
        raise QuicksilverError(f"stride {stride} is longer than window - 1 = {window - 1}: some tokens would be scored without context")
    if n_tokens < (1 if bos else 2):
        raise QuicksilverError("the text is too short to score any token")
    plan, begin, prev_end = [], 0, 0 if bos else 1
    while True:
        end = min(begin + ctx, n_tokens)
        if end > prev_end:
            plan.append(Window(begin, end, prev_end))
        prev_end = end
        if end == n_tokens:
            return plan
        begin += stride


@dataclass
class RunOutput:
    """What a runner returns for one window: logits at the asked rows and what it spent."""

    logits: torch.Tensor  # (n, vocab)
    flops: int
    stats: dict = field(default_factory=dict)


class Runner(Protocol):
    name: str

    def __call__(self, input_ids: torch.Tensor, logit_rows: torch.Tensor) -> RunOutput: ...


class StockRunner:
    """The unmodified HF forward pass (the baseline), with its analytic FLOP count."""

    def __init__(self, model, name: str = "baseline"):
        from .adapters import arch_spec

        self.model, self.name = model, name
        self.spec = arch_spec(model.config)

    def __call__(self, input_ids, logit_rows):
        out = self.model(input_ids=input_ids[None], logits_to_keep=logit_rows, use_cache=False)
        flops = dense_forward_flops(self.spec, input_ids.numel(), head_rows=logit_rows.numel())["total"]
        return RunOutput(out.logits[0], flops)


class EngineRunner:
    """The QuickSilver engine with a config; its FLOPs are the ledger of what it executed."""

    def __init__(self, engine, name: str = "quicksilver"):
        self.engine, self.name = engine, name

    def __call__(self, input_ids, logit_rows):
        out = self.engine(input_ids, logit_rows)
        return RunOutput(out.logits, out.ledger.total_flops, {"ledger": out.ledger})


class BaselineCache:
    """The stock model's results per window (log-probabilities, NLL, FLOPs, seconds), kept for the
    next evaluation of the same windows in this process: a sweep's rows pay for the stock model once.

    It holds one window plan at a time (a different model, text, window or stride replaces it), so
    its memory is one plan's log-probabilities (about 0.8 GB for 4,096 tokens of a 49k vocabulary
    in float32). A copy sent to another process (a Ray task) arrives empty.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.windows: dict[int, dict] = {}

    def plan(self, key: tuple) -> dict[int, dict]:
        """The cached windows of the plan ``key`` (emptied first if the cache held another plan)."""
        if key != self.key:
            self.key, self.windows = key, {}
        return self.windows

    def __getstate__(self) -> dict:  # pickled (for a Ray task): empty
        return {"key": None, "windows": {}}


def _plan_key(runner, ids: torch.Tensor, window: int, stride: int, bos_id: int | None, device, part) -> tuple:
    digest = hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()
    first = next(runner.model.parameters())
    return (id(runner.model), first.data_ptr(), str(first.dtype), str(device), window, stride, bos_id, part, digest)


@dataclass
class Totals:
    """Running sums for one runner over all windows."""

    nll: float = 0.0
    count: int = 0
    flops: int = 0
    seconds: float = 0.0
    kl: float = 0.0  # KL(baseline || this runner), summed over scored tokens
    top1_agree: int = 0
    stats: list = field(default_factory=list)


def tokenize_documents(tokenizer, documents: Iterable[str], max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of the documents joined by blank lines, capped at ``max_tokens``."""
    if max_tokens is not None and max_tokens < 1:
        raise QuicksilverError(f"max-tokens must be at least 1, got {max_tokens}")
    ids: list[int] = []
    for i, doc in enumerate(documents):
        ids.extend(tokenizer(doc if i == 0 else "\n\n" + doc, add_special_tokens=False).input_ids)
        if max_tokens is not None and len(ids) >= max_tokens:
            ids = ids[:max_tokens]
            break
    if not ids:
        raise QuicksilverError("the text is empty after tokenization")
    return torch.tensor(ids, dtype=torch.long)


CALIBRATION_TOKENS = 2048


def make_engine(model, tokenizer, config, corpus: str = "wiki"):
    """An Engine for ``config``, given calibration text when a setting needs it (``amq.smoothing``).

    Calibration text is the first 2,048 tokens of the corpus's calibration split (``wiki``'s
    for corpora without one): never the text being evaluated.
    """
    from .corpora import OFFLINE_CORPORA, load_corpus
    from .engine import Engine

    calibration = None
    if config.amq.enabled and config.amq.smoothing is not None:
        source = corpus if corpus in OFFLINE_CORPORA else "wiki"
        calibration = tokenize_documents(tokenizer, load_corpus(source, "calibration").documents, CALIBRATION_TOKENS)
    return Engine(model, config, calibration_ids=calibration)


def make_runners(hf_model, tokenizer, config, engine_corpus: str = "wiki") -> list:
    """The stock model, then the engine with ``config`` unless it is all off."""
    runners: list = [StockRunner(hf_model)]
    if not config.is_off:
        runners.append(EngineRunner(make_engine(hf_model, tokenizer, config, engine_corpus)))
    return runners


def word_count(text: str) -> int:
    """Words as lm-evaluation-harness counts them for word perplexity (whitespace split)."""
    return len(re.split(r"\s+", text.strip()))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def score_windows(
    runners: list[Runner],
    ids: torch.Tensor,
    window: int,
    stride: int,
    bos_id: int | None,
    device: torch.device | str = "cpu",
    on_window: Callable[[int, int], None] | None = None,
    warmup: bool = True,
    part: tuple[int, int] | None = None,
    baseline: BaselineCache | None = None,
) -> list[Totals]:
    """Run every runner on every window, interleaved; the first runner is the reference for KL/top-1.

    Returns one ``Totals`` per runner. ``on_window(i, n)`` reports progress. ``part=(a, b)``
    scores only windows a..b-1 of the plan (a Ray task's share; the sums merge exactly).
    ``baseline``: where the first runner is the stock model, its results per window are read from
    this cache when it holds them (the stock model is then neither run nor timed again) and put
    there when it does not.
    """
    device = torch.device(device)
    plan = window_plan(ids.numel(), window, stride, bos_id is not None)
    if part is not None:
        plan = plan[part[0] : part[1]]
    totals = [Totals() for _ in runners]
    cached: dict[int, dict] = {}
    if baseline is not None and isinstance(runners[0], StockRunner):
        cached = baseline.plan(_plan_key(runners[0], ids, window, stride, bos_id, device, part))
    else:
        baseline = None
    with torch.inference_mode():
        for w_i, w in enumerate(plan):
            ctx = ids[w.begin : w.end]
            if bos_id is not None:
                ctx = torch.cat([torch.tensor([bos_id]), ctx])
            ctx = ctx.to(device)
            n = w.end - w.score_from
            # Logit row r (window position) predicts token r+1; targets are the last n tokens.
            rows = torch.arange(ctx.numel() - 1 - n, ctx.numel() - 1, device=device)
            targets = ctx[rows + 1]
            have = cached.get(w_i)  # the stock model's results from an earlier evaluation of this plan
            if w_i == 0 and warmup:
                for i, r in enumerate(runners):
                    if not (i == 0 and have is not None):
                        r(ctx, rows)
            order = list(range(len(runners)))
            if w_i % 2:
                order.reverse()  # alternate who goes first, so neither always meets a warm cache
            outs: list[RunOutput | None] = [None] * len(runners)
            seconds = [0.0] * len(runners)
            for i in order:
                if i == 0 and have is not None:
                    continue
                _sync(device)
                t0 = time.perf_counter()
                outs[i] = runners[i](ctx, rows)
                _sync(device)
                seconds[i] = time.perf_counter() - t0
            ref_logp = None
            for i, out in enumerate(outs):
                t = totals[i]
                if i == 0 and have is not None:
                    logp, nll, flops, stats, seconds[0] = have["logp"], have["nll"], have["flops"], have["stats"], have["seconds"]
                else:
                    logp = F.log_softmax(out.logits.float(), dim=-1)
                    nll, flops, stats = -logp.gather(1, targets[:, None]).sum().item(), out.flops, out.stats
                    if i == 0 and baseline is not None:
                        cached[w_i] = {"logp": logp, "nll": nll, "flops": flops, "stats": stats, "seconds": seconds[0]}
                t.seconds += seconds[i]
                t.nll += nll
                t.count += n
                t.flops += flops
                t.stats.append(stats)
                if ref_logp is None:
                    ref_logp = logp
                else:
                    t.kl += F.kl_div(logp, ref_logp, log_target=True, reduction="sum").item()
                    t.top1_agree += (logp.argmax(-1) == ref_logp.argmax(-1)).sum().item()
            if on_window:
                on_window(w_i + 1, len(plan))
    return totals


# Evaluation windows as tasks: one code path, serial or on Ray (quicksilver.parallel) -----------

def score_part(source, config: dict, engine_corpus: str, ids, window: int, stride: int, bos_id: int | None,
               part: tuple[int, int] | None, on_window: Callable[[int, int], None] | None = None,
               baseline: BaselineCache | None = None):
    """``score_windows`` over windows ``part`` of the plan (None: all), with the stock model and the engine."""
    from .config import Config

    loaded = source.load()
    runners = make_runners(loaded.model, loaded.tokenizer, Config.from_dict(config), engine_corpus)
    return score_windows(runners, ids, window, stride, bos_id, source.device, on_window=on_window, part=part, baseline=baseline)


def merge_totals(parts: list[list]) -> list:
    """Sum per-runner ``Totals`` of window ranges into one per runner (stats kept in window order)."""
    merged = [Totals() for _ in parts[0]]
    for part in parts:
        for m, t in zip(merged, part):
            m.nll += t.nll
            m.count += t.count
            m.flops += t.flops
            m.seconds += t.seconds
            m.kl += t.kl
            m.top1_agree += t.top1_agree
            m.stats.extend(t.stats)
    return merged


def score_windows_ray(address: str | None, source, config, engine_corpus: str, ids, window: int, stride: int,
                      bos_id: int | None, progress: Callable[[int, int], None] | None = None,
                      baseline: BaselineCache | None = None) -> list:
    """Every window of one evaluation: here (``address`` None), or split into ranges scored as Ray tasks, merged exactly
    (``baseline`` serves only the first)."""
    from .parallel import cluster_cpus, init_ray, map_calls

    if address is None:
        return score_part(source, config.to_dict(), engine_corpus, ids, window, stride, bos_id, None, progress, baseline)
    n = len(window_plan(ids.numel(), window, stride, bos_id is not None))
    ray = init_ray(address)
    k = min(n, 2 * cluster_cpus(ray))
    bounds = [round(i * n / k) for i in range(k + 1)]
    calls = [(source, config.to_dict(), engine_corpus, ids, window, stride, bos_id, (a, b)) for a, b in zip(bounds, bounds[1:])]
    return merge_totals(map_calls(score_part, calls, address, source.device.startswith("cuda"), progress))


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated on CUDA; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def metrics(t: Totals, n_bytes: int, n_words: int) -> dict:
    """Perplexity, bits per byte and word perplexity from summed NLL (nats)."""
    return {
        "perplexity": math.exp(t.nll / t.count),
        "bits_per_byte": t.nll / (n_bytes * math.log(2)),
        "word_perplexity": math.exp(t.nll / n_words),
        "nll_per_token": t.nll / t.count,
        "flops": t.flops,
        "flops_per_token": t.flops / t.count,
        "wall_seconds": t.seconds,
        "tokens_per_second": t.count / t.seconds if t.seconds > 0 else float("inf"),
    }


def evaluate_model(
    model="smollm2-135m",
    corpus: str = "wiki",
    split: str = "test",
    text_file: str | None = None,
    window: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    loaded=None,
    config=None,
    ray: str | None = None,
    device_map: str | None = None,
    baseline_cache: BaselineCache | None = None,
) -> dict:
    """Baseline evaluation of a model on a corpus: the dict that ``quicksilver eval`` writes.

    Parameters
    ----------
    model : a name, folder or hub id to load (see ``load_model``), or a LoadedModel.
    corpus, split, text_file : see ``load_corpus``.
    window : int
        Tokens per window, BOS included when the model expects one. Default 512.
    stride : int, optional
        How far each window moves; default ``window - 1`` (each window scores
        ``window - 1`` new tokens, with or without BOS).
    max_tokens : int, optional
        Evaluate only the first N tokens of the text.
    loaded : LoadedModel, optional
        The older spelling of passing a LoadedModel as ``model``.
    config : Config or str, optional
        Mechanisms to run: a Config or a preset name (default ``off``). Unless all are off, the stock model (baseline) and the
        engine run on the same windows, interleaved, and the result adds the baseline's
        metrics and the comparisons (``delta_perplexity``, ``flop_reduction``, ``speedup``...).
    ray : str, optional
        A Ray address (``local``: a local cluster): the windows are split into ranges scored
        as Ray tasks, whose workers load ``model`` by name; the sums merge exactly.
    device_map : str, optional
        ``auto``: spread the model over the GPUs available (see ``load_model``).
    baseline_cache : BaselineCache, optional
        Shared by the evaluations of a sweep: the stock model runs once on these windows, in the
        first evaluation, and the later ones reuse its results and wall clock (not with ``ray``).
    """
    from .corpora import check_corpus_args, load_corpus
    from .models import LoadedModel, as_loaded, load_model, parse_device

    from .config import Config

    config = Config.resolve(config)
    if loaded is not None:  # the older spelling: the loaded model names itself
        model = as_loaded(loaded)
    if not isinstance(model, (str, LoadedModel)):
        raise QuicksilverError(f"model must be a name, folder or hub id, or a LoadedModel (quicksilver.load_model), got {type(model).__name__}")
    dev = parse_device(device)
    check_int("window", window)
    check_int("max-tokens", max_tokens, 1, allow_none=True)
    check_int("stride", stride, allow_none=True)
    window_plan(window, window, window - 1 if stride is None else stride, bos=False)  # fail before loading
    check_corpus_args(corpus, split, text_file)
    lm = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, device=dev, device_map=device_map)
    tokenizer = lm.tokenizer
    if device_map is not None or lm.source.device_map is not None:  # windows start where the embedding lives
        dev = lm.device
    text = load_corpus(corpus, split, text_file)
    engine_corpus = text.name if text_file is None else "wiki"
    spec = lm.spec
    if window > spec.max_positions:
        raise QuicksilverError(f"window {window} is longer than the model's context of {spec.max_positions} tokens")
    bos = lm.bos_per_window
    bos_id = lm.bos_id
    if stride is None:
        stride = window - 1  # no overlap beyond the one context token a window needs
    ids = tokenize_documents(tokenizer, text.documents, max_tokens)
    evaluated_text = tokenizer.decode(ids)
    n_bytes, n_words = len(evaluated_text.encode("utf-8")), word_count(evaluated_text)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    # One code path, serial or on Ray: score_part builds the runners and scores windows.
    source = lm.source.keep(lm)
    totals = score_windows_ray(ray, source, config, engine_corpus, ids, window, stride, bos_id, progress, baseline_cache)
    result = {
        "model": lm.name,
        "corpus": text.name,
        "split": text.split,
        "tokens": totals[0].count,
        "window": window,
        "stride": stride,
        "bos_per_window": bos,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "device": str(dev),
        "preset": config.name,
        **metrics(totals[-1], n_bytes, n_words),
        "peak_memory_bytes": peak_memory_bytes(dev),
        "config": config.to_dict(),
        "code": code_version(),  # the commit (or installed version) these numbers come from
    }
    if len(totals) == 2:
        result.update(compare(totals[0], totals[1], n_bytes, n_words))
        result["baseline"]["dtype"] = result["dtype"]  # the stock model always runs in the engine's dtype
    return result


def run_ledger(run: Totals):
    """The engine's ledgers of every window of a run, summed into one."""
    ledger = Ledger(n_layers=run.stats[0]["ledger"].n_layers)
    for s in run.stats:
        ledger.merge(s["ledger"])
    return ledger


def compare(base: Totals, run: Totals, n_bytes: int, n_words: int) -> dict:
    """The comparison block of a preset against its baseline measured in the same run."""
    b, r = metrics(base, n_bytes, n_words), metrics(run, n_bytes, n_words)
    stats = run_ledger(run).as_dict()
    return {
        "baseline": b,
        "delta_perplexity": r["perplexity"] - b["perplexity"],
        "relative_delta_perplexity": r["perplexity"] / b["perplexity"] - 1.0,
        "flop_reduction": 1.0 - r["flops"] / b["flops"],
        "speedup": b["wall_seconds"] / r["wall_seconds"],
        "mean_exit_layer": stats["mean_exit_layer"],
        "kv_fraction": stats["kv_fraction"],
        "bits_per_token": stats["bits_per_token"],
        "fused_fraction": stats["fused_fraction"],
        "bit_weighted_flops": stats["bit_weighted_flops"],
        "kl_divergence": run.kl / run.count,
        "top1_agreement": run.top1_agree / run.count,
        "ledger": stats,
    }

"""Scale-out with Ray: evaluation windows and calibration/sweep trials as Ray tasks.

One code path: the work is a plain function (``score_part``, ``sweep_row``,
``calibrate.measure_trial``) that ``map_calls`` calls in this process, or as Ray tasks when
given a Ray address. Results are small and picklable (sums of NLL, token counts, FLOPs and
the engine's ledgers, never tensors) and are merged by the caller in submission order, so
a Ray run's numbers equal the serial run's: perplexity to float rounding of the sums, the
deterministic fields of every trial and row exactly. Wall-clock fields are the workers'
own times and are not comparable across the two (workers share the machine).

A worker loads the model by name once and keeps it for later tasks (``ModelSource``); in
the serial path the caller's already-loaded model is used. Ray is optional
(``pip install 'quicksilver[ray]'``); with no address a local cluster of 2 CPUs starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from .errors import QuicksilverError

LOCAL = "local"  # --ray with no address: start a local Ray cluster
LOCAL_CPUS = 2

_LOADED: dict = {}  # per Ray worker process: ModelSource -> (model, tokenizer)


@dataclass(frozen=True)
class ModelSource:
    """How a task gets the model: the caller's loaded one here, else ``load_model`` once per worker process."""

    name: str
    dtype: str = "float32"
    device: str = "cpu"
    device_map: str | None = None
    loaded: tuple | None = field(default=None, compare=False, repr=False)  # never sent to Ray workers

    def load(self):
        if self.loaded is not None:
            return self.loaded
        if self not in _LOADED:
            from .models import load_model

            _LOADED[self] = load_model(self.name, dtype=self.dtype, device=self.device, device_map=self.device_map)
        return _LOADED[self]

    def keep(self, loaded: tuple) -> "ModelSource":
        """This source with an already loaded ``(model, tokenizer)`` (the serial path uses it)."""
        return replace(self, loaded=loaded)


def init_ray(address: str):
    """Connect to the Ray cluster at ``address`` (``local``: start one with 2 CPUs here); returns ``ray``."""
    try:
        import ray
    except ImportError:
        raise QuicksilverError("--ray needs Ray: pip install 'quicksilver[ray]'") from None
    if not ray.is_initialized():
        if address == LOCAL:
            ray.init(num_cpus=LOCAL_CPUS, include_dashboard=False, log_to_driver=False)
        else:
            try:
                ray.init(address=address, log_to_driver=False)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise QuicksilverError(f"cannot connect to the Ray cluster at {address}: {e}".splitlines()[0]) from e
    return ray


def cluster_cpus(ray) -> int:
    return max(int(ray.cluster_resources().get("CPU", 1)), 1)


def map_calls(fn: Callable, calls: Sequence[tuple], ray_address: str | None = None, gpu: bool = False,
              on_done: Callable[[int, int], None] | None = None) -> list:
    """``[fn(*args) for args in calls]``: here in order, or as Ray tasks (``ray_address`` set); results in call order.

    ``on_done(done, total)`` reports progress as calls finish. A ``QuicksilverError`` raised
    inside a Ray task is raised here as itself.
    """
    if ray_address is None:
        results = []
        for i, args in enumerate(calls):
            results.append(fn(*args))
            if on_done:
                on_done(i + 1, len(calls))
        return results
    ray = init_ray(ray_address)
    remote = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(fn)
    # A worker loads the model itself: ship the name, not the caller's weights.
    strip = lambda a: replace(a, loaded=None) if isinstance(a, ModelSource) else a  # noqa: E731
    refs = [remote.remote(*map(strip, args)) for args in calls]
    pending, done = list(refs), 0
    try:
        while pending:
            finished, pending = ray.wait(pending, num_returns=1)
            ray.get(finished)  # raises a task's error as soon as it happens
            done += len(finished)
            if on_done:
                on_done(done, len(calls))
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, QuicksilverError):
            raise QuicksilverError(str(cause)) from None
        raise


def optional_value(args: list[str], option: str = "--ray", value: str = LOCAL) -> list[str]:
    """Command-line arguments with ``option``'s value filled in where it was given bare (``--ray``)."""
    out = []
    for i, a in enumerate(args):
        out.append(a)
        if a == option and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append(value)
    return out


# Evaluation windows --------------------------------------------------------------------------

def score_part(source: ModelSource, config: dict, engine_corpus: str, ids, window: int, stride: int, bos_id: int | None,
               part: tuple[int, int] | None, on_window: Callable[[int, int], None] | None = None):
    """``score_windows`` over windows ``part`` of the plan (None: all), with the stock model and the engine."""
    from .config import Config
    from .evaluate import make_runners, score_windows

    hf_model, tokenizer = source.load()
    runners = make_runners(hf_model, tokenizer, Config.from_dict(config), engine_corpus)
    return score_windows(runners, ids, window, stride, bos_id, source.device, on_window=on_window, part=part)


def merge_totals(parts: list[list]) -> list:
    """Sum per-runner ``Totals`` of window ranges into one per runner (stats kept in window order)."""
    from .evaluate import Totals

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


def score_windows_ray(address: str | None, source: ModelSource, config, engine_corpus: str, ids, window: int, stride: int,
                      bos_id: int | None, progress: Callable[[int, int], None] | None = None) -> list:
    """Every window of one evaluation: here (``address`` None), or split into ranges scored as Ray tasks, merged exactly."""
    from .evaluate import window_plan

    if address is None:
        return score_part(source, config.to_dict(), engine_corpus, ids, window, stride, bos_id, None, progress)
    n = len(window_plan(ids.numel(), window, stride, bos_id is not None))
    ray = init_ray(address)
    k = min(n, 2 * cluster_cpus(ray))
    bounds = [round(i * n / k) for i in range(k + 1)]
    calls = [(source, config.to_dict(), engine_corpus, ids, window, stride, bos_id, (a, b)) for a, b in zip(bounds, bounds[1:])]
    return merge_totals(map_calls(score_part, calls, address, source.device.startswith("cuda"), progress))


# Sweep rows ------------------------------------------------------------------------------------

def sweep_row(source: ModelSource, corpus: str, split: str, window: int, max_tokens: int | None, series: str, kind: str,
              label: str, data: dict) -> dict:
    """One row of a sweep: the configuration against the stock model on the same windows."""
    from .config import Config
    from .evaluate import evaluate_model
    from .sweep import flat_row

    r = evaluate_model(source.name, corpus, split, window=window, max_tokens=max_tokens, loaded=source.load(),
                       device=source.device, config=Config.from_dict({**data, "name": label}))
    return flat_row(series, kind, label, r)

"""Scale-out with Ray: evaluation windows and calibration/sweep trials as Ray tasks.

This module is the executor alone: the work is a plain function of the module that owns it
(``evaluate.score_part``, ``sweep.sweep_row``, ``calibrate.measure_trial``) that ``map_calls``
calls in this process, or as Ray tasks when given a Ray address. Results are small and picklable (sums of NLL, token counts, FLOPs and
the engine's ledgers, never tensors) and are merged by the caller in submission order, so
a Ray run's numbers equal the serial run's: perplexity to float rounding of the sums, the
deterministic fields of every trial and row exactly. Wall-clock fields are the workers'
own times and are not comparable across the two (workers share the machine).

A worker loads the model by name once and keeps it for later tasks (``models.ModelSource``,
the picklable half of a ``LoadedModel``); in the serial path the caller's loaded model is used. Ray is optional
(``pip install 'quicksilver[ray]'``); with no address a local cluster of 2 CPUs starts.
"""

from __future__ import annotations

from typing import Callable, Sequence

from .errors import QuicksilverError
from .models import ModelSource

LOCAL = "local"  # --ray with no address: start a local Ray cluster
LOCAL_CPUS = 2

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
    refs = [remote.remote(*(a.shipped() if isinstance(a, ModelSource) else a for a in args)) for args in calls]
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

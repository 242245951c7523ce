"""Load benchmark of ``quicksilver serve``: continuous batching against one-at-a-time serving.

Streaming clients (asyncio + httpx) send greedy completion requests for wiki prompts of
varied length, at several concurrency levels, to a continuous-batching server
(``--max-batch`` rows); the same kind of load then goes to a server that serves one
request at a time (``--max-batch 1``). Every response is checked against the same
prompt's single-request greedy output, computed in this process with ``Engine.generate``
before any server starts: a response that differs, is cut short or fails counts against
the run. Reports throughput (generated tokens per second of wall clock), p50/p95 time to
first token and latency per level, and writes serve.json, serve.md and serve_latency.png.

    python benchmarks/bench_serve.py [--concurrency 1,8,32] [--requests 16,64,128] [--sequential 8:24] [--max-tokens 32] [--out docs/results]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see the serve command in cli.py

import httpx  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ROOT, header, run_meta, wiki_prompts, write_results  # noqa: E402
from quicksilver import generate  # noqa: E402
from quicksilver import load_model  # noqa: E402
from quicksilver.config import Config  # noqa: E402
from quicksilver.evaluate import make_engine  # noqa: E402


def prompts_from_corpus(tok, n: int) -> list[str]:
    """Openings of n wiki test articles, cut to 12..48 tokens (varied lengths), as text."""
    return [tok.decode(ids) for ids in wiki_prompts(tok, [12 + (i * 7) % 37 for i in range(n)])]


def references(args, prompts: list[str], preset: str | None = None, max_tokens: int | None = None) -> dict[str, str]:
    """Each prompt's greedy continuation served alone, through the same tokenization as the server."""
    model, tok = load_model(args.model, dtype=args.dtype)
    engine = make_engine(model, tok, Config.preset(preset or args.preset))
    out = {}
    for p in prompts:
        r = generate(engine, torch.tensor(tok(p).input_ids), max_tokens or args.max_tokens, eos_token_id=tok.eos_token_id)
        out[p] = tok.decode(r.tokens[0], skip_special_tokens=True)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``quicksilver serve`` subprocess, ready once /health answers."""

    def __init__(self, args, max_batch: int, preset: str | None = None, max_tokens: int | None = None):
        self.url = f"http://127.0.0.1:{free_port()}"
        port = self.url.rsplit(":", 1)[1]
        cmd = [sys.executable, "-m", "quicksilver.cli", "serve", "--model", args.model, "--preset", preset or args.preset, "--dtype", args.dtype,
               "--port", port, "--max-batch", str(max_batch), "--max-queue", "1024", "--max-tokens-limit", str(max_tokens or args.max_tokens)]
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"error: the server exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.close()
        sys.exit("error: the server did not come up")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: text, usage, finish reason, TTFT and latency (seconds), or an error."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, text, finish, usage, done = None, [], None, None, False
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"prompt": prompt, "error": f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return {"prompt": prompt, "error": chunk["error"]["message"]}
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk["choices"]:
                    if choice["text"] and ttft is None:
                        ttft = time.perf_counter() - t0
                    text.append(choice["text"])
                    finish = choice["finish_reason"] or finish
    except httpx.HTTPError as e:
        return {"prompt": prompt, "error": f"{type(e).__name__}: {e}"}
    latency = time.perf_counter() - t0
    if not done or usage is None:
        return {"prompt": prompt, "error": "stream ended without usage and [DONE]"}
    return {"prompt": prompt, "text": "".join(text), "finish_reason": finish, "completion_tokens": usage["completion_tokens"],
            "ttft": ttft if ttft is not None else latency, "latency": latency}


async def run_level(url: str, prompts: list[str], concurrency: int, n_requests: int, max_tokens: int) -> tuple[list[dict], float]:
    """``n_requests`` requests (prompts in turn) from ``concurrency`` clients that each send one after another."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(prompts[i % len(prompts)])
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:
        async def worker():
            while not queue.empty():
                results.append(await one_request(client, url, queue.get_nowait(), max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return results, wall


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def summarize(mode: str, concurrency: int, results: list[dict], wall: float, refs: dict[str, str]) -> dict:
    ok = [r for r in results if "error" not in r]
    mismatched = [r for r in ok if r["text"] != refs[r["prompt"]]]
    tokens = sum(r["completion_tokens"] for r in ok)
    return {
        "mode": mode, "concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
        "mismatched": len(mismatched), "tokens": tokens, "wall_seconds": wall, "tokens_per_second": tokens / wall,
        "requests_per_second": len(results) / wall,
        "ttft_p50": pct([r["ttft"] for r in ok], 0.5), "ttft_p95": pct([r["ttft"] for r in ok], 0.95),
        "latency_p50": pct([r["latency"] for r in ok], 0.5), "latency_p95": pct([r["latency"] for r in ok], 0.95),
        "latency_mean": statistics.fmean([r["latency"] for r in ok]) if ok else float("nan"),
        "error_examples": [r["error"] for r in results if "error" in r][:3],
        "mismatch_examples": [{"prompt": r["prompt"], "got": r["text"], "want": refs[r["prompt"]]} for r in mismatched[:3]],
    }


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, marker in (("continuous", "o"), ("one-at-a-time", "s")):
        rs = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["concurrency"])
        if not rs:
            continue
        c = [r["concurrency"] for r in rs]
        ax1.plot(c, [r["latency_p50"] for r in rs], marker=marker, label=f"{mode} p50")
        ax1.plot(c, [r["latency_p95"] for r in rs], marker=marker, linestyle="--", label=f"{mode} p95")
        ax1.plot(c, [r["ttft_p50"] for r in rs], marker=marker, linestyle=":", label=f"{mode} TTFT p50")
        ax2.plot(c, [r["tokens_per_second"] for r in rs], marker=marker, label=mode)
    ax1.set(xscale="log", yscale="log", xlabel="concurrent streaming clients", ylabel="seconds", title="latency per request")
    ax2.set(xscale="log", xlabel="concurrent streaming clients", ylabel="generated tokens / s", title="throughput")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def lossless_prompts(tok) -> dict[str, list[str]]:
    """The speculative benchmark's prompts as completion text (chat ones through the chat template):
    ``grounded`` (repeat or edit a passage given in the prompt: what drafts from lookup can predict)
    and ``open`` (continue a wiki opening)."""
    data = json.loads((ROOT / "benchmarks" / "prompts" / "speculative.json").read_text())

    def text(p):
        if not p["chat"]:
            return p["text"]
        return tok.apply_chat_template([{"role": "user", "content": p["text"]}], tokenize=False, add_generation_prompt=True)

    return {"grounded": [text(p) for p in data if p["kind"] in ("repeat", "edit")],
            "open": [text(p) for p in data if p["kind"] == "open"]}


def lossless_comparison(args, tok) -> list[dict]:
    """``serve --preset lossless`` against ``serve --preset off`` (the same dtype), 4 concurrent clients, on
    grounded and open prompts; every answer checked against ``off`` generated alone (lossless must equal it)."""
    rows = []
    kinds = lossless_prompts(tok)
    refs = references(args, [p for ps in kinds.values() for p in ps], "off", args.lossless_tokens)
    servers = {}
    try:
        for preset in ("off", "lossless"):
            servers[preset] = Server(args, 4, preset, max_tokens=args.lossless_tokens)
            asyncio.run(run_level(servers[preset].url, kinds["open"][:2], 2, 2, 4))  # warm-up
        for kind, prompts in kinds.items():
            halves = {preset: ([], 0.0) for preset in servers}
            for half in (0, 1):  # off, lossless, then lossless, off: a change in load falls on both sides
                for preset in (("off", "lossless") if half == 0 else ("lossless", "off")):
                    part = prompts[half::2]
                    results, wall = asyncio.run(run_level(servers[preset].url, part, 4, len(part), args.lossless_tokens))
                    got, seconds = halves[preset]
                    halves[preset] = (got + results, seconds + wall)
            for preset, (results, wall) in halves.items():
                row = summarize(preset, 4, results, wall, refs)
                row["prompts"] = kind
                rows.append(row)
                print(f"lossless comparison, {kind} prompts, {preset}: {row['tokens_per_second']:.1f} tok/s, "
                      f"mismatched {row['mismatched']}, errors {row['errors']}", file=sys.stderr, flush=True)
                if row["errors"]:
                    sys.exit(f"error: the {preset} server failed {row['errors']} requests, e.g. {row['error_examples'][0]}")
    finally:
        for server in servers.values():
            server.close()
    for r in rows:
        base = next(b for b in rows if b["prompts"] == r["prompts"] and b["mode"] == "off")
        r["speedup_vs_off"] = r["tokens_per_second"] / base["tokens_per_second"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--preset", default="off")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--concurrency", default="1,8,32", help="client counts for the continuous-batching server")
    ap.add_argument("--requests", default="16,64,128", help="requests at each concurrency (>= 200 in all by default)")
    ap.add_argument("--sequential", default="8:24", help="CLIENTS:REQUESTS sent to the one-at-a-time server")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=16, help="distinct wiki prompts")
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--lossless-tokens", type=int, default=96, help="new tokens per request in the lossless comparison")
    ap.add_argument("--no-lossless", action="store_true", help="skip the lossless-against-off comparison")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    counts = [int(n) for n in args.requests.split(",")]
    if len(levels) != len(counts):
        sys.exit("error: --concurrency and --requests need the same number of entries")
    seq_clients, seq_requests = (int(x) for x in args.sequential.split(":"))

    _, tok = load_model(args.model)
    prompts = prompts_from_corpus(tok, args.prompts)
    t0 = time.perf_counter()
    refs = references(args, prompts)
    print(f"references: {len(refs)} prompts served alone in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    # Both servers run side by side and their levels are interleaved (one-at-a-time, then the
    # continuous levels, then one-at-a-time again), so that a change in the machine's load
    # during the run falls on both sides of the ratio.
    load_before = os.getloadavg()
    servers = {}
    try:
        for mode, max_batch in (("continuous", args.max_batch), ("one-at-a-time", 1)):
            servers[mode] = Server(args, max_batch)
            asyncio.run(run_level(servers[mode].url, prompts[:2], 2, 2, 4))  # warm-up
        first = seq_requests // 2
        plan = ([("one-at-a-time", seq_clients, first)] + [("continuous", c, n) for c, n in zip(levels, counts)]
                + [("one-at-a-time", seq_clients, seq_requests - first)])
        rows, seq_results, seq_wall = [], [], 0.0
        for mode, concurrency, n in plan:
            results, wall = asyncio.run(run_level(servers[mode].url, prompts, concurrency, n, args.max_tokens))
            if mode == "one-at-a-time":  # two halves, one row
                seq_results += results
                seq_wall += wall
                if len(seq_results) < seq_requests:
                    continue
                results, wall = seq_results, seq_wall
            row = summarize(mode, concurrency, results, wall, refs)
            rows.append(row)
            print(f"{mode} x{concurrency}: {row['requests']} requests, {row['tokens_per_second']:.1f} tok/s, "
                  f"TTFT p50 {row['ttft_p50']:.2f} s, latency p50 {row['latency_p50']:.2f} s p95 {row['latency_p95']:.2f} s, "
                  f"errors {row['errors']}, mismatched {row['mismatched']}", file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.close()
    lossless = [] if args.no_lossless else lossless_comparison(args, tok)
    load_after = os.getloadavg()

    seq = next(r for r in rows if r["mode"] == "one-at-a-time")
    for r in rows:
        r["speedup_vs_one_at_a_time"] = r["tokens_per_second"] / seq["tokens_per_second"]
    meta = run_meta(
        model=args.model, preset=args.preset, dtype=args.dtype, max_tokens=args.max_tokens, max_batch=args.max_batch,
        prompts=len(prompts),
        # Load average (1 min) before and after the timed levels; QS_QUIET: other processes were paused.
        load_1min=[round(load_before[0], 2), round(load_after[0], 2)])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, out / "serve_latency.png", f"quicksilver serve, {args.model} {args.dtype}, preset {args.preset}, "
                                          f"{args.max_tokens} new tokens per request ({meta['date']})")
    total = sum(r["requests"] for r in rows)
    what = (f"load average {meta['load_1min'][0]:.1f} before, {meta['load_1min'][1]:.1f} after"
            f"{' (other processes paused: benchmarks/quiet)' if meta['quiet'] else ' (machine shared with other work)'}; "
            f"{args.model} {args.dtype}, preset `{args.preset}`, {len(prompts)} wiki prompts of 12-48 tokens, greedy, "
            f"{args.max_tokens} new tokens at most per request (EOS may end one earlier), streamed; {total} requests in all. "
            f"Continuous batching: `--max-batch {args.max_batch}`; one-at-a-time: `--max-batch 1`; both servers up at once, "
            "one-at-a-time measured in two halves, before and after the continuous levels. Every response is checked against "
            "the same prompt's greedy output generated alone in the benchmark's process.")
    lines = [
        header(meta, what),
        "",
        "| server | clients | requests | errors | mismatched or cut | tokens/s | vs one-at-a-time | TTFT p50 | TTFT p95 | latency p50 | latency p95 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['requests']} | {r['errors']} | {r['mismatched']} | {r['tokens_per_second']:.1f} "
                     f"| {r['speedup_vs_one_at_a_time']:.2f}x | {r['ttft_p50']:.2f} s | {r['ttft_p95']:.2f} s | {r['latency_p50']:.2f} s "
                     f"| {r['latency_p95']:.2f} s |")
    lines += ["", "![latency and throughput against concurrency](results/serve_latency.png)"]
    if lossless:
        lines += ["", f"**Lossless serving** (`serve --preset lossless` against `serve --preset off`, {args.dtype}, `--max-batch 4`, "
                  f"4 concurrent streaming clients, {args.lossless_tokens} new tokens at most; grounded: the speculative "
                  "benchmark's repeat and edit prompts through the chat template; open: its wiki openings; every answer "
                  "checked against `off` generated alone):", "",
                  "| prompts | server | requests | errors | mismatched | tokens/s | vs off |", "|---|---|---|---|---|---|---|"]
        for r in lossless:
            lines.append(f"| {r['prompts']} | `{r['mode']}` | {r['requests']} | {r['errors']} | {r['mismatched']} "
                         f"| {r['tokens_per_second']:.1f} | {r['speedup_vs_off']:.2f}x |")
    write_results(out, "serve", {"meta": meta, "rows": rows, "lossless": lossless}, "\n".join(lines))


if __name__ == "__main__":
    main()

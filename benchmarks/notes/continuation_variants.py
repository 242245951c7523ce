"""Continuation perplexity of KV rules on a *calibration* split: the variants behind RESULTS "Long context".

Chunks of ``--context`` tokens of the split; each rule compresses the prefix (context - 512 tokens) and
the next 512 tokens are scored (``continuation.score_chunk``, as ``long_context.py continuation`` does on
the test split), against the stock model on the same chunks. Rules are ``long_context.kv_config``'s
(``quest+page_size=2+block_pages=16+recent_window=448``). ``--per-query N`` sets
``attention.QUEST_PER_QUERY``. The runs behind RESULTS (news calibration, 4,096 tokens, 25%, 4 chunks):
the block-choice rows (+4.18% for the rule, +4.38% window, +4.09%/+4.29% with 448/224 recent keys,
+4.04% with 2-key blocks, +4.19% with ``dense_prefill=1``, a setting then in the working tree and
committed later) ran on the code just before commit 510e841, where a continuation of more than 32
tokens still chose in blocks; since then text appended to a cache always chooses per query, so
those rows need that checkout. The per-query rows (+0.72% for the rule, +2.75% for ``quest``,
16-key pages; run then with ``QUEST_PER_QUERY`` raised to 1024) run on the current code:

    python benchmarks/notes/continuation_variants.py --corpus news --chunks 4 --rules quest+page_size=2+block_pages=16,quest
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "src"))

from long_context import CONTINUATION, kv_config  # noqa: E402

from quicksilver import attention, load_corpus, load_model  # noqa: E402
from quicksilver.continuation import score_chunk  # noqa: E402
from quicksilver.engine import Engine  # noqa: E402
from quicksilver.evaluate import tokenize_documents  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="news")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--per-query", type=int, default=attention.QUEST_PER_QUERY, help="attention.QUEST_PER_QUERY for this run")
    ap.add_argument("--rules", required=True, help="comma-separated long_context.py rules")
    a = ap.parse_args()
    attention.QUEST_PER_QUERY = a.per_query
    model, tok = load_model("smollm2-135m", dtype="auto")
    ids = tokenize_documents(tok, load_corpus(a.corpus, "calibration").documents, a.context * a.chunks)
    chunks = [ids[i * a.context : (i + 1) * a.context] for i in range(min(a.chunks, ids.numel() // a.context))]
    prefix = a.context - CONTINUATION
    base = [score_chunk(Engine(model), c[:prefix], c[prefix:])[0] for c in chunks]
    print(f"{a.corpus} calibration, {len(chunks)} chunks, stock nll/token {[round(b / CONTINUATION, 3) for b in base]}", flush=True)
    for rule in a.rules.split(","):
        engine = Engine(model, kv_config(rule, a.keep, prefix))
        nll = [score_chunk(engine, c[:prefix], c[prefix:])[0] for c in chunks]
        delta = math.exp((sum(nll) - sum(base)) / (CONTINUATION * len(chunks))) - 1
        print(f"{rule} (per-query up to {a.per_query}): {delta * 100:+.2f}%", flush=True)


if __name__ == "__main__":
    main()

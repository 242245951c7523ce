"""How a quest setting chooses the question's keys: one prefill per trial, many question-time variants on that cache.

Each trial (``quicksilver needle``'s trials of ``--corpus``/``--split``, seed 0) is prefilled once
(stock, or ``--prefill`` kv settings); then each variant (kv settings, or null for the stock
model) answers the question greedily and scores the teacher-forced log-probability of " KEY"
after it (``NAME_lp``, a continuous measure where the stock model rarely retrieves). One JSON
line per trial is appended to ``--out``. The run behind RESULTS "Long context" (calibration
split, 4,096 tokens, 25%):

    python benchmarks/notes/quest_question_pages.py --corpus news --split calibration --trials 3 --out cal.jsonl \
        --variants '{"stock": null, "p8": {"enabled": true, "selection": "quest", "keep_fraction": 0.25, "page_size": 8}, ...}'
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "src"))

from quicksilver import load_corpus, load_model  # noqa: E402
from quicksilver.cache import SequenceCache  # noqa: E402
from quicksilver.config import Config  # noqa: E402
from quicksilver.engine import Engine  # noqa: E402
from quicksilver.evaluate import tokenize_documents  # noqa: E402
from quicksilver.decoding import decode_one_token, prefill  # noqa: E402
from quicksilver.needle import ANSWER_TOKENS, DEFAULT_DEPTHS, answer_key, extend, make_trials  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="news")
    ap.add_argument("--split", default="calibration")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--start", type=int, default=0, help="first trial index (to go on in chunks)")
    ap.add_argument("--prefill", default="{}", help="kv settings of the prefill as JSON ({}: the stock model)")
    ap.add_argument("--variants", required=True, help='JSON {"name": {kv settings} or null for the stock model}')
    ap.add_argument("--out", required=True, help="JSON lines, appended")
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m", dtype="auto")
    hay = tokenize_documents(tok, load_corpus(a.corpus, a.split).documents, a.context * 4)
    trials = make_trials(tok, hay, [a.context], DEFAULT_DEPTHS, a.start + a.trials, 0)[a.start:]
    nl = model.config.num_hidden_layers
    pcfg = json.loads(a.prefill)
    pre = Engine(model, Config.from_dict({"kv": pcfg})) if pcfg else Engine(model)
    variants = {k: (Engine(model, Config.from_dict({"kv": v})) if v else Engine(model)) for k, v in json.loads(a.variants).items()}
    with torch.inference_mode():
        for i, t in enumerate(trials, a.start):
            t0 = time.perf_counter()
            n = t.ids.numel()
            cache = SequenceCache(nl, capacity=n + t.question.numel() + ANSWER_TOKENS)
            prefill(pre, t.ids, cache)
            row = {"trial": i, "depth": t.depth, "key": t.key, "prefill_s": round(time.perf_counter() - t0, 1)}
            for name, e in variants.items():
                cache.truncate(n)
                cache.pages = [None] * nl  # page summaries of another page size must not be reused
                logits, _ = extend(e, t.question, cache)
                toks = [int(logits.argmax(-1))]
                for _ in range(ANSWER_TOKENS - 1):
                    logits, _ = decode_one_token(e, torch.tensor(toks[-1:]), [cache])
                    toks.append(int(logits.argmax(-1)))
                row[name] = answer_key(tok.decode(toks)) == t.key
                cache.truncate(n)
                cache.pages = [None] * nl
                ans = torch.tensor(tok(" " + t.key, add_special_tokens=False).input_ids)
                seq = torch.cat([t.question, ans])
                lg, _ = extend(e, seq, cache, logit_rows=torch.arange(t.question.numel() - 1, seq.numel() - 1))
                row[name + "_lp"] = round(float(torch.log_softmax(lg.float(), -1).gather(-1, ans[:, None]).sum()), 3)
            row["s"] = round(time.perf_counter() - t0, 1)
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

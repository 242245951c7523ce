"""Build benchmarks/prompts/speculative.json from the offline wiki test split (run once; the JSON is committed).

Open-ended: the opening paragraph of 8 test articles, cut to 24-64 tokens (plain text, no
chat template). Input-grounded: a passage of 300-600 tokens from 24 other test articles, with
an instruction to repeat it, lightly edit it, or continue it, 8 of each kind in turn (chat
template applied by the benchmark; the first 9 are those of the first, 3-per-kind set).

    python benchmarks/prompts/make_speculative_prompts.py
"""

from __future__ import annotations

import json
from pathlib import Path

from quicksilver import load_corpus, load_model

EDITS = [
    "Rewrite the passage below in full, word for word, but write every number in words.",
    "Rewrite the passage below in full, word for word, but replace every \"the\" at the start of a sentence with \"This\".",
    "Rewrite the passage below in full, correcting only its spelling and punctuation where needed.",
    "Rewrite the passage below in full, word for word, but use American spelling throughout.",
    "Rewrite the passage below in full, word for word, but replace every semicolon with a full stop.",
    "Rewrite the passage below in full, word for word, but write \"and\" as \"&\".",
    "Rewrite the passage below in full, word for word, but spell out every abbreviation.",
    "Rewrite the passage below in full, word for word, but put every year in parentheses.",
]
PER_KIND = 8  # prompts of each kind (the issue asks for at least 8)


def passage(tok, doc: str, lo: int = 300, hi: int = 600) -> str | None:
    """Whole paragraphs of the article (after its title) totalling 300-600 tokens, or None."""
    paras = [p for p in doc.split("\n\n")[1:] if p.strip() and not p.startswith("=")]
    text = ""
    for p in paras:
        cand = (text + "\n\n" + p) if text else p
        if len(tok(cand, add_special_tokens=False).input_ids) > hi:
            break
        text = cand
    n = len(tok(text, add_special_tokens=False).input_ids)
    return text if lo <= n <= hi else None


def main() -> None:
    _, tok = load_model("smollm2-135m", dtype="float32")
    docs = load_corpus("wiki", "test").documents
    prompts = []
    for i, doc in enumerate(docs[:PER_KIND]):
        ids = tok(doc.split("\n\n", 2)[1], add_special_tokens=False).input_ids
        prompts.append({"kind": "open", "text": tok.decode(ids[: 24 + (i * 5) % 41]), "chat": False})
    grounded = [p for p in (passage(tok, d) for d in docs[PER_KIND:]) if p][: 3 * PER_KIND]
    assert len(grounded) == 3 * PER_KIND, f"only {len(grounded)} passages of 300-600 tokens"
    for j, text in enumerate(grounded):
        kind = ("repeat", "edit", "continue")[j % 3]
        if kind == "repeat":
            instruction = "Repeat the passage below exactly, word for word."
        elif kind == "edit":
            instruction = EDITS[j // 3]
        else:
            instruction = "Continue the passage below with the next paragraph."
        prompts.append({"kind": kind, "text": f"{instruction}\n\n{text}", "chat": True})
    out = Path(__file__).with_name("speculative.json")
    out.write_text(json.dumps(prompts, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}: " + ", ".join(f"{k} {sum(p['kind'] == k for p in prompts)}" for k in ("open", "repeat", "edit", "continue")))


if __name__ == "__main__":
    main()

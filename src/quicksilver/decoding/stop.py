"""The one stop check of every decode path: EOS, stop strings, length.

Stop strings are found in the text decoded so far, decoded incrementally (a few recent tokens
per step, as vLLM does) rather than the whole output every token. ``first_stop`` and
``safe_prefix`` are what a streaming front needs to end its text before a stop string
(OpenAI's semantics) and to hold back a tail that may begin one.
"""

from __future__ import annotations

from typing import Optional


class Detokenizer:
    """Text of a growing token list, decoded a few tokens at a time.

    ``tokens[prefix_offset:read_offset]`` were decoded already; each new token decodes that
    window plus the new tokens, and the difference is the new text. A token that ends inside a
    multi-byte character yields nothing until the character is complete; ``final`` flushes it.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.prefix_offset = self.read_offset = 0
        self.text = ""

    def add(self, tokens: list[int], final: bool = False) -> str:
        """The text the newest tokens complete (appended to ``text``)."""
        decode = self.tokenizer.decode
        before = decode(tokens[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        now = decode(tokens[self.prefix_offset :], skip_special_tokens=True)
        if len(now) <= len(before) or (now.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(tokens)
        new = now[len(before) :]
        self.text += new
        return new


class StopCheck:
    """Why a sequence stops after its newest token: ``eos``, ``stop_string``, ``length`` or None.

    Parameters
    ----------
    eos : token ids that end a sequence (the EOS token is emitted, then it stops)
    stop_strings : the sequence stops once its decoded text contains one (needs ``tokenizer``)
    max_new_tokens : tokens to generate at most
    tokenizer : decodes the text (needed for stop strings, or when ``text`` is wanted)
    text : keep the decoded text (``detokenizer.text``) even without stop strings (streaming)
    """

    def __init__(self, eos=(), stop_strings=(), max_new_tokens: int = 1, tokenizer=None, text: bool = False):
        self.eos = set([eos] if isinstance(eos, int) else (eos or ()))
        self.stop_strings = tuple(stop_strings or ())
        self.max_new_tokens = max_new_tokens
        self.detokenizer = Detokenizer(tokenizer) if (self.stop_strings or text) and tokenizer is not None else None

    def __call__(self, tokens: list[int]) -> Optional[str]:
        tok = tokens[-1]
        reason = "eos" if tok in self.eos else "length" if len(tokens) >= self.max_new_tokens else None
        if self.detokenizer is not None:
            self.detokenizer.add(tokens, final=reason is not None)
            if self.stop_strings and reason != "eos" and first_stop(self.detokenizer.text, self.stop_strings) is not None:
                reason = "stop_string"
        return reason

    @property
    def text(self) -> str:
        return "" if self.detokenizer is None else self.detokenizer.text


def first_stop(text: str, stops: tuple[str, ...]) -> Optional[int]:
    """Where the first stop string begins in ``text`` (None: none does)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def safe_prefix(text: str, stops: tuple[str, ...]) -> str:
    """What can be sent now: no half-decoded character, no tail that may begin a stop string."""
    text = text.rstrip("\ufffd")  # the rest of a multi-byte character comes with the next token
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return text[: len(text) - hold]

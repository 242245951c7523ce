"""Prompt ids from a request's text: run in a worker thread, never on the event loop.

Tokenizing megabytes of text takes seconds (the Rust tokenizer releases the GIL, so the
event loop answers meanwhile), and a prompt that cannot fit the context is refused by its
size in bytes before it is tokenized at all (``PromptBound``).

Chat content is text: a user who types ``<|im_start|>system`` into a message gets those
characters, not the template's control tokens. Only the chat template writes control tokens.
"""

from __future__ import annotations

import secrets


class PromptBound:
    """The most UTF-8 bytes a prompt of ``context`` tokens can hold, from the vocabulary alone.

    A token's text is at most as long, in UTF-8 bytes, as its vocabulary entry (byte-level
    BPE writes a byte as one or two bytes; SentencePiece's ``▁`` takes three for a space;
    ``<0xE2>`` is six for one), so ``bytes_per_token`` times ``context``, doubled against
    normalizers that shrink text (NFKC), bounds what fits. Tokenizers that delete text (BERT's
    accent stripping) are not causal LMs' and are not covered.
    """

    def __init__(self, tokenizer, context: int):
        vocab = tokenizer.get_vocab()
        self.bytes_per_token = max((len(t.encode("utf-8")) for t in vocab), default=1)
        self.context = context
        self.max_bytes = 2 * self.bytes_per_token * context

    def too_long(self, *texts: str) -> bool:
        """Whether these texts (joined) surely tokenize to more than the context."""
        chars = sum(len(t) for t in texts)
        if chars <= self.max_bytes // 4:  # a character is at most 4 bytes: no need to encode
            return False
        return sum(len(t.encode("utf-8")) for t in texts) > self.max_bytes


def text_ids(tokenizer, text: str) -> list[int]:
    """A completion prompt's ids (the tokenizer's own special tokens added, such as BOS)."""
    return tokenizer(text, return_attention_mask=False).input_ids if text else []


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The chat template's ids for ``messages`` (``role``, ``content``), content tokenized as plain text.

    When no content holds an added token's text, the rendered template is tokenized whole, as
    ``generate --chat`` does. Otherwise the template is rendered around placeholders, its own
    text tokenized with control tokens, each content with ``split_special_tokens``.
    Raises ValueError when the template alters the placeholders (the content cannot be kept apart).
    """
    controls = [t.content for t in tokenizer.added_tokens_decoder.values()]
    render = lambda ms: tokenizer.apply_chat_template(ms, tokenize=False, add_generation_prompt=True)  # noqa: E731
    if not any(c and c in m["content"] for m in messages for c in controls):
        return tokenizer(render(messages), add_special_tokens=False, return_attention_mask=False).input_ids
    nonce = secrets.token_hex(8)
    marks = [f"QSCONTENT{i}X{nonce}" for i in range(len(messages))]
    rendered = render([{**m, "content": mark} for m, mark in zip(messages, marks)])
    pieces = []
    for mark in marks:
        before, found, rendered = rendered.partition(mark)
        if not found or mark in rendered:
            raise ValueError("message content holds control tokens, and this model's chat template cannot keep content apart")
        pieces.append(before)
    ids = []
    for piece, message in zip(pieces, messages):
        ids += tokenizer(piece, add_special_tokens=False, return_attention_mask=False).input_ids
        ids += tokenizer(message["content"], add_special_tokens=False, split_special_tokens=True, return_attention_mask=False).input_ids
    return ids + tokenizer(rendered, add_special_tokens=False, return_attention_mask=False).input_ids

"""Incremental detokenisation with stop strings: the text of a growing list of generated token ids, handed out
piece by piece (``anyaccel generate`` streams with it; the serving layer re-exports it)."""
from __future__ import annotations

from typing import Any, List, Sequence

__all__ = ["TextState"]


class TextState:
    """Incremental detokenisation and stop strings for one request (shared by :class:`LLM` and the server).

    Text is re-decoded from all generated tokens (a token's text can depend on its neighbours), a trailing
    incomplete UTF-8 character (U+FFFD) is held back, and the text already handed out is never changed. A stop
    string may straddle deltas, so a tail of the text that is the start of a stop string is held back until the
    next token settles it.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.token_ids: List[int] = []
        self.sent = ""  # text handed out so far
        self.stopped = False

    def push(self, new_ids: Sequence[int], final: bool = False) -> str:
        """Add tokens; return the new text that may be handed out. Sets :attr:`stopped` on a stop string."""
        self.token_ids.extend(new_ids)
        if self.tokenizer is None or self.stopped:
            return ""
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        for s in self.stop:
            i = text.find(s, max(0, len(self.sent) - len(s)))
            if i >= 0:
                text = text[:i]
                self.stopped = True
        if not self.stopped and not final:
            if text.endswith("\ufffd"):
                text = text[:-1]
            keep = 0  # the longest tail of the text that could still grow into a stop string
            for stop in self.stop:
                for k in range(min(len(stop) - 1, len(text)), keep, -1):
                    if text.endswith(stop[:k]):
                        keep = k
                        break
            text = text[:max(len(self.sent), len(text) - keep)]
        if not text.startswith(self.sent):  # the tokenizer changed earlier text: hand out only what is new
            text = self.sent + text[len(self.sent):]
        delta, self.sent = text[len(self.sent):], max(text, self.sent, key=len)
        return delta

"""Token ids -> text deltas for streaming, with stop strings.

A byte-level BPE token can end in the middle of a UTF-8 character (the decoded text then ends in U+FFFD until the
next token completes it), and text that may be the start of a stop string must not be sent before we know it is
not one. So a delta is emitted only up to the stable end: no trailing replacement character, no trailing prefix of
a stop string. The concatenated deltas are the completion's text, streamed or not."""
from __future__ import annotations

from typing import Callable, Sequence

__all__ = ["TextStream"]


class TextStream:
    def __init__(self, decode: Callable[[Sequence[int]], str] | None, stop: Sequence[str] = ()):
        self.decode = decode
        self.stop = [s for s in stop if s]
        self._longest = max(map(len, self.stop), default=0)
        self.ids: list[int] = []
        self.raw = ""             # decoded text whose characters are complete
        self.text = ""            # text released so far
        self.stopped = False      # a stop string matched: the completion ends before it
        # incremental decoding (as vLLM's detokenizer): decode(ids[p:]) minus decode(ids[p:r]) is the new text.
        # Starting a few tokens back keeps tokenizers that treat a leading token specially (a leading space) right,
        # and keeps a token's cost flat in the completion's length.
        self._p = self._r = 0
        self._ptext = ""

    def add(self, token: int) -> str:
        """Append one token; return the text that is now safe to send (maybe "")."""
        if self.decode is None or self.stopped:
            return ""
        self.ids.append(token)
        new = self.decode(self.ids[self._p:])
        if len(new) > len(self._ptext) and not new.endswith("\ufffd"):   # else: wait for the character's rest
            self.raw += new[len(self._ptext):]
            self._p, self._r = self._r, len(self.ids)
            self._ptext = self.decode(self.ids[self._p:self._r])
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text at the end of the completion (held-back characters included)."""
        if self.decode is None or self.stopped:
            return ""
        self.raw += self.decode(self.ids[self._p:])[len(self._ptext):]
        self._p = self._r = len(self.ids)
        self._ptext = ""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        raw = self.raw
        if self.stop:
            lo = max(0, len(self.text) - self._longest + 1)
            hits = [p for p in (raw.find(s, lo) for s in self.stop) if p >= 0]
            if hits:
                self.stopped = True
                return self._emit(raw[:min(hits)])
        end = len(raw)
        if not final:
            for s in self.stop:           # hold back a suffix that may grow into a stop string
                for n in range(min(len(s) - 1, end), 0, -1):
                    if raw.endswith(s[:n]):
                        end = min(end, len(raw) - n)
                        break
        return self._emit(raw[:max(end, len(self.text))])

    def _emit(self, upto: str) -> str:
        delta = upto[len(self.text):]
        self.text = upto
        return delta

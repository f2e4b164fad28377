"""The n-gram proposer of strategy ngram (prompt lookup decoding, suffix matching): one row's context (prompt,
committed tokens, optionally a document before them) indexed by its n-grams, so that a step's proposal is a few
dict look-ups, not a rescan of the context (transformers' PromptLookupCandidateGenerator rescans it every step).

`propose(k, guesses)` returns continuations of the longest suffix of the context (max_n tokens down to min_n) that
occurred before: up to `guesses` distinct ones of at most k tokens, the most recent occurrence first, then shorter
suffixes' where the longest has too few. Plain Python ints throughout: a step's host work stays a few microseconds."""
from __future__ import annotations

__all__ = ["NgramIndex", "row_indexes"]

_SEP = -1       # between a document and the context: no continuation runs across it


class NgramIndex:
    def __init__(self, min_n: int = 1, max_n: int = 3, document=None, keep: int = 8):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n, self.keep = min_n, max_n, keep
        self.toks: list[int] = []
        # maps[n]: n-gram -> start indices of its continuations, oldest first (at most ~2 * keep)
        self.maps: list[dict] = [{} for _ in range(max_n + 1)]
        if document:
            self.extend(document)
            self.extend([_SEP])

    def __len__(self) -> int:
        return len(self.toks)

    def extend(self, tokens) -> None:
        """Append committed tokens. The n-grams ending just before each new token are indexed when that token
        arrives, so the context's own suffix is never indexed before it has a continuation."""
        toks, maps, lo, hi, keep = self.toks, self.maps, self.min_n, self.max_n, self.keep
        for t in tokens:
            i = len(toks)
            for n in range(lo, min(hi, i) + 1):
                key = tuple(toks[i - n:i])
                at = maps[n].get(key)
                if at is None:
                    maps[n][key] = [i]
                else:
                    at.append(i)
                    if len(at) > 2 * keep:
                        del at[:-keep]
            toks.append(int(t))

    def propose(self, k: int, guesses: int = 1) -> list[list[int]]:
        """Up to `guesses` distinct continuations (lists of 1..k tokens) of the context's longest earlier-seen
        suffix; [] when no suffix of min_n tokens occurred before."""
        toks, L = self.toks, len(self.toks)
        out: list[list[int]] = []
        got = set()
        for n in range(min(self.max_n, L), self.min_n - 1, -1):
            at = self.maps[n].get(tuple(toks[L - n:]))
            if not at:
                continue
            for p in reversed(at):
                c = toks[p:p + k]
                if _SEP in c:
                    c = c[:c.index(_SEP)]
                t = tuple(c)
                if not c or t in got:
                    continue
                got.add(t)
                out.append(c)
                if len(out) == guesses:
                    return out
        return out


def row_indexes(rows, strategy: dict, document=None) -> list[NgramIndex]:
    """One index per row over its prompt (behind `document`), sized by the manifest's strategy (min_ngram,
    max_ngram; defaults for artifacts compiled before the fields)."""
    out = []
    for r in rows:
        ix = NgramIndex(strategy.get("min_ngram", 1), strategy.get("max_ngram", 3), document)
        ix.extend(r)
        out.append(ix)
    return out

"""The n-gram proposer: incremental index == a rescan of the context (the definition) on random token streams."""
import random

import pytest

from dgopt.runtime.ngram_index import NgramIndex


def rescan(toks, k, guesses, lo, hi):
    """The definition: continuations of the longest suffix (hi..lo tokens) that occurred earlier, most recent
    first, distinct, then shorter suffixes'."""
    out, L = [], len(toks)
    for n in range(min(hi, L), lo - 1, -1):
        suf = toks[L - n:]
        for p in range(L - n - 1, -1, -1):      # occurrences ending before the last token
            if toks[p:p + n] == suf:
                c = toks[p + n:p + n + k]
                if -1 in c:
                    c = c[:c.index(-1)]
                if c and c not in out:
                    out.append(c)
                if len(out) == guesses:
                    return out
    return out


@pytest.mark.parametrize("lo,hi,k,guesses", [(1, 3, 4, 1), (1, 4, 8, 3), (2, 2, 3, 2), (1, 1, 5, 4)])
def test_incremental_equals_rescan(lo, hi, k, guesses):
    rng = random.Random(lo * 100 + hi * 10 + k)
    for trial in range(20):
        doc = [rng.randrange(6) for _ in range(rng.randrange(0, 12))] if trial % 2 else None
        idx = NgramIndex(lo, hi, document=doc, keep=64)
        ctx = (doc + [-1]) if doc else []
        for _ in range(12):
            new = [rng.randrange(6) for _ in range(rng.randrange(1, 5))]
            idx.extend(new)
            ctx += new
            assert idx.propose(k, guesses) == rescan(ctx, k, guesses, lo, hi), (ctx, k, guesses)


def test_prompt_lookup_examples():
    idx = NgramIndex(1, 3)
    idx.extend([1, 2, 3, 4, 5, 9, 1, 2, 3])
    assert idx.propose(3) == [[4, 5, 9]]                 # the 3-gram 1 2 3 matched
    idx.extend([7])
    assert idx.propose(3) == []                           # 7 never occurred before
    idx.extend([2, 3, 8, 2, 3])
    assert idx.propose(2, 3) == [[8, 2], [7, 2], [4, 5]]  # "2 3": the most recent continuation first
    idx = NgramIndex(1, 2, document=[5, 6, 7, 8])
    idx.extend([1, 6])
    assert idx.propose(4) == [[7, 8]]                     # from the document, cut at its end
    assert len(idx) == 7


def test_bad_sizes():
    with pytest.raises(ValueError, match="min_n"):
        NgramIndex(3, 2)

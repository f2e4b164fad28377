"""Host side of the multi-token strategies (lookahead, jacobi, speculative, uag): the Jacobi window, the n-gram
pool, the drafts, candidate selection, masks and positions, the sampling noise, and the KV commit of accepted tokens.

The cache is a list of slots; `_Slots` says which hold a committed token of each row. Rows that accept fewer tokens
than others get masked holes, so a batch advances in lockstep while every row keeps its exact context."""
from __future__ import annotations

import time
from collections import Counter, OrderedDict
from functools import lru_cache

import numpy as np

from .decoder import MASK_MIN, GenerateResult
from .noise import NoiseStream

__all__ = ["generate_multitoken"]


class _Slots:
    """The cache slots of every row as the additive mask value each query adds for them (0: a committed token;
    MASK_MIN: left padding, or a hole where a row accepted fewer tokens than another), in a buffer that grows by
    doubling. A step's mask is this row under each of the step's queries beside the step block's own structure:
    two slice copies, nothing of the past rebuilt."""

    def __init__(self, B: int):
        self.buf = np.empty((B, 256), np.float32)
        self.n = 0
        self._check_at = 64
        self.compactions = 0

    def compaction(self) -> np.ndarray | None:
        """Slots to keep [B, keep] once holes make up over a third of the slots (then the map is compacted: the
        caller gathers the cache by them), else None. Checked at doubling sizes: O(1) per slot."""
        if self.n < self._check_at:
            return None
        n, ok = self.n, self.buf[:, :self.n] == 0
        keep = int(ok.sum(1).max())
        if 3 * keep >= 2 * n:           # few holes: look again at twice the size
            self._check_at = 2 * n
            return None
        self._check_at = 2 * max(keep, 32)
        # row b: its committed slots in order, after keep - count[b] masked ones (slot 0, any slot will do)
        idx = np.zeros((len(ok), keep), np.int64)
        self.buf[:, :keep] = MASK_MIN
        for b in range(len(ok)):
            where = np.flatnonzero(ok[b])
            idx[b, keep - len(where):] = where
            self.buf[b, keep - len(where):keep] = 0.0
        self.n = keep
        self.compactions += 1
        return idx

    def _room(self, k: int) -> None:
        if self.n + k > self.buf.shape[1]:
            buf = np.empty((len(self.buf), 2 * (self.n + k)), np.float32)
            buf[:, :self.n] = self.buf[:, :self.n]
            self.buf = buf

    def append(self, valid: np.ndarray) -> None:
        """valid [B, k]: the next k slots (truthy: a committed token)."""
        k = valid.shape[1]
        self._room(k)
        self.buf[:, self.n:self.n + k] = 0.0 if valid.all() else np.where(valid.astype(bool), 0.0, MASK_MIN)
        self.n += k

    def append_ones(self, k: int) -> None:
        self._room(k)
        self.buf[:, self.n:self.n + k] = 0.0
        self.n += k

    def append_prefix(self, m: np.ndarray, k: int) -> None:
        """k slots of which row b's first min(m[b], k) hold committed tokens (accepted proposals), the rest are
        holes."""
        self._room(k)
        blk = self.buf[:, self.n:self.n + k]
        if len(m) == 1:     # one row: two slice writes instead of an [1, k] comparison and a where
            m0 = min(int(m[0]), k)
            blk[0, :m0], blk[0, m0:] = 0.0, MASK_MIN
        else:
            blk[:] = np.where(_arange(k)[None, :] < m[:, None], 0.0, MASK_MIN)
        self.n += k

    def mask(self, block: np.ndarray, x_valid: np.ndarray | None = None) -> np.ndarray:
        """[B, 1, q, n + q]: the past, then `block` [q, q] (the step's structure as an additive bias); x_valid [B, k]
        limits the block's first k columns (the x-block: a left-padded prompt at prefill)."""
        B, P, q = len(self.buf), self.n, block.shape[0]
        m = np.empty((B, 1, q, P + q), np.float32)
        m[:, 0, :, :P] = self.buf[:, None, :P]
        m[:, 0, :, P:] = block
        if x_valid is not None and not x_valid.all():
            k = x_valid.shape[1]
            m[:, 0, :, P:P + k] = np.where(x_valid[:, None, :].astype(bool), m[:, 0, :, P:P + k], MASK_MIN)
        return m


def _frozen(fn):
    """Memoise a step-block structure builder (called every step with a handful of distinct shapes) as the additive
    bias of its [q, q] bool result (who sees whom: 0, else MASK_MIN); results read-only."""
    @lru_cache(maxsize=64)
    def wrapped(*args):
        a = np.where(fn(*args), 0.0, MASK_MIN).astype(np.float32)
        a.setflags(write=False)
        return a
    return wrapped


@lru_cache(maxsize=64)
def _arange(n: int) -> np.ndarray:
    a = np.arange(n)
    a.setflags(write=False)
    return a


@_frozen
def _causal(q: int) -> np.ndarray:
    return np.tril(np.ones((q, q), bool))


@_frozen
def _verify_structure(k: int, G: int, K: int) -> np.ndarray:
    q = k + G * K
    s = np.zeros((q, q), bool)
    s[:k, :k] = np.tril(np.ones((k, k), bool))
    for g in range(G):
        o = k + g * K
        s[o:o + K, :k] = True
        s[o:o + K, o:o + K] = np.tril(np.ones((K, K), bool))
    return s


@_frozen
def _lookahead_structure(k: int, levels: int, W: int) -> np.ndarray:
    """Window token (l, j) sees the x-block, level-0 tokens 0..j, and levels 1..l of its own column j
    (LookaheadDecoding's j_make_causal_mask_multilevel)."""
    q = k + levels * W
    s = np.zeros((q, q), bool)
    s[:k, :k] = np.tril(np.ones((k, k), bool))
    for l in range(levels):
        for j in range(W):
            r = k + l * W + j
            s[r, :k] = True
            s[r, k:k + j + 1] = True
            for ll in range(1, l + 1):
                s[r, k + ll * W + j] = True
    return s


class _Pool:
    """n-gram pool of one row: key token -> the most recent G continuations of length K (LRU)."""

    def __init__(self, G: int, K: int):
        self.G, self.K = G, K
        self.map: dict[int, OrderedDict] = {}

    def add(self, key: int, cont) -> None:
        cont = tuple(int(t) for t in cont)
        if len(cont) != self.K or self.G == 0:
            return
        od = self.map.setdefault(int(key), OrderedDict())
        od.pop(cont, None)
        od[cont] = None
        if len(od) > self.G:
            od.popitem(last=False)

    def add_sequence(self, seq, start: int = 0) -> None:
        """Every n-gram of `seq` whose last token is at index >= start + K."""
        for i in range(max(0, start - self.K), len(seq) - self.K):
            self.add(seq[i], seq[i + 1:i + 1 + self.K])

    def candidates(self, key: int, fallback) -> np.ndarray:
        got = list(reversed(self.map.get(int(key), {})))[: self.G]
        while len(got) < self.G:
            got.append(got[0] if got else tuple(fallback))
        return np.array(got, np.int64).reshape(self.G, self.K)


class _Drafter:
    """Speculative proposals from the draft model. Its cache holds the committed tokens it has seen; `pending` are
    committed tokens it has not (the prompt at first, then the bonus token, or d_k and the bonus when all k proposals
    were accepted). After verification its cache is cut back to the accepted prefix.
    With its own step graph (draft.onnx) it runs before the target (`propose`); in a fused step (no draft session)
    its chain runs inside the target's step: it only supplies the draft's inputs (`feeds`) and commits the draft's
    part of the shared cache (`accept`)."""

    def __init__(self, dec, x_ids, x_valid, x_pos, k: int, uniform=None):
        self.dec, self.k = dec, k            # k: this step's proposals (k_schedule heuristic: set per step)
        self.n = k                          # the last step's proposals: k, or fewer where the chain stopped early
        self.fused = dec.draft_session is None
        self.sess = dec.session if self.fused else dec.draft_session
        self.uniform = uniform              # sampling: a NoiseStream of [B, 1] draws; proposals come from the draft's q
        B = len(x_ids)
        self.cache = None if self.fused else self.sess.new_cache(B)
        self.slots = _Slots(B)
        self.pend, self.pend_valid, self.pend_pos = x_ids, x_valid, x_pos
        self.tvocab = dec.vocab_size
        self.dvocab = dec.manifest["draft"]["model"]["vocab_size"]
        self.dpad = dec.manifest["draft"]["model"]["pad_token_id"]

    def _inputs(self, ids, valid_blk, pos) -> tuple:
        """ids, positions and mask of a block fed to the draft (valid_blk None: every slot valid); its slots join
        the draft's slot map."""
        if self.dvocab < self.tvocab:       # a smaller draft vocabulary: out-of-range ids -> pad
            ids = np.where(ids < self.dvocab, ids, self.dpad)
        mask = self.slots.mask(_causal(ids.shape[1]), valid_blk)
        self.slots.append_ones(ids.shape[1]) if valid_blk is None else self.slots.append(valid_blk)
        return ids, pos, mask

    def _step(self, ids, valid_blk, pos, out_name: str = "next_token"):
        ids, pos, mask = self._inputs(ids, valid_blk, pos)
        feeds = {"input_ids": ids, "position_ids": pos, "attn_mask": mask}
        if "draft_k" in self.sess.inputs:           # draft.onnx's chain is a loop: this step's k proposals
            feeds["draft_k"] = np.array(self.k, np.int64)
        out, self.cache = self.sess.run(feeds, self.cache)
        if self.uniform is None:
            return out[out_name].astype(np.int64)
        q = out["probs"].astype(np.float64)
        V = self.tvocab
        if q.shape[1] > V:              # ids the target cannot embed: drop them; the renormalised q is the proposal
            q = q[:, :V]
        q = q / q.sum(1, keepdims=True)
        cdf = np.cumsum(q, 1)
        d = np.minimum((cdf <= self.uniform.next() * cdf[:, -1:]).sum(1), q.shape[1] - 1)
        qf = np.zeros((len(q), V), np.float32)
        qf[:, :q.shape[1]] = q
        self.q.append(qf)
        return d.astype(np.int64)

    def feeds(self) -> dict:
        """Fused step: the draft's inputs (pending block, its positions, its mask over the draft cache)."""
        self.base = self.slots.n + self.pend.shape[1]
        ids, pos, mask = self._inputs(self.pend, self.pend_valid, self.pend_pos)
        self.slots.append_ones(self.k - 1)                 # d_1..d_{k-1}
        return {"draft_ids": ids, "draft_position_ids": pos, "draft_mask": mask}

    def propose(self) -> np.ndarray:
        B = len(self.pend)
        self.base = self.slots.n + self.pend.shape[1]
        self.q = []
        if "proposals" in self.sess.outputs:      # the compiled chain: k proposals (fewer if it stops early)
            props = self._step(self.pend, self.pend_valid, self.pend_pos, "proposals")
            self.slots.append_ones(props.shape[1] - 1)
        else:
            d = [self._step(self.pend, self.pend_valid, self.pend_pos)]
            last = self.pend_pos[:, -1]
            for i in range(1, self.k):
                d.append(self._step(d[-1][:, None], None, (last + i)[:, None]))
            props = np.stack(d, 1)
        # a draft vocabulary larger than the target's can propose ids the target cannot embed: such a proposal can
        # never equal the target's argmax, so any in-range stand-in keeps verification exact
        return np.where(props < self.tvocab, props, 0)[:, None, :]

    def all_accepted(self, m: np.ndarray, active: np.ndarray) -> bool:
        return bool((m[active] == self.n).all())

    def accept(self, m: np.ndarray, last: np.ndarray, new_x_pos: np.ndarray, proposals: np.ndarray, cache=None):
        """Mask the rejected proposals out of the draft's cache; fused: it is part of the step's `cache`, returned.
        last: each row's last committed token (the bonus token), the draft's next input."""
        # d_1..d_{n-1} are in the draft's cache (n: the proposals made, k or fewer where the chain stopped early):
        # the rejected ones stay as masked holes (compacted rarely)
        self.n = n = proposals.shape[-1]
        self.slots.n = self.base
        self.slots.append_prefix(m, n - 1)
        idx = self.slots.compaction()
        if idx is not None and self.fused:
            cache = self.sess.select(cache, idx, part="draft_past")
        elif idx is not None:
            self.cache = self.sess.select(self.cache, idx)
        full = m == n                                       # d_n accepted but never fed to the draft
        if not full.any():          # the usual step: the bonus token alone, valid in every row
            self.pend, self.pend_valid, self.pend_pos = last[:, None], None, new_x_pos[:, None]
            return cache
        B = len(m)
        self.pend = np.stack([proposals[:, 0, -1], last], 1)
        self.pend_valid = np.ones((B, 2), np.int8)
        self.pend_valid[:, 0] = full
        self.pend_pos = np.stack([new_x_pos - 1, new_x_pos], 1)
        return cache


class _XTokDrafter:
    """Universal Assisted Generation: proposals from a draft with a different tokenizer, one draft cache per row.
    Each step the row's committed text is extended by its new target tokens and re-encoded with the draft's
    tokenizer from the start of a recent word on (not from the beginning: that would cost O(length) per step); the
    draft cache is cut back to the longest common prefix with what it holds (so a boundary token that re-tokenizes
    differently is recomputed), the draft continues greedily for k of its tokens, and their text is re-encoded with
    the target tokenizer behind a look-behind window of the last committed target tokens. The target's verification
    keeps the output exact (greedy, or distributed as sampling) whatever this produces; a bad translation only costs
    acceptance."""

    LOOKBEHIND = 8

    def __init__(self, dec, seqs: list[list[int]], k: int, width: int | None = None):
        # k: draft tokens per step (k_schedule heuristic: set per step); the step verifies `width` candidates
        # (sampled: its K), or as many as the longest row has (greedy: the step reads their count off the shape)
        self.sess, self.k, self.width = dec.draft_session, k, width
        self.room = k           # the most candidates this step's verify positions have room for under max_seq_len
        self.tt, self.dt = dec.tokenizer.backend_tokenizer, dec.draft_tokenizer.backend_tokenizer
        self.seqs = seqs                                     # committed target ids per row, extended by the host
        self.cache = [self.sess.new_cache(1) for _ in seqs]
        self.held: list[list[int]] = [[] for _ in seqs]     # draft ids whose KV is in cache[b]
        self.dmax = dec.manifest["draft"]["model"]["max_position_embeddings"] or dec.max_seq_len
        self.tvocab, self.pad = dec.vocab_size, dec.pad
        self.done = np.zeros(len(seqs), bool)
        self.text = [""] * len(seqs)                        # decoded committed text per row ...
        self.n_text = [0] * len(seqs)                       # ... covering this many target tokens
        self.want: list[list[int]] = [[] for _ in seqs]     # its draft encoding ...
        self.start: list[list[int]] = [[] for _ in seqs]    # ... and each draft token's char offset
        self.kept = [0] * len(seqs)                         # want[:kept] was not re-encoded this step

    def _update_text(self, b: int) -> None:
        seq, n = self.seqs[b], self.n_text[b]
        w = max(0, n - 4)                       # decode the new tokens behind a few old ones: merges at the seam
        old = self.tt.decode(seq[w:n], skip_special_tokens=False)
        new = self.tt.decode(seq[w:], skip_special_tokens=False)
        if new.startswith(old) and not old.endswith("\ufffd"):
            self.text[b] += new[len(old):]
        else:                                   # a UTF-8 character split across the seam: decode everything
            self.text[b] = self.tt.decode(seq, skip_special_tokens=False)
        self.n_text[b] = len(seq)

    def _encode(self, b: int) -> list[int]:
        """The draft encoding of the row's text, re-encoded from the last word-initial token at least 8 draft
        tokens back (byte-level BPE does not merge across a pre-token boundary, so the prefix before it stands)."""
        text, want, start = self.text[b], self.want[b], self.start[b]
        j = max(0, len(want) - 8)
        while j > 0 and not (text[start[j]] in " \t\n" or text[start[j] - 1] == "\n"):
            j -= 1
        c = start[j] if j else 0
        enc = self.dt.encode(text[c:], add_special_tokens=False)
        self.want[b] = want[:j] + enc.ids
        self.start[b] = start[:j] + [c + o[0] for o in enc.offsets]
        self.kept[b] = j
        return self.want[b]

    def _feed(self, b: int, ids: list[int]) -> list[int]:
        """Feed `ids` to row b's draft; returns its greedy continuation: k tokens from a compiled chain (whose
        cache then also holds d_1..d_{k-1}), else the one next token."""
        p, q = len(self.held[b]), len(ids)
        mask = np.zeros((1, 1, q, p + q), np.float32)       # one row, no padding: all the past, causal in the block
        mask[0, 0, :, p:] = _causal(q)
        feeds = {"input_ids": np.array([ids], np.int64), "position_ids": np.arange(p, p + q, dtype=np.int64)[None],
                 "attn_mask": mask}
        if "draft_k" in self.sess.inputs:      # a draft_loop chain: k of them
            feeds["draft_k"] = np.array(self.k, np.int64)
        out, self.cache[b] = self.sess.run(feeds, self.cache[b])
        if "proposals" in out:          # k of them, fewer where the chain stopped at an unsure one
            props = [int(t) for t in out["proposals"][0]]
            self.held[b].extend(ids + props[:-1])
            return props
        self.held[b].extend(ids)
        return [int(out["next_token"][0])]

    def _row(self, b: int) -> list[int]:
        self._update_text(b)
        want = self._encode(b)
        if not want or len(want) + self.k > self.dmax:
            return []
        held = self.held[b]
        n = min(len(held), len(want) - 1)                    # feed at least one token: its logits give d1
        # held is the previous step's encoding (and proposals); want[:kept] is unchanged from it
        p = min(self.kept[b], n)
        while p < n and held[p] == want[p]:
            p += 1
        if p < len(held):
            self.cache[b] = self.sess.commit(self.cache[b], p, np.array([p]), 0)
            del held[p:]
        props = self._feed(b, want[p:])
        while len(props) < self.k and "proposals" not in self.sess.outputs:      # one-token draft steps
            props += self._feed(b, [props[-1]])
        # the proposals' text, decoded in context (byte-level merges and leading spaces depend on it): behind the
        # last few tokens, whose text is the committed text from their offset on (no decode), or behind the whole
        # row where that does not hold up (a character split there)
        new = None
        for ctx, base in ((want[-4:], self.text[b][self.start[b][-4]:] if len(want) >= 4 else None), (want, None)):
            base = self.dt.decode(ctx, skip_special_tokens=False) if base is None else base
            full = self.dt.decode(ctx + props, skip_special_tokens=False)
            if full.startswith(base) and not base.endswith("\ufffd"):
                new = full[len(base):]
                break
        if new is None:
            new = self.dt.decode(props, skip_special_tokens=False)
        tail = self.seqs[b][-self.LOOKBEHIND:]
        enc = self.tt.encode(self.tt.decode(tail, skip_special_tokens=False) + new, add_special_tokens=False).ids
        return enc[len(tail):] if enc[:len(tail)] == tail else self.tt.encode(new, add_special_tokens=False).ids

    def propose(self) -> np.ndarray:
        """[B, 1, n]: each row's candidates (at most k), padded to the width."""
        rows = [[] if self.done[b] else [t for t in self._row(b) if t < self.tvocab][:min(self.k, self.room)]
                for b in range(len(self.seqs))]
        self.counts = np.array([len(c) for c in rows])
        cands = np.full((len(rows), 1, self.width or max(1, self.counts.max())), self.pad, np.int64)
        for b, c in enumerate(rows):
            cands[b, 0, :len(c)] = c
        return cands

    def all_accepted(self, m: np.ndarray, active: np.ndarray) -> bool:
        return bool((m[active] >= self.counts[active]).all())

    def accept(self, done: np.ndarray) -> None:
        self.done = done.copy()


def rejection_noise(dec, seed, B: int, K: int, budget: int) -> tuple[NoiseStream, NoiseStream]:
    """Speculative sampling's two independent precomputed streams (drawn in bulk off the critical path): the draft's
    proposals (a fused step's graph takes k uniforms per row; a draft.onnx call one, drawn on the host) and the
    acceptance tests (k tests + the one residual or bonus draw). Every step commits >= 1 token per unfinished row:
    at most `budget` steps."""
    streams = np.random.SeedSequence(dec.manifest["sampling"]["seed"] if seed is None else seed).spawn(2)
    fused = dec.draft_session is None
    return (NoiseStream("uniform", streams[0], (B, K) if fused else (B, 1), total=budget if fused else budget * K),
            NoiseStream("uniform", streams[1], (B, K + 1), total=budget))


def generate_multitoken(dec, rows: list[list[int]], max_new_tokens: int, on_token=None,
                        seed: int | None = None, one_row: bool = True) -> GenerateResult:
    """one_row: a single prompt of fused speculative decoding (greedy or sampled) or greedy uag takes
    speculative_row's leaner loop (same tokens and stats; False forces this one, for the tests that compare them)."""
    st = dec.manifest["strategy"]
    sampled = dec.manifest["sampling"]["kind"] == "sample"
    lookahead = st["kind"] == "lookahead"
    speculative = st["kind"] in ("speculative", "uag")
    ngram = st["kind"] == "ngram"
    ngram_dyn = ngram and not sampled and st["guesses"] == 1      # one guess, its length per step
    adaptive = st.get("k_schedule") == "heuristic"
    if lookahead:
        W, N, G = st["window"], st["ngram"], st["guesses"]
        K, levels_max = N - 1, N - 1
    elif speculative:       # K: the most proposals a step can verify; kk (below): this step's
        W, G, K, levels_max = 0, 1, st["k_max"] if adaptive else st["k"], 0
    elif ngram:
        W, G, K, levels_max = 0, st["guesses"], st["k"], 0
    else:
        W, G, K, levels_max = 0, 1, st["block"], 0
    B = len(rows)
    L = max(len(r) for r in rows)
    # speculative's heuristic k is a step input and greedy uag's candidates a list: near max_seq_len a step's k
    # shrinks to fit (below), so no positions are held back for k_max and the budget is autoregressive's
    shrink_k = adaptive and st["kind"] == "speculative" or st["kind"] == "uag" and not sampled or ngram_dyn
    span = 0 if shrink_k else max(K, W + levels_max - 1 if levels_max else 0)
    budget = min(max_new_tokens, dec.max_seq_len - L - span)
    if budget < 1:
        plus = f" plus the strategy's {span} lookahead positions" if span else ""
        raise ValueError(f"prompt of {L} tokens{plus} leaves no room "
                         f"under target.max_seq_len {dec.max_seq_len}")
    fused_spec = st["kind"] == "speculative" and dec.draft_session is None
    if one_row and B == 1 and (fused_spec or st["kind"] == "uag" and not sampled):
        from .speculative_row import generate_speculative_row
        return generate_speculative_row(dec, rows[0], max_new_tokens, budget, on_token, seed)
    # sampling: rejection sampling against the draft's q (speculative), else the draws are matched against guesses
    rejection = sampled and st["kind"] == "speculative"
    noise = {}
    if rejection:
        noise = dict(zip(("draft", "accept_uniform"), rejection_noise(dec, seed, B, K, budget)))
    elif sampled:   # one uniform per verified depth, shared by the guesses
        noise = {"depth_uniform": NoiseStream("uniform", dec.manifest["sampling"]["seed"] if seed is None else seed,
                                              (B, K + 1), total=budget)}

    # prefill: the x-block is the left-padded prompt
    x_ids = np.full((B, L), dec.pad, np.int64)
    x_valid = np.zeros((B, L), np.int8)
    for b, r in enumerate(rows):
        x_ids[b, L - len(r):] = r
        x_valid[b, L - len(r):] = 1
    x_pos = np.maximum(np.cumsum(x_valid, 1) - 1, 0).astype(np.int64)
    seqs = [list(r) for r in rows]
    drafter = None
    if st["kind"] == "speculative":
        drafter = _Drafter(dec, x_ids, x_valid, x_pos, st["k"], noise.get("draft") if dec.draft_session else None)
    elif st["kind"] == "uag":
        drafter = _XTokDrafter(dec, seqs, st["k"], K if sampled else None)
    fused = isinstance(drafter, _Drafter) and drafter.fused
    pools = [_Pool(G, K) for _ in range(B)] if lookahead else None
    if pools:
        for b, r in enumerate(rows):
            pools[b].add_sequence(r)
    # initial guesses (window level 0 / jacobi block): tokens drawn from the prompt, seeded: repeatable runs (a
    # drafter guesses itself: no generator, whose creation alone costs ~50 us per call)
    window, guess = np.zeros((B, 0, W), np.int64), None
    index = None
    if ngram:
        from .ngram_index import NgramIndex
        index = [NgramIndex(st["min_ngram"], st["max_ngram"], dec.document) for _ in rows]
        for b, r in enumerate(rows):
            index[b].extend(r)
    if drafter is None and not ngram:
        rng = np.random.default_rng(0)
        init = np.stack([rng.choice(np.array(r), size=max(W, K, 1)) for r in rows]).astype(np.int64)
        window = init[:, None, :W] if lookahead and levels_max else window
        guess = init[:, :K]

    seen = None                     # repetition penalty: the tokens of each row so far (prompt + committed)
    if "seen" in dec.session.inputs:
        seen = np.zeros((B, dec.vocab_size), np.float32)
        for b, r in enumerate(rows):
            seen[b, r] = 1.0
    slots = _Slots(B)
    ones = np.ones((B, 1), np.int8)         # the x-block's validity after prefill: one committed token per row
    cache = dec.session.new_cache(B)
    t_draft = 0.0
    out_ids: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    reason = ["max_new_tokens"] * B
    hist: Counter = Counter()
    steps = proposed = 0
    kk = K
    room = K
    t0 = time.perf_counter()
    t_prefill = None
    while True:
        k = x_ids.shape[1]
        past = slots.n
        pos_last = x_pos[:, -1]
        feeds = {}
        if shrink_k:        # this step verifies positions up to pos_last + k: all under max_seq_len
            room = dec.max_seq_len - 1 - int(pos_last.max())
            if isinstance(drafter, _XTokDrafter):
                drafter.room = room
            elif ngram:
                pass
            else:
                drafter.k = min(drafter.k, room)
        if lookahead:
            cands = np.stack([pools[b].candidates(x_ids[b, -1], [x_ids[b, -1]] * K) for b in range(B)])
        elif ngram:
            props = [[] if done[b] else index[b].propose(min(K, room), G) for b in range(B)]
            if ngram_dyn:
                counts = [len(p[0]) if p else 0 for p in props]
                # the penalty's lowering takes no empty candidate: then one stand-in (the last token; verified)
                kk = max(max(counts), int(seen is not None))
                cands = np.repeat(x_ids[:, -1:, None], kk, 2)
                for b, p in enumerate(props):
                    if p:
                        cands[b, 0, :counts[b]] = p[0]
            else:
                counts = [len(p[0]) if p else 0 for p in props]
                cands = np.empty((B, G, K), np.int64)
                for b, p in enumerate(props):
                    for g in range(G):
                        c = p[g] if g < len(p) else (p[0] if p else [])
                        cands[b, g] = c + [int(x_ids[b, -1])] * (K - len(c))
        elif fused:
            feeds.update(drafter.feeds(), x_ids=x_ids)
            kk = drafter.k
            if "draft_k" in dec.session.inputs:
                feeds["draft_k"] = np.array(kk, np.int64)
        elif speculative:
            td = time.perf_counter()
            cands = drafter.propose()
            kk = cands.shape[2]             # unfused speculative: k; uag: as many as the translation gave
            t_draft += time.perf_counter() - td
        else:
            cands = guess[:, None, :]
        if k == 1 and G == 1:       # a decode step: the x token, then its kk successors
            v_pos = x_pos + _arange(kk + 1)
        else:
            v_pos = np.concatenate([x_pos, pos_last[:, None] + np.tile(np.arange(1, kk + 1), G)[None]], 1)
        x_part = None if x_valid is ones else x_valid          # after prefill every row's x token is valid
        feeds.update(verify_position_ids=v_pos, verify_mask=slots.mask(_verify_structure(k, G, kk), x_part))
        if seen is not None:
            feeds["seen"] = seen
        if not fused:
            feeds.update(verify_ids=np.concatenate([x_ids, cands.reshape(B, -1)], 1), candidates=cands)
        if rejection:
            feeds["accept_uniform"] = noise["accept_uniform"].next()
            if fused:
                du = noise["draft"].next()
                feeds.update({f"draft_uniform_{i}": du[:, i] for i in range(K)})
            else:
                feeds["draft_probs"] = np.stack(drafter.q, 1)
        elif sampled:
            feeds["depth_uniform"] = noise["depth_uniform"].next()     # [B, K+1]
        levels = window.shape[1]
        if "lookahead_ids" in dec.session.inputs:
            cols = np.arange(W)
            la_pos = (pos_last[:, None, None] + 1 + cols[None, None, :] + np.arange(levels)[None, :, None])
            feeds.update(lookahead_ids=np.concatenate([x_ids, window.reshape(B, -1)], 1),
                         lookahead_position_ids=np.concatenate([x_pos, la_pos.reshape(B, -1)], 1),
                         lookahead_mask=slots.mask(_lookahead_structure(k, levels, W), x_part))
        out, present = dec.session.run(feeds, cache)
        steps += 1
        if fused:       # kk: the proposals made (a chain with a confidence threshold can stop early)
            cands = out["proposals"][:, None, :]
            kk = cands.shape[2]
        if t_prefill is None:
            t_prefill = time.perf_counter() - t0

        # accept
        alen, chain, best = out["accept_len"], out["accept_tokens"], out["best"]      # int64 [B], [B, K+1], [B]
        m = alen - 1
        slots.append_ones(1) if x_part is None else slots.append(x_valid)
        if speculative or ngram_dyn:     # a rejected proposal's slot stays, masked: no copy of the cache (compacted rarely)
            slots.append_prefix(m, kk)
            idx = slots.compaction()
            cache = present if idx is None else dec.session.select(present, idx)
        else:               # lookahead, jacobi: most of a step's slots are guesses; keep the accepted ones only
            M = int(m.max())
            cache = dec.session.commit(present, past + k, past + k + best * K, M)
            slots.append_prefix(m, M)                           # shorter rows: masked holes

        emitted: list[list[int] | None] = [None] * B
        active = ~done
        # uag: each row's own candidates (a batch step is as wide as its longest row's)
        proposed += int(drafter.counts[active].sum()) if isinstance(drafter, _XTokDrafter) else \
            sum(counts[b] for b in range(B) if active[b]) if ngram else kk * int(active.sum())
        for b in range(B):
            if done[b]:
                continue
            n_acc = int(alen[b])
            hist[n_acc] += 1
            got = []
            for t in chain[b, :n_acc].tolist():
                out_ids[b].append(t)
                got.append(t)
                if t in dec.eos:
                    done[b], reason[b] = True, "eos"
                    break
                if len(out_ids[b]) >= budget:
                    done[b] = True
                    break
            emitted[b] = got
            seqs[b].extend(got)
            if seen is not None:
                seen[b, got] = 1.0
            if pools:
                pools[b].add_sequence(seqs[b], start=len(seqs[b]) - len(got))
            if index:
                index[b].extend(got)
        if on_token:
            for i in range(max(len(e) for e in emitted if e is not None) if any(e for e in emitted) else 0):
                on_token([e[i] if e is not None and i < len(e) else None for e in emitted])
        if done.all():
            break

        # next x-block: the last accepted token of each row
        last = chain[_arange(B), m]
        x_ids = np.where(done, dec.pad, last)[:, None]
        # finished rows stay where they are: their positions must not run past the model's position table
        x_pos = np.where(done, pos_last, pos_last + m + 1)[:, None]
        x_valid = ones
        if lookahead and levels_max:
            la = out["lookahead_tokens"][:, k:].reshape(B, levels, W).astype(np.int64)
            if levels < levels_max:
                window = np.concatenate([window, la[:, -1:, :]], 1)
            else:
                for b in range(B):
                    for j in range(W):
                        pools[b].add(window[b, 0, j], list(window[b, 1:, j]) + [la[b, -1, j]])
                window = np.concatenate([window[:, 1:], la[:, -1:, :]], 1)
        elif isinstance(drafter, _XTokDrafter):
            drafter.accept(done)
        elif speculative:
            cache = drafter.accept(m, last, x_pos[:, 0], cands, cache)
        elif st["kind"] == "jacobi":
            for b in range(B):
                rest = list(chain[b, m[b] + 1:])
                guess[b] = (rest + [rest[-1] if rest else last[b]] * K)[:K]
        if adaptive:    # transformers' heuristic: 2 more after a step that accepted every proposal, else 1 fewer
            drafter.k = min(drafter.k + 2, K) if drafter.all_accepted(m, active) else max(drafter.k - 1, 1)

    for stream in noise.values():
        stream.close()
    for b in range(B):
        if reason[b] == "max_new_tokens" and len(out_ids[b]) < max_new_tokens:
            reason[b] = "max_seq_len"
    elapsed = time.perf_counter() - t0
    new = sum(len(r) for r in out_ids)
    per_row = [len(r) / steps for r in out_ids] if steps else [0.0]
    stats = {
        "steps": steps, "new_tokens": new, "batch": B,
        "tokens_per_step": round(float(np.mean(per_row)), 4),
        "accepted_hist": {str(a): c for a, c in sorted(hist.items())},
        "prefill_s": round(t_prefill or 0.0, 6), "total_s": round(elapsed, 6),
        "tokens_per_s": round(new / max(elapsed, 1e-9), 2), "stop": reason,
    }
    if ngram:
        stats["acceptance_rate"] = round(sum((a - 1) * c for a, c in hist.items()) / max(proposed, 1), 4)
        stats["mean_k"] = round(proposed / max(sum(hist.values()), 1), 3)
    if speculative:
        stats["acceptance_rate"] = round(sum((a - 1) * c for a, c in hist.items()) / max(proposed, 1), 4)
        stats["mean_k"] = round(proposed / max(sum(hist.values()), 1), 3)     # proposals per row and step
        # rejected proposals stay in the caches as masked slots until they make up a third: then one gather
        stats["cache_compactions"] = slots.compactions + getattr(getattr(drafter, "slots", None), "compactions", 0)
        if fused:       # draft and target run in one call: no split of the time
            stats["fused"] = True
        else:
            stats["draft_s"], stats["target_s"] = round(t_draft, 6), round(elapsed - t_draft, 6)
    return GenerateResult(out_ids, None, stats)

"""NoiseStream: the draws do not depend on how they are chunked, `total` caps what is drawn ahead, and a caller
that needs more than `total` still gets fresh draws."""
import numpy as np
import pytest

from dgopt.runtime.noise import NoiseStream


def _take(stream, n):
    out = np.stack([stream.next() for _ in range(n)])
    stream.close()
    return out


@pytest.mark.parametrize("kind", ["uniform", "gumbel"])
def test_chunking_does_not_change_the_sequence(kind):
    ref = _take(NoiseStream(kind, 7, (2, 5)), 300)             # 256-step chunks
    for kw in ({"max_chunk": 3}, {"total": 40}, {"total": 300}, {"total": 1}):
        np.testing.assert_array_equal(_take(NoiseStream(kind, 7, (2, 5), **kw), 300), ref, err_msg=str(kw))


def test_total_caps_what_is_drawn_ahead():
    s = NoiseStream("uniform", 0, (1, 4096), total=96)
    assert s.chunk == 96
    for _ in range(96):
        s.next()
    assert s._next is None                  # nothing was drawn beyond the 96 steps the call can use
    extra = s.next()                        # a miscounting caller still gets a fresh draw
    s.close()
    first = _take(NoiseStream("uniform", 0, (1, 4096)), 97)
    np.testing.assert_array_equal(extra, first[96])

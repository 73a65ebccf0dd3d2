"""nexlab.chapters.ch07: one block's scale candidates, checked against the scale search's fused kernel."""

from __future__ import annotations

import numpy as np
import pytest

from nexlab.chapters import ch07
from nexlab.formats.nvfp4 import nvfp4_tensor_scale


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("weighted", [False, True])
def test_search_picks_the_candidate_of_least_exact_error(seed, weighted):
    """The fused search kernel's code is the candidate whose exact (weighted) squared error, computed
    here block by block through ModelOpt's encoding, is smallest; max picks ModelOpt's map-to-6 code;
    4over6 picks map-to-6 or map-to-4, whichever has the lower unweighted error."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(4, 16) * 0.02).astype(np.float32)
    g = nvfp4_tensor_scale(np.abs(x).max() * rng.uniform(1.0, 4.0))  # the tensor's amax is above this block's
    imp = rng.uniform(0.1, 3.0, 16).astype(np.float32) if weighted else None
    ex = ch07.explain_scale_candidates(x, g, imp)
    err = {r["code"]: r["error"] for r in ex["rows"]}
    assert ex["best"]["max"] == ex["b6"] and ex["b6"] in err and ex["b4"] in err
    assert err[ex["best"]["search"]] == pytest.approx(min(err.values()), rel=1e-6, abs=1e-12)
    if not weighted:
        six, four = err[ex["b6"]], err[ex["b4"]]
        assert ex["best"]["4over6"] == (ex["b4"] if four < six else ex["b6"])
    for r in ex["rows"]:
        assert r["offset"] == r["code"] - ex["b6"] and r["decoded"].shape == (16,)


def test_a_block_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError):
        ch07.explain_scale_candidates(np.ones(15, np.float32), 0.01)

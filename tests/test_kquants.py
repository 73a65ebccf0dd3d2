"""Q8_0 / Q4_K / Q5_K / Q6_K in nexlab.formats.kquants against libggml's C and gguf-py.

Oracle: ``ggml_quantize_chunk`` from llama-cpp-python's libggml-base.so (ctypes, via
nexlab.llamacpp.libggml), called with and without an importance matrix exactly as llama-quantize does;
dequantizers against ggml's ``to_float`` and gguf-py's numpy ``dequantize``. Every comparison is
byte (or bit) equality.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from nexlab.analysis import speed
from nexlab.formats import kquant_search
from nexlab.formats import kquants as kq
from nexlab.llamacpp import libggml as ggml_ref

TYPES = ("Q8_0", "Q4_K", "Q5_K", "Q6_K")


def c_quantize(ggml_type: str, x: np.ndarray, imatrix=None) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    raw = ggml_ref.ggml_quantize_chunk(ggml_type, x, x.shape[0], x.shape[1], imatrix=imatrix)
    return np.frombuffer(raw, dtype=np.uint8).reshape(x.shape[0], -1)


def assert_same_bytes(ggml_type, x, imatrix=None):
    ours = kq.quantize(x, ggml_type, imatrix)
    ref = c_quantize(ggml_type, x, imatrix)
    assert ours.shape == ref.shape
    if not np.array_equal(ours, ref):
        bs = kq.TYPE_SIZES[ggml_type]
        bad = np.nonzero((ours.reshape(-1, bs) != ref.reshape(-1, bs)).any(axis=1))[0]
        raise AssertionError(f"{ggml_type}: {bad.size} of {ours.size // bs} blocks differ from ggml (first {bad[:5]})")


# --------------------------------------------------------------------------- test tensors


def _tensors(rng) -> dict[str, np.ndarray]:
    cols = 512
    t = {}
    t["normal"] = rng.standard_normal((12, cols))
    z = rng.standard_normal((8, cols))
    z[:, ::3] = 0.0
    z[2, 256:] = 0.0  # one whole super-block of zeros
    t["rows_with_zeros"] = z
    t["all_zero_rows"] = np.zeros((3, cols))
    o = rng.standard_normal((8, cols))
    o[:, 5] = 80.0
    o[3, 300] = -1000.0
    o[5, 17] = 1e4
    t["outliers"] = o
    c = np.full((4, cols), 0.37)
    c[1] = -2.5
    c[2, :256] = 1e-3
    t["constant_rows"] = c
    t["tiny"] = rng.standard_normal((6, cols)) * 1e-30
    t["subnormal"] = rng.standard_normal((2, cols)) * 1e-39
    t["huge"] = rng.standard_normal((4, cols)) * 3e4
    t["heavy_tailed"] = rng.standard_t(1.5, (8, cols))
    t["lognormal_mixed"] = rng.standard_normal((8, cols)) * np.exp(rng.standard_normal((8, cols)) * 3)
    t["positive_shifted"] = np.abs(rng.laplace(size=(6, cols))) + 0.25
    t["negative_only"] = -np.abs(rng.standard_normal((4, cols))) - 0.1
    # values on coarse grids: many exact rounding ties in every search
    t["grid_quarters"] = np.round(rng.standard_normal((8, cols)) * 4) / 4
    t["grid_sign_ties"] = rng.choice([-3.0, -1.5, 0.0, 1.5, 3.0], size=(6, cols))
    return {k: v.astype(np.float32) for k, v in t.items()}


def _imatrices(rng, cols: int) -> dict[str, np.ndarray | None]:
    pos = (rng.random(cols) * 3 + 0.01) ** 2
    zeros = pos.copy()
    zeros[rng.random(cols) < 0.4] = 0.0
    sparse = np.where(rng.random(cols) < 0.95, 0.0, rng.random(cols) * 5)
    wide = np.exp(rng.standard_normal(cols) * 4)
    return {
        "none": None,
        "random_positive": pos.astype(np.float32),
        "with_zeros": zeros.astype(np.float32),
        "mostly_zero": sparse.astype(np.float32),
        "all_zero": np.zeros(cols, np.float32),
        "wide_range": wide.astype(np.float32),
    }


TENSORS = _tensors(np.random.default_rng(20261126))
IMATRICES = _imatrices(np.random.default_rng(7), 512)


# --------------------------------------------------------------------------- bit-exact vs ggml


@pytest.mark.parametrize("ggml_type", TYPES)
@pytest.mark.parametrize("case", sorted(TENSORS))
def test_bytes_equal_ggml_without_imatrix(ggml_type, case):
    assert_same_bytes(ggml_type, TENSORS[case])


@pytest.mark.parametrize("ggml_type", ("Q4_K", "Q5_K", "Q6_K"))
@pytest.mark.parametrize("imatrix", [k for k in IMATRICES if k != "none"])
@pytest.mark.parametrize("case", sorted(TENSORS))
def test_bytes_equal_ggml_with_imatrix(ggml_type, imatrix, case):
    assert_same_bytes(ggml_type, TENSORS[case], IMATRICES[imatrix])


def test_q8_0_ties_round_half_away_from_zero_as_roundf():
    # amax 127 -> d = 1 -> every x.5 is an exact tie for roundf
    x = np.tile(np.arange(-15.5, 16.5, 1.0, dtype=np.float32), (4, 2))
    x[:, 0] = 127.0
    x[1, 0] = -127.0
    assert_same_bytes("Q8_0", x)


def test_q8_0_ignores_the_imatrix_like_ggml():
    x = TENSORS["normal"]
    im = IMATRICES["random_positive"]
    assert np.array_equal(kq.quantize(x, "Q8_0", im), kq.quantize(x, "Q8_0"))
    assert_same_bytes("Q8_0", x, im)


@pytest.mark.parametrize("ggml_type", ("Q4_K", "Q5_K", "Q6_K"))
def test_imatrix_changes_the_result(ggml_type):
    # guards against an imatrix silently being dropped on the way to the search
    x = TENSORS["normal"]
    assert not np.array_equal(kq.quantize(x, ggml_type, IMATRICES["wide_range"]), kq.quantize(x, ggml_type))


@pytest.mark.parametrize("ggml_type", TYPES)
def test_bytes_equal_ggml_on_many_random_shapes_and_chunks(ggml_type, monkeypatch):
    # small chunks force the multi-chunk path (rows split across vectorised steps)
    monkeypatch.setattr(kq, "_CHUNK_SUPERBLOCKS", 3)
    monkeypatch.setattr(kq, "_Q8_CHUNK_BLOCKS", 5)
    rng = np.random.default_rng(99)
    for rows, nb in [(1, 1), (7, 1), (3, 5), (10, 2)]:
        x = (rng.standard_normal((rows, 256 * nb)) * rng.uniform(0.01, 10)).astype(np.float32)
        assert_same_bytes(ggml_type, x)
        if ggml_type != "Q8_0":
            assert_same_bytes(ggml_type, x, (rng.random(256 * nb) ** 3).astype(np.float32))


def test_weight_like_tensor_large():
    # a weight-shaped tensor (row scales vary, some dead columns), the size of a small projection
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 2048)) * rng.uniform(0.005, 0.05, (64, 1))
    x[:, rng.random(2048) < 0.01] = 0.0
    x = x.astype(np.float32)
    im = (rng.gamma(0.5, 2.0, 2048) * 1e-3).astype(np.float32)
    for t in TYPES:
        assert_same_bytes(t, x)
    for t in ("Q4_K", "Q5_K", "Q6_K"):
        assert_same_bytes(t, x, im)


def test_input_dtypes_and_shapes_are_accepted_like_float32_rows():
    rng = np.random.default_rng(5)
    x3 = rng.standard_normal((2, 3, 256)).astype(np.float16)
    ref = c_quantize("Q4_K", x3.astype(np.float32).reshape(6, 256))
    assert np.array_equal(kq.quantize(x3, "Q4_K"), ref)
    x1 = rng.standard_normal(512).astype(np.float64)
    assert np.array_equal(kq.quantize(x1, "q6_k"), c_quantize("Q6_K", x1.astype(np.float32)[None]))


# --------------------------------------------------------------------------- internals


def test_axis0_reduction_adds_in_index_order():
    # kquants relies on np.add.reduce(axis=0) of a C-contiguous [n, M] float32 array being
    # s = a[0] + a[1] + ... in order (ggml's loops). Cancellation-heavy data exposes any other order.
    rng = np.random.default_rng(11)
    for M in (2, 3, 16, 1000, 9000):
        a = (rng.standard_normal((32, M)) * np.exp(rng.standard_normal((32, M)) * 6)).astype(np.float32)
        s = a[0].copy()
        for k in range(1, 32):
            s = (s + a[k]).astype(np.float32)
        assert np.array_equal(kquant_search.seqsum(a), s)
    col = np.ascontiguousarray(a[:, :1])
    s = col[0].copy()
    for k in range(1, 32):
        s = s + col[k]
    assert np.array_equal(kquant_search.seqsum(col), s)


def test_nearest_int_is_round_half_even_in_range():
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 4194303.0, -4194303.0, 0.49999997, 1e-30, -7.5], np.float32)
    assert np.array_equal(kquant_search.nearest_int(v), np.rint(v).astype(np.int32))


# --------------------------------------------------------------------------- dequantization


_GGUF_TYPES = {
    "Q8_0": GGMLQuantizationType.Q8_0,
    "Q4_K": GGMLQuantizationType.Q4_K,
    "Q5_K": GGMLQuantizationType.Q5_K,
    "Q6_K": GGMLQuantizationType.Q6_K,
}


@pytest.mark.parametrize("ggml_type", TYPES)
def test_dequantize_bit_equal_to_ggml_and_gguf_py(ggml_type):
    x = np.concatenate([TENSORS["normal"], TENSORS["outliers"], TENSORS["all_zero_rows"]])
    q = c_quantize(ggml_type, x, None)
    ours = kq.dequantize(q, ggml_type)
    c = ggml_ref.ggml_dequantize(ggml_type, q.reshape(-1), x.size).reshape(x.shape)
    assert np.array_equal(ours.view(np.uint32), c.view(np.uint32))
    g = gguf_quants.dequantize(q, _GGUF_TYPES[ggml_type]).astype(np.float32)
    assert np.array_equal(ours, g)


@pytest.mark.parametrize("ggml_type", TYPES)
def test_round_trip_error_is_small(ggml_type):
    # SQNR floors for N(0,1) data (Q8_0 ~ 40 dB, Q6_K ~ 30, Q5_K ~ 24, Q4_K ~ 18)
    floors = {"Q8_0": 38.0, "Q6_K": 28.0, "Q5_K": 22.0, "Q4_K": 16.0}
    x = TENSORS["normal"]
    y = kq.dequantize(kq.quantize(x, ggml_type), ggml_type, x.shape[1])
    sqnr = 10 * np.log10(np.sum(x.astype(np.float64) ** 2) / np.sum((x - y).astype(np.float64) ** 2))
    assert sqnr > floors[ggml_type]


def test_dequantize_flat_bytes_with_n_per_row():
    x = TENSORS["normal"][:4]
    q = kq.quantize(x, "Q4_K")
    assert np.array_equal(kq.dequantize(q.reshape(-1), "Q4_K", n_per_row=512), kq.dequantize(q, "Q4_K"))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("ggml_type,cols", [("Q4_K", 128), ("Q5_K", 300), ("Q6_K", 2048 + 32), ("Q8_0", 48)])
def test_row_length_not_multiple_of_block_raises(ggml_type, cols):
    with pytest.raises(ValueError, match="not a multiple"):
        kq.quantize(np.ones((2, cols), np.float32), ggml_type, name="blk.0.attn_q.weight")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("ggml_type", TYPES)
def test_non_finite_input_raises_naming_the_tensor(ggml_type, bad):
    x = np.ones((2, 256), np.float32)
    x[1, 7] = bad
    with pytest.raises(ValueError, match="blk.3.ffn_up.weight.*non-finite"):
        kq.quantize(x, ggml_type, name="blk.3.ffn_up.weight")


def test_imatrix_problems_raise():
    x = np.ones((2, 512), np.float32)
    with pytest.raises(ValueError, match="imatrix has 256 values but rows have 512"):
        kq.quantize(x, "Q4_K", np.ones(256, np.float32), name="w")
    im = np.ones(512, np.float32)
    im[3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        kq.quantize(x, "Q6_K", im)
    with pytest.raises(ValueError, match="negative"):
        kq.quantize(x, "Q5_K", -np.ones(512, np.float32))


def test_bad_type_and_dtype_raise():
    with pytest.raises(ValueError, match="unknown quantization type"):
        kq.quantize(np.ones((1, 256), np.float32), "Q3_K")
    with pytest.raises(TypeError, match="floating-point"):
        kq.quantize(np.ones((1, 256), np.int32), "Q4_K")
    with pytest.raises(TypeError, match="uint8"):
        kq.dequantize(np.ones((1, 144), np.int8), "Q4_K")


# --------------------------------------------------------------------------- real weights


def _real_weight_matrices(limit: int = 6):
    """A few 2-D weights of the trained tiny checkpoint (float32): the notebooks' build/artifacts (or
    $NEXLAB_ARTIFACTS) when there, else built here by nexlab.artifacts.tiny.ensure_tiny (smoke mode, seconds).

    Chosen from the safetensors headers (nexlab.model.checkpoint.Checkpoint) before anything is read."""
    from nexlab.artifacts.tiny import ensure_tiny
    from nexlab.model.checkpoint import Checkpoint

    ckpt = ensure_tiny(smoke=True)["bf16"]

    with Checkpoint(ckpt) as ck:
        keys = [k for k, e in sorted(ck.stored.items())
                if len(e.shape) == 2 and e.shape[0] > 1 and e.shape[1] % 256 == 0]
        return [(k, ck.load_stored(k).to(torch.float32).numpy()) for k in keys[:limit]]


def test_bytes_equal_ggml_on_real_checkpoint_weights():
    mats = _real_weight_matrices()
    assert mats, "the tiny checkpoint has no 2-D weight with a multiple of 256 columns"
    rng = np.random.default_rng(8)
    for name, w in mats:
        im = (rng.gamma(0.7, 1.0, w.shape[1]) * 1e-2).astype(np.float32)
        for t in TYPES:
            assert_same_bytes(t, w)
        for t in ("Q4_K", "Q5_K", "Q6_K"):
            assert_same_bytes(t, w, im)


def test_benchmark_ratio_is_nexlab_time_over_ggml_time():
    """The workbook's one benchmark convention (README): time nexlab / time C, below 1 = nexlab faster."""
    res = speed.kquant_speed_vs_ggml(shape=(4, 256), cases=(("Q8_0", False), ("Q4_K", True)), repeats=1)
    assert sorted(res) == ["Q4_K+imatrix", "Q8_0"]
    for case, v in res.items():
        assert v["time_ratio"] == pytest.approx(v["nexlab_s"] / v["ggml_s"], rel=1e-12), case
        assert [k for k in v if "ratio" in k] == ["time_ratio"] and v["bytes_equal"], case


def test_block_sizes_and_type_ids_from_gguf_py_equal_libggml_traits():
    """nexlab's one table of block sizes (gguf-py's GGML_QUANT_SIZES) and of type ids (gguf-py's
    GGMLQuantizationType) against ggml_get_type_traits of the libggml llama.cpp runs."""
    for t in kq.QUANT_TYPES:
        tr = ggml_ref.type_traits(kq.GGML_TYPE_IDS[t])
        assert tr["name"].upper() == t and (tr["blck_size"], tr["type_size"]) == (kq.BLOCK_SIZES[t], kq.TYPE_SIZES[t])
    checked = 0
    for name, i in ggml_ref.GGML_TYPES.items():
        if i >= ggml_ref._GGML_TYPE_COUNT:
            continue
        tr = ggml_ref.type_traits(i)
        if tr["name"]:  # removed types (Q4_2, ...) keep an empty slot
            assert tr["name"].upper() == name.upper(), (name, i, tr["name"])
            checked += 1
    assert checked >= 30

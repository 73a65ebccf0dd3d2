"""nexlab.ggufio.regions against the real readers and quantizers: GGUF offsets against gguf-py's GGUFReader,
the Q4_K block decoder against libggml's and gguf-py's dequantizers, and the per-tensor imatrix gain
against the file nexlab writes (itself byte-equal to llama-quantize, tests/test_variants.py)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader
from gguf import quants as GQ
from gguf.constants import GGMLQuantizationType

from nexlab.chapters import ch04 as A
from nexlab.formats import kquants
from nexlab.ggufio import imatrix_file as IM
from nexlab.ggufio import regions
from nexlab.llamacpp import libggml as ggml_ref


@pytest.fixture(scope="module")
def nvfp4_file(nexlab_gguf):
    return nexlab_gguf("nvfp4")


def test_every_region_offset_equals_gguf_readers(nvfp4_file):
    lay = regions.gguf_regions(nvfp4_file)
    r = GGUFReader(str(nvfp4_file))
    kv = {x.detail["key"]: x.start for x in lay["regions"] if x.kind == "kv"}
    fields = {k: f.offset for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert kv == fields
    infos = {x.detail["name"]: x.start for x in lay["regions"] if x.kind == "tensor_info"}
    assert infos == {t.name: t.field.offset for t in r.tensors}
    data = {x.detail["name"]: (x.start, x.nbytes) for x in lay["regions"] if x.kind == "data"}
    assert data == {t.name: (t.data_offset, int(t.n_bytes)) for t in r.tensors}
    assert lay["data_offset"] == r.data_offset and lay["n_tensors"] == len(r.tensors)
    assert lay["version"] == 3 and lay["alignment"] == r.alignment


def test_regions_cover_the_file_and_padding_is_zero(nvfp4_file):
    lay = regions.gguf_regions(nvfp4_file)
    regs = lay["regions"]
    assert regs[0].start == 0 and regs[-1].end == lay["file_bytes"] == nvfp4_file.stat().st_size
    assert all(a.end == b.start for a, b in zip(regs, regs[1:]))
    raw = nvfp4_file.read_bytes()
    pads = [x for x in regs if x.kind == "padding"]
    assert pads and all(raw[x.start:x.end] == bytes(x.nbytes) for x in pads)
    assert all(x.start % lay["alignment"] == 0 for x in regs if x.kind == "data")


def test_tensor_location_points_at_the_tensor_bytes(nvfp4_file):
    lay = regions.gguf_regions(nvfp4_file)
    r = GGUFReader(str(nvfp4_file))
    t = next(t for t in r.tensors if t.name.endswith("ffn_gate_exps.weight"))
    loc = regions.tensor_location(lay, t.name)
    raw = nvfp4_file.read_bytes()
    assert raw[loc["start"]:loc["end"]] == np.asarray(t.data).tobytes()
    assert loc["ggml_type"] == GGMLQuantizationType.NVFP4
    with pytest.raises(KeyError, match="no tensor named"):
        regions.tensor_location(lay, "nope.weight")


def test_hexdump_starts_with_the_magic_and_names_the_fields(nvfp4_file):
    lay = regions.gguf_regions(nvfp4_file)
    text = regions.hexdump(nvfp4_file, 0, 32, lay["regions"])
    first = text.splitlines()[0]
    assert first.startswith("00000000  47 47 55 46 03 00 00 00") and "|GGUF" in first
    assert "magic 'GGUF'" in first and "tensor count" in first


def test_not_a_gguf_is_named(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGML" + bytes(40))
    with pytest.raises(ValueError, match="not a GGUF file"):
        regions.gguf_regions(p)


@pytest.mark.parametrize("with_imatrix", [False, True])
def test_q4_k_block_decoder_equals_libggml_and_gguf_py(with_imatrix):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 512)) * np.linspace(0.1, 3, 512)).astype(np.float32)
    w = rng.uniform(0.01, 10, 512).astype(np.float32) if with_imatrix else None
    data = np.frombuffer(ggml_ref.ggml_quantize_chunk("Q4_K", x, 4, 512, w), dtype=np.uint8)
    ours = np.concatenate([A.decode_q4_k_block(b)["values"] for b in data.reshape(-1, 144)])
    np.testing.assert_array_equal(ours, ggml_ref.ggml_dequantize("Q4_K", data, x.size))
    np.testing.assert_array_equal(ours, GQ.dequantize(data.reshape(4, -1), GGMLQuantizationType.Q4_K).reshape(-1))


def test_q4_k_scale_unpacking_covers_every_six_bit_value():
    ls = np.arange(64, dtype=np.uint8).reshape(8, 8)          # [sub-block, block]: 64 distinct scales
    lm = (63 - np.arange(64, dtype=np.uint8)).reshape(8, 8)   # and mins
    packed = kquants._pack_scales_k4(ls, lm).T                # ggml's packing, [block, 12]
    for blk in range(8):
        b = np.zeros(144, np.uint8)
        b[4:16] = packed[blk]
        f = A.decode_q4_k_block(b)
        assert f["scales"] == ls[:, blk].tolist() and f["mins"] == lm[:, blk].tolist()


def test_q4_k_code_nibbles_in_value_order():
    b = np.zeros(144, np.uint8)
    b[0:2] = np.array([1.0], np.float16).view(np.uint8)
    b[4:8] = 1                         # scales 0..3 = 1, the rest 0
    b[16] = 0x5A                       # byte 0: value 0 (low nibble) = 10, value 32 (high nibble) = 5
    f = A.decode_q4_k_block(b)
    assert f["q"][0] == 10 and f["q"][32] == 5 and f["values"][0] == 10.0 and f["values"][32] == 5.0
    assert A.q4_k_byte_fields().tolist()[:17] == [0, 0, 1, 1] + [2] * 12 + [3]


def test_weighted_error_definition():
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    y = x + np.array([[0.1, 0.0], [0.0, 0.2]])
    assert A.weighted_error(x, y) == pytest.approx((0.01 + 0.04) / 30)
    assert A.weighted_error(x, y, np.array([2.0, 1.0])) == pytest.approx((0.02 + 0.04) / (2 + 4 + 18 + 16))


def test_imatrix_gain_matches_the_file_nexlab_writes(tiny, nvfp4_file, tmp_path):
    """The with-imatrix error of each tensor equals the error of that tensor in nexlab's
    NVFP4-Q4_K_M file written with the same imatrix (byte-equal to llama-quantize)."""
    from nexlab.convert.text import convert_checkpoint

    r = GGUFReader(str(nvfp4_file))
    rng = np.random.default_rng(1)
    entries = {}
    for t in r.tensors:
        if t.name.endswith(".weight") and len(t.shape) >= 2 and "norm" not in t.name:
            ne0 = int(t.shape[0])
            n_mat = int(t.shape[2]) if len(t.shape) > 2 else 1
            entries[t.name] = IM.ImatrixEntry(rng.lognormal(0, 1.5, (n_mat, ne0)).astype(np.float32) * 10,
                                              np.full(n_mat, 10, np.float32))
    im = IM.Imatrix(entries, ["synthetic"], 1, 16)
    rows = A.imatrix_gain(nvfp4_file, im, "q4_k_m")
    assert rows and {x["type"] for x in rows} <= {"Q4_K", "Q6_K"}
    assert not any("_exps" in x["name"] for x in rows)  # NVFP4 experts are kept
    imf = IM.write_imatrix(tmp_path / "im.gguf", im)
    q = tmp_path / "q4km.gguf"
    convert_checkpoint(tiny["nvfp4"], q, variant="q4_k_m", imatrix=imf, show_progress=False)
    src = {t.name: t for t in r.tensors}
    dst = {t.name: t for t in GGUFReader(str(q)).tensors}
    weights = IM.quantize_weights(im)
    for row in rows:
        t = dst[row["name"]]
        assert t.tensor_type.name == row["type"]
        y = GQ.dequantize(np.asarray(t.data), t.tensor_type).reshape(-1, int(t.shape[0]))
        x = A.tensor_f32(src[row["name"]]).reshape(-1, int(t.shape[0]))
        assert A.weighted_error(x, y, weights[row["name"]]) == pytest.approx(row["err_imatrix"], rel=1e-9)
    # with weights spread over three orders of magnitude the weighted search must help on average
    assert np.mean([x["reduction"] for x in rows]) > 0.05
    # measured with other weights (unrelated to the ones that steered the search) the gain vanishes on average
    other = IM.Imatrix({k: IM.ImatrixEntry(rng.lognormal(0, 1.5, e.in_sum2.shape).astype(np.float32), e.counts)
                        for k, e in entries.items()}, ["other"], 1, 16)
    rows_other = A.imatrix_gain(nvfp4_file, im, "q4_k_m", eval_imatrix=other)
    assert [x["err_plain"] for x in rows_other] != [x["err_plain"] for x in rows]
    assert np.mean([x["reduction"] for x in rows_other]) < np.mean([x["reduction"] for x in rows]) - 0.05

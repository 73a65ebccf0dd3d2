"""The vision tower as an mmproj GGUF (nexlab.convert.mmproj).

References: llama.cpp's own converter (``convert_hf_to_gguf.py --mmproj --outtype T`` of the tree
llama-cpp-python 0.3.36 vendors, through nexlab.llamacpp.source.run_reference_converter): tensors, types,
shapes, bytes, order and every clip.* key equal; llama.cpp's multimodal tool ``llama-mtmd-cli`` and
libmtmd (llama-cpp-python's ``mtmd_cpp`` bindings) load the file; transformers'
``Qwen3_5MoeVisionModel`` gives the reference image embeddings; transformers on the meta device
gives the vision tower's names and shapes; gguf-py packs the predicted header.
"""

from __future__ import annotations

import json
import shutil

import pytest

from nexlab.analysis import mtmd
from nexlab.artifacts import tiny_vl
from nexlab.artifacts.checkpoints import checkpoint_index
from nexlab.chapters import ch03
from nexlab.cli import main as nexlab_main
from nexlab.convert import mmproj
from nexlab.convert.text import convert_checkpoint
from nexlab.ggufio.inspector import diff_gguf
from nexlab.llamacpp.source import run_reference_converter
from nexlab.model import vision as MP
from nexlab.model.checkpoint import Checkpoint
from nexlab.model.config import real_config

# general.* free-text fields each converter fills its own way (diff_gguf compares every other key)
DESCRIPTIVE = ("general.name", "general.license", "general.quantized_by")


@pytest.fixture(scope="module")
def vl():
    return tiny_vl.ensure_tiny_vl(smoke=True)


@pytest.fixture(scope="module")
def files(vl, tmp_path_factory):
    """nexlab's and llama.cpp's mmproj of the tiny VL checkpoint, per type, and the text GGUF."""
    root = tmp_path_factory.mktemp("mmproj")
    cache: dict = {}

    def get(dtype: str):
        if dtype not in cache:
            ours, ref = root / f"nexlab-{dtype}.gguf", root / f"llamacpp-{dtype}.gguf"
            mmproj.convert_mmproj(vl["ckpt"], ours, dtype, show_progress=False)
            run_reference_converter(vl["ckpt"], ref, mmproj=dtype)
            cache[dtype] = (ours, ref)
        return cache[dtype]

    text = root / "text-bf16.gguf"
    convert_checkpoint(vl["ckpt"], text, show_progress=False)
    get.text = text
    return get


def _order(path):
    from gguf import GGUFReader

    r = GGUFReader(path)
    return [t.name for t in r.tensors], [k for k in r.fields if not k.startswith(("GGUF.",) + DESCRIPTIVE)]


@pytest.mark.parametrize("dtype", MP.DTYPES)
def test_mmproj_equals_llamacpp_converter(files, dtype):
    """Every tensor (name, type, shape, bytes) and every key (value and type) as llama.cpp's
    converter writes them with --mmproj --outtype DTYPE, in the same order."""
    ours, ref = files(dtype)
    assert diff_gguf(ours, ref, skip_key_prefixes=DESCRIPTIVE) == []
    assert _order(ours) == _order(ref)


def test_diff_catches_a_changed_tensor(files, tmp_path):
    ours, ref = files("f16")
    bad = tmp_path / "bad.gguf"
    shutil.copy(ours, bad)
    from gguf import GGUFReader

    t = next(t for t in GGUFReader(bad).tensors if t.name == "mm.0.bias")
    with open(bad, "r+b") as f:
        f.seek(int(t.data_offset))
        f.write(b"\x00\x00\x80\x7f")  # one float becomes +inf
    assert diff_gguf(bad, ref, skip_key_prefixes=DESCRIPTIVE) == ["tensor mm.0.bias: data differs (2 of 2048 bytes)"]


@pytest.mark.parametrize("dtype", MP.DTYPES)
def test_predicted_size_is_the_written_size(vl, files, dtype):
    """The plan of the checkpoint and the plan of its config alone give the written file's size."""
    ours, _ = files(dtype)
    with Checkpoint(vl["ckpt"]) as ck:
        assert mmproj.plan_mmproj(ck, dtype).file_nbytes == ours.stat().st_size
        cfg = ck.raw_config
    assert mmproj.mmproj_file_nbytes(cfg, dtype, name=vl["ckpt"].name) == ours.stat().st_size


def test_vision_tensor_names_and_shapes_match_transformers(vl):
    """expected_vision_tensors is what transformers' Qwen3_5MoeForConditionalGeneration holds under
    model.visual.*, for the tiny VL tower and Nex-N2-mini's."""
    from nexlab.artifacts.synth import meta_state_dict_shapes

    for cfg in (json.loads((vl["ckpt"] / "config.json").read_text()), real_config()):
        meta = {k: tuple(v) for k, v in meta_state_dict_shapes(cfg).items() if k.startswith("model.visual.")}
        assert MP.expected_vision_tensors(cfg["vision_config"]) == meta


def test_tiny_vl_is_derived_from_the_tiny_text_model_and_deterministic(vl):
    with Checkpoint(vl["text"]) as t, Checkpoint(vl["ckpt"]) as v:
        text_keys = [k for k in t.stored if not k.startswith(MP.VISUAL_PREFIXES)]
        assert sorted(text_keys) == sorted(k for k in v.stored if not k.startswith(MP.VISUAL_PREFIXES))
        for k in text_keys:
            assert t.load_stored(k).equal(v.load_stored(k)), k
        cfg = v.raw_config
        visual = {k: v.load_stored(k) for k in v.stored if k.startswith(MP.VISUAL_PREFIXES)}
    assert cfg["vision_config"] == tiny_vl.TINY_VL_VISION
    again = tiny_vl.random_vision_tensors(cfg, seed=0)
    assert sorted(again) == sorted(visual) and all(again[k].equal(visual[k]) for k in visual)
    other = tiny_vl.random_vision_tensors(cfg, seed=1)
    assert not all(other[k].equal(visual[k]) for k in visual)
    assert len(set(checkpoint_index(vl["ckpt"]).values())) >= 2


def test_llama_mtmd_cli_runs_with_the_tiny_text_gguf_and_the_mmproj(files, tmp_path):
    """llama.cpp's multimodal tool loads both files, encodes a generated image, and generates."""
    ours, _ = files("f16")
    png = tiny_vl.save_png(tiny_vl.make_test_image(128, 96, seed=0), tmp_path / "image.png")
    run = mtmd.run_mtmd_cli(files.text, ours, png, n_predict=4)
    assert run.returncode == 0
    assert "mtmd batch encoding done" in run.log or "image slice encoded" in run.log, run.log[-2000:]
    assert "clip.projector_type" not in run.output


@pytest.mark.parametrize("dtype,bound", [("f16", 5e-3), ("f32", 5e-3), ("bf16", 1e-2)])
def test_llamacpp_image_embeddings_match_transformers(vl, files, dtype, bound):
    """The 12 image tokens libmtmd computes from the mmproj equal transformers' vision tower output
    (pooler_output, float32) on the same pixels within ``bound`` relative error (measured on the tiny
    tower: f16 9.0e-4, f32 8.7e-4, bf16 3.5e-3; llama.cpp computes in F16/F32 kernels, transformers
    in float32). A different image gives a large error, so the comparison can fail."""
    ours, _ = files(dtype)
    img = tiny_vl.make_test_image(128, 96, seed=0)
    ref = mtmd.transformers_image_embeddings(vl["ckpt"], img)
    got = mtmd.llamacpp_image_embeddings(ours, files.text, img)
    assert got.shape == ref.shape == (12, 256)
    err = mtmd.relative_error(got, ref)
    assert err < bound, err
    other = mtmd.transformers_image_embeddings(vl["ckpt"], tiny_vl.make_test_image(128, 96, seed=1))
    assert mtmd.relative_error(got, other) > 10 * err  # only the noise differs: still 0.25


def test_seed_mmproj_size_from_the_exact_plan():
    """The seed's 903 MB is the converter's bf16 plan of Nex-N2-mini (F32 patch embedding), its f16
    plan is smaller by exactly the F16 patch-embedding bytes; the memory tables and nexlab.model.vision
    use the same plan."""
    from nexlab.analysis import memory as M
    from nexlab.convert.mmproj import mmproj_size
    from nexlab.model import hparams as Q

    s = ch03.explain_seed_size()
    assert round(s["bf16_file"] / 1e6) == MP.SEED_MMPROJ_MB
    assert s["bf16_minus_f16"] == s["patch_embedding_f32_extra"] > 0
    assert s["f16_file"] == s["f16_tensors"] + s["f16_header"]
    assert sum(s["breakdown_f16"].values()) == s["f16_file"]
    v = Q.nex_n2_mini().vision
    assert mmproj_size(v, "f16") == s["f16_file"] and mmproj_size(v, "bf16") == s["bf16_file"]
    assert M.estimate("nex-n2-mini", "q4_k_m", 4096, mmproj_bytes=None).mmproj_bytes == s["bf16_file"]


def _damaged(vl, tmp_path, **vision_changes):
    d = tmp_path / "ckpt"
    shutil.copytree(vl["ckpt"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["vision_config"].update(vision_changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("change,message", [
    ({"intermediate_size": 512},
     r"tensor 'model.visual.blocks.0.mlp.linear_fc1.bias' has shape \[256\], the vision config needs \[512\]"),
    ({"depth": 3}, r"vision tensor 'model.visual.blocks.2.\S+' is missing"),
    ({"depth": 1}, r"tensor 'model.visual.blocks.1.\S+' has no place in the mmproj"),
    ({"temporal_patch_size": 1}, r"temporal_patch_size is 1"),
])
def test_bad_checkpoints_are_refused_by_name_and_leave_no_file(vl, tmp_path, change, message):
    d = _damaged(vl, tmp_path, **change)
    out = tmp_path / "out.gguf"
    with pytest.raises(ValueError, match=message):
        mmproj.convert_mmproj(d, out, show_progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out.gguf*"))


def test_missing_preprocessor_config_or_vision_config_is_refused(vl, tmp_path):
    d = _damaged(vl, tmp_path)
    (d / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match="image_mean"):
        mmproj.convert_mmproj(d, tmp_path / "x.gguf", show_progress=False)
    with pytest.raises(ValueError, match="no vision_config"):
        MP.vision_config({"text_config": {}})


def test_cli_convert_mmproj_and_inspect(vl, files, tmp_path, capsys):
    out = tmp_path / "mmproj-F16.gguf"
    assert nexlab_main(["convert", str(vl["ckpt"]), "--mmproj", "-o", str(out), "-q"]) == 0
    assert "mmproj" in capsys.readouterr().out
    assert out.read_bytes() == files("f16")[0].read_bytes()
    assert nexlab_main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "qwen3vl_merger" in text and "v.patch_embd.weight.1" in text


def test_mmproj_of_a_modelopt_nvfp4_checkpoint_equals_llamacpp_converter(tmp_path):
    """From a ModelOpt NVFP4 checkpoint (the published layout: ``nexlab synth tiny``), llama.cpp's converter
    stamps the mmproj with general.file_type MOSTLY_NVFP4 although its tensors are F16; nexlab writes the
    same file."""
    from gguf import GGUFReader, LlamaFileType

    from nexlab.artifacts.synth import write_synth
    from nexlab.ggufio.inspector import diff_gguf

    ckpt = tmp_path / "synth"
    write_synth("tiny", ckpt, show_progress=False)
    ours, ref = tmp_path / "nexlab.gguf", tmp_path / "llamacpp.gguf"
    mmproj.convert_mmproj(ckpt, ours, "f16", show_progress=False)
    run_reference_converter(ckpt, ref, mmproj="f16")
    assert diff_gguf(ours, ref, skip_key_prefixes=DESCRIPTIVE) == []
    ft = GGUFReader(ours).fields["general.file_type"].contents()
    assert ft == LlamaFileType.MOSTLY_NVFP4

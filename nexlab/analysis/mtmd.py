"""Image embeddings of the vision tower, from transformers and from llama.cpp: the mmproj's proof.

- :func:`transformers_image_embeddings`: the reference, transformers' ``Qwen3_5MoeVisionModel``
  (:func:`load_vision_tower`, weights read through :class:`nexlab.model.checkpoint.Checkpoint`) on
  the pixels of Qwen2-VL's image processor (:func:`hf_pixel_values`), after the merger;
- :func:`llamacpp_image_embeddings`: the image tokens llama.cpp computes from an mmproj GGUF with
  libmtmd (llama-cpp-python's ``mtmd_cpp`` bindings: ``mtmd_tokenize``, ``mtmd_encode_chunk``);
- :func:`relative_error` compares them; :func:`run_mtmd_cli` runs ``llama-mtmd-cli`` on a text GGUF,
  an mmproj and an image (the multimodal tool end to end).

The mmproj is written by :mod:`nexlab.convert.mmproj`; the tiny vision-language checkpoint and the
test image come from :mod:`nexlab.artifacts.tiny_vl`.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nexlab.core.errors import NexlabError, ToolError
from nexlab.llamacpp.build import tool_path
from nexlab.llamacpp.runtime import open_model
from nexlab.model.checkpoint import Checkpoint
from nexlab.model.vision import VISUAL_PREFIXES, preprocessor_config, vision_config


def load_vision_tower(ckpt_dir: str | os.PathLike, dtype=None):
    """transformers' ``Qwen3_5MoeVisionModel`` of a checkpoint (float32 by default), its weights
    read through :class:`nexlab.model.checkpoint.Checkpoint` (no pickle, no text model built)."""
    import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)
    from transformers import Qwen3_5MoeConfig  # noqa: PLC0415  (transformers is heavy: only the reference model needs it)
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeVisionModel  # noqa: PLC0415  (transformers is heavy: only the reference model needs it)


    d = Path(ckpt_dir)
    cfg = Qwen3_5MoeConfig(**json.loads((d / "config.json").read_text()))
    model = Qwen3_5MoeVisionModel._from_config(cfg.vision_config, dtype=dtype or torch.float32)
    with Checkpoint(d) as ck:
        sd = {}
        for key in ck.stored:
            for pre in VISUAL_PREFIXES:
                if key.startswith(pre):
                    sd[key[len(pre):]] = ck.load_stored(key).to(dtype or torch.float32)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise NexlabError(f"{d}: vision tower tensors missing {missing[:3]} / unexpected {unexpected[:3]}")
    return model.eval()


def hf_pixel_values(image: np.ndarray, preproc: dict, vision: dict):
    """``pixel_values`` and ``image_grid_thw`` of transformers' Qwen2-VL image processor (the PIL
    backend) for ``image``, without resizing (see :func:`nexlab.artifacts.tiny_vl.make_test_image`)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: PLC0415  (transformers is heavy: only the reference model needs it)

    proc = Qwen2VLImageProcessorPil(image_mean=preproc["image_mean"], image_std=preproc["image_std"],
                                    patch_size=int(vision["patch_size"]),
                                    temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
                                    merge_size=int(vision.get("spatial_merge_size", 2)))
    out = proc(images=[image], do_resize=False, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def transformers_image_embeddings(ckpt_dir: str | os.PathLike, image: np.ndarray) -> np.ndarray:
    """The image tokens transformers' vision tower gives the text model: ``pooler_output`` of
    ``Qwen3_5MoeVisionModel`` (after the merger), float32 [n_tokens, out_hidden_size], in raster
    order of the merged 2x2 blocks."""
    import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)

    d = Path(ckpt_dir)
    config = json.loads((d / "config.json").read_text())
    model = load_vision_tower(d)
    pv, thw = hf_pixel_values(image, preprocessor_config(d), vision_config(config))
    with torch.no_grad():
        out = model(pv.float(), grid_thw=thw)
    return out.pooler_output.float().numpy()


_MTMD_QUIET = []


def _mtmd_quiet_callback():
    """A log callback for libmtmd that drops every line (kept alive for the process: libmtmd holds
    the pointer)."""
    import llama_cpp  # noqa: PLC0415  (llama-cpp-python loads libllama: only where llama.cpp runs)

    if not _MTMD_QUIET:
        _MTMD_QUIET.append(llama_cpp.llama_log_callback(lambda level, text, user_data: None))
    return _MTMD_QUIET[0]


def llamacpp_image_embeddings(mmproj_path: str | os.PathLike, text_gguf: str | os.PathLike, image: np.ndarray,
                              *, n_threads: int = 2) -> np.ndarray:
    """The image tokens llama.cpp computes (libmtmd through llama-cpp-python's ``mtmd_cpp``
    bindings: ``mtmd_tokenize`` the media marker with the image, ``mtmd_encode_chunk``,
    ``mtmd_get_output_embd``), float32 [n_tokens, n_embd of the text model]. CPU, no warm-up."""

    import llama_cpp  # noqa: PLC0415  (llama-cpp-python loads libllama: only where llama.cpp runs)
    from llama_cpp import mtmd_cpp as M  # noqa: PLC0415  (llama-cpp-python loads libllama: only where llama.cpp runs)


    llm = open_model(text_gguf, n_ctx=256, n_threads=n_threads)
    model_ptr = llm._model.model
    M.mtmd_log_set(_mtmd_quiet_callback(), None)  # clip's loader logs every tensor to stderr otherwise
    params = M.mtmd_context_params_default()
    params.use_gpu = False
    params.n_threads = int(n_threads)
    params.warmup = False
    params.print_timings = False
    ctx = M.mtmd_init_from_file(str(Path(mmproj_path)).encode(), model_ptr, params)
    if not ctx:
        raise NexlabError(f"llama.cpp's mtmd could not load {mmproj_path} with {text_gguf}")
    img = np.ascontiguousarray(image, dtype=np.uint8)
    h, w = img.shape[:2]
    bitmap = chunks = None
    try:
        bitmap = M.mtmd_bitmap_init(w, h, img.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = M.mtmd_input_chunks_init()
        marker = M.mtmd_default_marker()
        text = M.mtmd_input_text(marker, len(marker), False, True)
        arr = (M.mtmd_bitmap_p_ctypes * 1)(bitmap)
        rc = M.mtmd_tokenize(ctx, chunks, ctypes.byref(text), arr, 1)
        if rc != 0:
            raise ToolError(f"mtmd_tokenize failed ({rc})")
        for i in range(M.mtmd_input_chunks_size(chunks)):
            chunk = M.mtmd_input_chunks_get(chunks, i)
            if M.mtmd_input_chunk_get_type(chunk) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                break
        else:
            raise ToolError("mtmd_tokenize gave no image chunk")
        n_tok = M.mtmd_input_chunk_get_n_tokens(chunk)
        if M.mtmd_encode_chunk(ctx, chunk) != 0:
            raise ToolError("mtmd_encode_chunk failed")
        n_embd = llama_cpp.llama_model_n_embd(model_ptr)
        ptr = M.mtmd_get_output_embd(ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_tok * n_embd,)).copy().reshape(n_tok, n_embd)
    finally:
        if chunks:
            M.mtmd_input_chunks_free(chunks)
        if bitmap:
            M.mtmd_bitmap_free(bitmap)
        M.mtmd_free(ctx)
        llm.close()


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """``||a - b|| / ||b||`` (Frobenius, float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise NexlabError(f"shapes differ: {a.shape} vs {b.shape}")
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ----------------------------------------------------------------------------- llama.cpp's multimodal tool
@dataclass
class MtmdRun:
    returncode: int
    output: str   # the generated text (stdout)
    log: str      # llama.cpp's log (stderr)
    seconds: float
    command: list


def run_mtmd_cli(text_gguf: str | os.PathLike, mmproj: str | os.PathLike, image: str | os.PathLike, *,
                 prompt: str = "Describe the image.", n_predict: int = 8, n_ctx: int = 512, threads: int = 2,
                 timeout: float = 300) -> MtmdRun:
    """Run ``llama-mtmd-cli -m TEXT --mmproj MMPROJ --image IMAGE -p PROMPT`` (greedy, seed 0, no
    warm-up, CPU) and return what it printed; raise with the end of its log when it fails."""


    cmd = [str(tool_path("llama-mtmd-cli")), "-m", str(text_gguf), "--mmproj", str(mmproj), "--image", str(image),
           "-p", prompt, "-n", str(int(n_predict)), "-c", str(int(n_ctx)), "-t", str(int(threads)),
           "--temp", "0", "--seed", "0", "--no-warmup"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout)
    run = MtmdRun(r.returncode, r.stdout, r.stderr, time.perf_counter() - t0, cmd)
    if r.returncode != 0:
        raise ToolError(f"llama-mtmd-cli failed ({r.returncode}) on {image} with {mmproj}:\n{r.stderr[-3000:]}")
    return run

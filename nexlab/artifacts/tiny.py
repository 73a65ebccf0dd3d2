"""The trained tiny Nex-N2-mini and its ModelOpt NVFP4 checkpoints, built once for every chapter.

:func:`ensure_tiny` builds (once; later calls reuse ``ARTIFACTS_DIR``) everything the later
chapters start from::

    ARTIFACTS_DIR/text/{train,calib,heldout}.txt   disjoint stdlib files (nexlab.artifacts.corpus)
    ARTIFACTS_DIR/tiny/tokenizer/                   byte-level BPE, HF format
    ARTIFACTS_DIR/tiny/bf16/                        trained model, HF checkpoint (transformers save_pretrained)
    ARTIFACTS_DIR/tiny/nvfp4/                       ModelOpt NVFP4, Nex-N2-mini scope (experts + shared expert)
    ARTIFACTS_DIR/tiny/nvfp4-all/                   ModelOpt NVFP4, every Linear ModelOpt's default config takes
    ARTIFACTS_DIR/tiny/train.json                   loss curve, held-out loss / perplexity, settings
    ARTIFACTS_DIR/tiny/build.json                   written last: mode (smoke/full), seed, paths

Checkpoints are laid out as published ones: ``Qwen3_5MoeForConditionalGeneration`` config.json
(text_config + vision_config, a tiny untrained vision tower included), at least two shards
``model-0000N-of-0000M.safetensors`` with ``model.safetensors.index.json``, tokenizer files;
NVFP4 ones add ``hf_quant_config.json`` and ``quantization_config`` in config.json, both written
by ModelOpt's ``export_hf_checkpoint`` itself.

The NVFP4 checkpoints are made by the real nvidia-modelopt on CPU
(:func:`nexlab.artifacts.modelopt.modelopt_nvfp4_export`): ``mtq.quantize`` with
``NVFP4_MLP_ONLY_CFG`` (the Nex-N2-mini scope: routed and shared experts; ``mlp.gate``,
``shared_expert_gate``, attention, linear attention, embeddings, lm_head and vision excluded by
ModelOpt's own ``default_disabled_quantizers``) or ``NVFP4_DEFAULT_CFG`` (``nvfp4-all``: every
Linear except what ModelOpt excludes by default: lm_head, routers and gates, linear attention's
in_proj_a/in_proj_b and conv1d, vision), max calibration on windows of ``calib.txt``, then
``export_hf_checkpoint``.

The pieces live beside this module: text splits and tokenizer in :mod:`nexlab.artifacts.corpus`,
training in :mod:`nexlab.artifacts.train`, checkpoint writing in :mod:`nexlab.artifacts.checkpoints`.
The slice, too big for ModelOpt on CPU, is :mod:`nexlab.artifacts.slice`; the tiny vision-language
model :mod:`nexlab.artifacts.tiny_vl`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from nexlab.artifacts.checkpoints import (
    TOKENIZER_FILES,
    atomic_write_json,
    default_artifacts_dir,
    save_bf16_checkpoint,
)
from nexlab.artifacts.corpus import make_text_splits, train_tokenizer
from nexlab.artifacts.modelopt import calibration_batches, modelopt_nvfp4_export
from nexlab.artifacts.train import TrainSettings, tokenize_file, train_tiny
from nexlab.core.fileio import atomic_output, locked
from nexlab.model.config import parameter_counts, tiny_config, to_transformers, validate_config
from nexlab.model.tokenizer import TINY_PRETOKENIZER, load_tokenizer, pretokenizer_name


def tiny_paths(artifacts_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Where :func:`ensure_tiny` puts each artifact (nothing is created)."""
    a = Path(artifacts_dir) if artifacts_dir is not None else default_artifacts_dir()
    t = a / "tiny"
    return {
        "artifacts": a,
        "text": a / "text",
        "train_text": a / "text" / "train.txt",
        "calib_text": a / "text" / "calib.txt",
        "heldout_text": a / "text" / "heldout.txt",
        "tokenizer": t / "tokenizer",
        "bf16": t / "bf16",
        "nvfp4": t / "nvfp4",
        "nvfp4_all": t / "nvfp4-all",
        "train_json": t / "train.json",
        "build_json": t / "build.json",
    }


def tokenizer_is_current(tokenizer_dir: str | os.PathLike) -> bool:
    """Whether ``tokenizer_dir`` holds a tokenizer.json with the tiny tokenizer's pre-tokenizer
    (:data:`nexlab.model.tokenizer.TINY_PRETOKENIZER`, Qwen3.5's); a tokenizer from an earlier nexlab
    (Qwen2's pre-tokenizer) is not, and is rebuilt with everything trained on it."""

    try:
        return pretokenizer_name(Path(tokenizer_dir) / "tokenizer.json") == TINY_PRETOKENIZER
    except ValueError:  # missing, unreadable or unrecognised
        return False


def ensure_text_and_tokenizer(artifacts_dir=None, seed: int = 0, vocab_size: int = 2048) -> dict[str, Path]:
    """Text splits and the tokenizer (built once, shared by smoke and full builds; a tokenizer
    that is not :func:`tokenizer_is_current` is trained again)."""

    p = tiny_paths(artifacts_dir)
    make_text_splits(p["text"], seed=seed)
    if not tokenizer_is_current(p["tokenizer"]):
        train_tokenizer(p["train_text"], p["tokenizer"], vocab_size=vocab_size)
    return p


def _read_build(p: dict[str, Path]) -> dict | None:
    try:
        b = json.loads(p["build_json"].read_text())
    except (OSError, ValueError):
        return None
    needed = [p["bf16"], p["nvfp4"], p["nvfp4_all"], p["tokenizer"], p["train_json"]]
    return b if all(x.exists() for x in needed) else None


def _built_with_current_tokenizer(p: dict[str, Path]) -> bool:
    """The tokenizer is current and every checkpoint carries that very tokenizer.json (a tokenizer
    trained again after the build, e.g. by :func:`ensure_text_and_tokenizer`, makes the build stale)."""
    if not tokenizer_is_current(p["tokenizer"]):
        return False
    want = (p["tokenizer"] / "tokenizer.json").read_bytes()
    try:
        return all((p[k] / "tokenizer.json").read_bytes() == want for k in ("bf16", "nvfp4", "nvfp4_all"))
    except OSError:
        return False


def ensure_tiny(artifacts_dir: str | os.PathLike | None = None, smoke: bool = False, seed: int = 0, *,
                force: bool = False, settings=None, calib_windows: int | None = None) -> dict[str, Path]:
    """Build (if missing) the tiny Nex-N2-mini artifacts; returns :func:`tiny_paths`.

    A complete build is reused: any build when ``smoke`` is True, a full build when it is False
    (a smoke build is then replaced). ``force`` rebuilds. The text splits and tokenizer are kept
    across builds; a build whose tokenizer is not :func:`tokenizer_is_current` (made by an earlier
    nexlab), or whose checkpoints carry another tokenizer.json, is rebuilt (with a new tokenizer).
    Smoke: a few training steps (seconds); full: ``TrainSettings()`` (a few minutes on 2 cores).
    ``settings`` (a ``nexlab.artifacts.train.TrainSettings``) overrides either. Safe to call from several
    processes at once (file lock).
    """
    import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)
    from transformers import Qwen3_5MoeForCausalLM  # noqa: PLC0415  (transformers is heavy: only the reference model needs it)


    p = tiny_paths(artifacts_dir)

    def usable(build):
        return (build is not None and not force and (smoke or build.get("mode") == "full")
                and build.get("seed") == seed and _built_with_current_tokenizer(p))

    if usable(_read_build(p)):  # fast path: no lock, so readers never wait for a rebuild in progress
        return p
    with locked(p["artifacts"] / "tiny.lock"):
        if usable(_read_build(p)):
            return p
        t0 = time.perf_counter()
        ensure_text_and_tokenizer(p["artifacts"], seed=seed)
        tok = load_tokenizer(p["tokenizer"])
        cfg = tiny_config(vocab_size=len(tok))
        validate_config(cfg)
        s = settings if settings is not None else (TrainSettings.smoke(seed) if smoke else TrainSettings(seed=seed))
        torch.manual_seed(seed)
        model = Qwen3_5MoeForCausalLM(to_transformers(cfg))
        train_ids = tokenize_file(tok, p["train_text"])
        heldout_ids = tokenize_file(tok, p["heldout_text"])
        res = train_tiny(model, train_ids, heldout_ids, s)
        info = {**res.__dict__, "mode": "smoke" if smoke else "full", "vocab_size": len(tok),
                "train_tokens": int(train_ids.numel()), "chance_perplexity": len(tok),
                "parameters": parameter_counts(cfg)["total"]}
        # An unfinished rebuild must not look complete; each folder is then replaced atomically,
        # so readers of the previous build never see a missing or half-written checkpoint.
        p["build_json"].unlink(missing_ok=True)
        save_bf16_checkpoint(model, cfg, p["bf16"], p["tokenizer"], seed=seed)
        del model
        n_cal = calib_windows if calib_windows is not None else (4 if smoke else 16)
        cal = calibration_batches(tok, p["calib_text"], n_cal, 64 if smoke else 256)
        t1 = time.perf_counter()
        modelopt_nvfp4_export(p["bf16"], p["nvfp4"], cal, scope="mlp", tokenizer_dir=p["tokenizer"])
        modelopt_nvfp4_export(p["bf16"], p["nvfp4_all"], cal, scope="all", tokenizer_dir=p["tokenizer"])
        info["modelopt_seconds"] = time.perf_counter() - t1
        info["calibration_windows"] = list(cal.shape)
        atomic_write_json(p["train_json"], info)
        atomic_write_json(p["build_json"], {
            "mode": info["mode"], "seed": seed, "seconds": time.perf_counter() - t0,
            "paths": {k: str(v) for k, v in p.items()},
        })
    return p


def load_train_info(artifacts_dir=None) -> dict:
    """The ``train.json`` record of the current tiny build (losses, held-out perplexity, settings)."""
    return json.loads(tiny_paths(artifacts_dir)["train_json"].read_text())


def refresh_tokenizer(tokenizer_dir: Path, ckpt_dir: Path) -> None:
    """Copy the tokenizer files into ``ckpt_dir`` (each atomically) when its tokenizer.json differs."""
    src = tokenizer_dir / "tokenizer.json"
    dst = ckpt_dir / "tokenizer.json"
    if not src.is_file() or (dst.is_file() and dst.read_bytes() == src.read_bytes()):
        return
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            with atomic_output(ckpt_dir / name) as tmp:
                shutil.copyfile(tokenizer_dir / name, tmp)

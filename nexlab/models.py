"""The workbook's models: a trained tiny Nex-N2-mini, its ModelOpt NVFP4 checkpoints, and the slice.

:func:`ensure_tiny` builds (once; later calls reuse ``ARTIFACTS_DIR``) everything the later
chapters start from::

    ARTIFACTS_DIR/text/{train,calib,heldout}.txt   disjoint stdlib files (nexlab.tokenizer)
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

The NVFP4 checkpoints are made by the real nvidia-modelopt on CPU: ``mtq.quantize`` with
``NVFP4_MLP_ONLY_CFG`` (the Nex-N2-mini scope: routed and shared experts; ``mlp.gate``,
``shared_expert_gate``, attention, linear attention, embeddings, lm_head and vision excluded by
ModelOpt's own ``default_disabled_quantizers``) or ``NVFP4_DEFAULT_CFG`` (``nvfp4-all``: every
Linear except what ModelOpt excludes by default: lm_head, routers and gates, linear attention's
in_proj_a/in_proj_b and conv1d, vision), max calibration on windows of ``calib.txt``, then
``export_hf_checkpoint``.

The slice (:func:`write_slice`) is too big for ModelOpt on CPU, so nexlab writes it itself with
ModelOpt's semantics (``nexlab.nvfp4.quantize_nvfp4_modelopt``), streaming layer by layer.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

from .checkpoint import Checkpoint
from .fileio import atomic_directory, atomic_output, atomic_write_text, locked
from .config import parameter_counts, slice_config, tiny_config, to_transformers, validate_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
NVFP4_SCOPES = {"mlp": "NVFP4_MLP_ONLY_CFG", "all": "NVFP4_DEFAULT_CFG"}


def default_artifacts_dir() -> Path:
    """``$NEXLAB_ARTIFACTS`` or ``build/artifacts`` of the repository."""
    env = os.environ.get("NEXLAB_ARTIFACTS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "build" / "artifacts"


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


# --------------------------------------------------------------------------- small file helpers


def _atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _copy_tokenizer(tokenizer_dir: Path, dest: Path) -> None:
    for name in TOKENIZER_FILES:
        src = tokenizer_dir / name
        if src.is_file():
            shutil.copyfile(src, dest / name)


# --------------------------------------------------------------------------- checkpoint reading


def checkpoint_index(ckpt_dir: str | os.PathLike) -> dict[str, str]:
    """``tensor key -> shard file name`` of a checkpoint folder (sharded or one ``model.safetensors``).

    Keys are as stored (``model.language_model.``, ``model.visual.`` ... included). Read through
    :class:`nexlab.checkpoint.Checkpoint`, the workbook's one safetensors reader, so the index file
    is checked against the shards' headers and a truncated or missing shard is refused by name.
    """
    with Checkpoint(ckpt_dir) as ck:
        return {k: e.shard.name for k, e in ck.stored.items()}


def read_tensors(ckpt_dir: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, Any]:
    """Load tensors (torch, on CPU, stored dtype) of a checkpoint folder by stored key; all when ``names`` is None.

    Reads through :meth:`nexlab.checkpoint.Checkpoint.load_stored` (one positioned read per tensor).
    Raises KeyError listing (up to five) keys that are not in the checkpoint.
    """
    d = Path(ckpt_dir)
    with Checkpoint(d) as ck:
        wanted = list(ck.stored) if names is None else list(names)
        missing = [n for n in wanted if n not in ck.stored]
        if missing:
            raise KeyError(f"tensor(s) not in checkpoint {d}: {missing[:5]}")
        return {k: ck.load_stored(k) for k in wanted}


def tensor_table(ckpt_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per stored tensor: name (key as stored), dtype (safetensors name), shape, bytes, shard.

    From the safetensors headers only (:class:`nexlab.checkpoint.Checkpoint`, which also refuses
    truncated shards, naming them); nothing is loaded.
    """
    with Checkpoint(ckpt_dir) as ck:
        rows = [{"name": k, "dtype": e.dtype, "shape": list(e.shape), "bytes": e.nbytes, "shard": e.shard.name}
                for k, e in ck.stored.items()]
    return sorted(rows, key=lambda r: r["name"])


# --------------------------------------------------------------------------- sharded writing


class ShardedWriter:
    """Write a checkpoint as ``model-0000N-of-0000M.safetensors`` + ``model.safetensors.index.json``.

    Tensors are added group by group (:meth:`add`, e.g. one layer at a time); a shard is flushed
    to disk once it holds at least ``shard_bytes``, so peak memory is about one shard plus one
    group. :meth:`finish` renames the shards to their final ``-of-M`` names and writes the index
    (``metadata.total_size`` = sum of tensor bytes, as transformers writes it). Write into a
    staging folder (see :func:`write_slice`) so a failure leaves nothing half-written.
    """

    def __init__(self, out_dir: str | os.PathLike, shard_bytes: int, *, background: bool = False):
        if shard_bytes <= 0:
            raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.shard_bytes = int(shard_bytes)
        # background: a shard is written by one writer thread (safetensors writes from the tensors'
        # memory without holding the GIL) while the next one is filled; at most two shards in memory.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-write") if background else None
        self._writing = None
        self._pending: dict[str, Any] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self.total_size = 0
        self.total_parameters = 0

    def add(self, tensors: dict[str, Any]) -> None:
        for name, t in tensors.items():
            if name in self._pending or any(name in keys for _, keys in self._shards):
                raise ValueError(f"tensor {name!r} written twice")
            t = t.contiguous()
            self._pending[name] = t
            nbytes = t.numel() * t.element_size()
            self._pending_bytes += nbytes
            self.total_size += nbytes
            self.total_parameters += t.numel()
        if self._pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        from safetensors.torch import save_file  # noqa: PLC0415

        tmp_name = f".shard-{len(self._shards):05d}.tmp"
        self._shards.append((tmp_name, list(self._pending)))
        if self._pool is None:
            save_file(self._pending, str(self.out / tmp_name), metadata={"format": "pt"})
        else:
            self._wait()
            self._writing = self._pool.submit(save_file, self._pending, str(self.out / tmp_name), {"format": "pt"})
        self._pending, self._pending_bytes = {}, 0

    def _wait(self) -> None:
        if self._writing is not None:
            w, self._writing = self._writing, None
            w.result()  # re-raises the writer's error (e.g. disk full) here

    def close(self) -> None:
        """Wait for a shard being written and stop the writer thread (also on errors)."""
        try:
            self._wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def finish(self) -> list[str]:
        self._flush()
        self.close()
        m = len(self._shards)
        weight_map, names = {}, []
        for i, (tmp_name, keys) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{m:05d}.safetensors"
            os.replace(self.out / tmp_name, self.out / final)
            names.append(final)
            for k in keys:
                weight_map[k] = final
        index = {"metadata": {"total_parameters": self.total_parameters, "total_size": self.total_size},
                 "weight_map": dict(sorted(weight_map.items()))}
        _atomic_write_json(self.out / "model.safetensors.index.json", index)
        return names


# --------------------------------------------------------------------------- tiny: text, tokenizer, training


def tokenizer_is_current(tokenizer_dir: str | os.PathLike) -> bool:
    """Whether ``tokenizer_dir`` holds a tokenizer.json with the tiny tokenizer's pre-tokenizer
    (:data:`nexlab.tokenizer.TINY_PRETOKENIZER`, Qwen3.5's); a tokenizer from an earlier nexlab
    (Qwen2's pre-tokenizer) is not, and is rebuilt with everything trained on it."""
    from .tokenizer import TINY_PRETOKENIZER, pretokenizer_name  # noqa: PLC0415

    try:
        return pretokenizer_name(Path(tokenizer_dir) / "tokenizer.json") == TINY_PRETOKENIZER
    except ValueError:  # missing, unreadable or unrecognised
        return False


def ensure_text_and_tokenizer(artifacts_dir=None, seed: int = 0, vocab_size: int = 2048) -> dict[str, Path]:
    """Text splits and the tokenizer (built once, shared by smoke and full builds; a tokenizer
    that is not :func:`tokenizer_is_current` is trained again)."""
    from .tokenizer import make_text_splits, train_tokenizer  # noqa: PLC0415

    p = tiny_paths(artifacts_dir)
    make_text_splits(p["text"], seed=seed)
    if not tokenizer_is_current(p["tokenizer"]):
        train_tokenizer(p["train_text"], p["tokenizer"], vocab_size=vocab_size)
    return p


def save_bf16_checkpoint(causal_lm, cfg: dict, out_dir: str | os.PathLike, tokenizer_dir=None, *, seed: int = 0,
                         min_shards: int = 2) -> Path:
    """Save a trained ``Qwen3_5MoeForCausalLM`` as a published-style BF16 checkpoint.

    The text weights go into a ``Qwen3_5MoeForConditionalGeneration`` built from ``cfg`` (its
    vision tower keeps its seeded random initialisation), saved with transformers'
    ``save_pretrained`` (which writes experts per expert, ``mlp.experts.{e}.{gate,up,down}_proj.weight``,
    and ``model.language_model.`` / ``model.visual.`` prefixes, as published checkpoints do) with
    a shard size that gives at least ``min_shards`` shards; tokenizer files copied in.
    """
    import torch  # noqa: PLC0415
    from transformers import Qwen3_5MoeForConditionalGeneration  # noqa: PLC0415

    validate_config(cfg)
    out = Path(out_dir)
    torch.manual_seed(seed)
    full = Qwen3_5MoeForConditionalGeneration(to_transformers(cfg, text_only=False)).to(torch.bfloat16)
    full.model.language_model.load_state_dict(causal_lm.model.state_dict(), strict=True)
    full.lm_head.load_state_dict(causal_lm.lm_head.state_dict(), strict=True)
    total = sum(p.numel() * p.element_size() for p in full.parameters())
    with atomic_directory(out) as tmp:
        full.save_pretrained(tmp, max_shard_size=total // min_shards + 1)
        if tokenizer_dir is not None:
            _copy_tokenizer(Path(tokenizer_dir), tmp)
    return out


def calibration_batches(tokenizer, calib_path, n_windows: int, seq_len: int):
    """``n_windows`` consecutive non-overlapping windows of ``seq_len`` tokens of the calibration text."""
    from .train import tokenize_file  # noqa: PLC0415

    ids = tokenize_file(tokenizer, calib_path)
    n = min(n_windows, ids.numel() // seq_len)
    if n < 1:
        raise ValueError(f"calibration text {calib_path} has fewer than seq_len={seq_len} tokens")
    return ids[: n * seq_len].reshape(n, seq_len)


def modelopt_nvfp4_export(bf16_dir, out_dir, calib_windows, *, scope: str = "mlp", batch_size: int = 4,
                          min_shards: int = 2, tokenizer_dir=None) -> Path:
    """Quantize a BF16 checkpoint with nvidia-modelopt (NVFP4, max calibration) and export it.

    ``scope="mlp"``: ``mtq.NVFP4_MLP_ONLY_CFG`` (Nex-N2-mini's published scope); ``scope="all"``:
    ``mtq.NVFP4_DEFAULT_CFG``. ``calib_windows``: int64 [n, seq_len] token windows. The export is
    ModelOpt's ``export_hf_checkpoint`` (BF16 for unquantized tensors) with a shard size giving at
    least ``min_shards`` shards. Runs on CPU in seconds for the tiny model.
    """
    import torch  # noqa: PLC0415
    import modelopt.torch.quantization as mtq  # noqa: PLC0415
    from modelopt.torch.export import export_hf_checkpoint  # noqa: PLC0415
    from transformers import Qwen3_5MoeForConditionalGeneration  # noqa: PLC0415

    if scope not in NVFP4_SCOPES:
        raise ValueError(f"scope must be one of {sorted(NVFP4_SCOPES)}, got {scope!r}")
    if calib_windows.ndim != 2 or calib_windows.dtype != torch.long:
        raise ValueError("calib_windows must be an int64 tensor [n, seq_len]")
    out = Path(out_dir)
    model = Qwen3_5MoeForConditionalGeneration.from_pretrained(str(bf16_dir), dtype=torch.bfloat16)
    model.eval()

    def forward_loop(m):
        with torch.no_grad():
            for b in range(0, calib_windows.shape[0], batch_size):
                m(input_ids=calib_windows[b:b + batch_size])

    qcfg = copy.deepcopy(getattr(mtq, NVFP4_SCOPES[scope]))
    model = mtq.quantize(model, qcfg, forward_loop=forward_loop)
    bf16_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # NVFP4 shrinks the quantized part ~3.5x: aim below half the smallest plausible size.
    shard = max(1 << 20, bf16_bytes // (4 * min_shards))
    with atomic_directory(out) as tmp:
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=tmp, max_shard_size=shard)
        if tokenizer_dir is not None:
            _copy_tokenizer(Path(tokenizer_dir), tmp)
        n_shards = len(set(checkpoint_index(tmp).values()))
        if n_shards < min_shards:
            raise ValueError(f"ModelOpt export wrote {n_shards} shard(s), fewer than min_shards={min_shards}")
    return out


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
    ``settings`` (a ``nexlab.train.TrainSettings``) overrides either. Safe to call from several
    processes at once (file lock).
    """
    import torch  # noqa: PLC0415
    from transformers import Qwen3_5MoeForCausalLM  # noqa: PLC0415

    from .tokenizer import load_tokenizer  # noqa: PLC0415
    from .train import TrainSettings, tokenize_file, train_tiny  # noqa: PLC0415

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
        _atomic_write_json(p["train_json"], info)
        _atomic_write_json(p["build_json"], {
            "mode": info["mode"], "seed": seed, "seconds": time.perf_counter() - t0,
            "paths": {k: str(v) for k, v in p.items()},
        })
    return p


def load_train_info(artifacts_dir=None) -> dict:
    """The ``train.json`` record of the current tiny build (losses, held-out perplexity, settings)."""
    return json.loads(tiny_paths(artifacts_dir)["train_json"].read_text())


# --------------------------------------------------------------------------- slice (nexlab writer)


def _modelopt_linear(prefix: str, w, ws2=None, input_scale: float = 1.0) -> dict[str, Any]:
    """ModelOpt's four tensors of one NVFP4 Linear from its BF16/F32 weight [out, in]."""
    import torch  # noqa: PLC0415

    from .nvfp4 import quantize_nvfp4_modelopt  # noqa: PLC0415

    q, s, s2 = quantize_nvfp4_modelopt(w, ws2, name=prefix + ".weight")
    return {
        prefix + ".weight": torch.from_numpy(q),
        prefix + ".weight_scale": torch.from_numpy(s).view(torch.float8_e4m3fn),
        prefix + ".weight_scale_2": torch.tensor(float(s2), dtype=torch.float32),
        prefix + ".input_scale": torch.tensor(float(input_scale), dtype=torch.float32),
    }


def shared_weight_scale_2(*weights) -> float:
    """ModelOpt's shared ``weight_scale_2`` for projections fused at inference (gate and up of
    one expert): amax over all of them / (6 * 448), in float32."""
    import torch  # noqa: PLC0415

    amax = max(float(torch.as_tensor(w).abs().max().float()) for w in weights)
    import numpy as np  # noqa: PLC0415

    return float(np.float32(amax) / np.float32(6.0 * 448.0))


def quantize_layer_modelopt(layer_prefix: str, tensors: dict[str, Any], cfg: dict, *, scope: str = "mlp",
                            input_scales: dict[str, float] | None = None) -> dict[str, Any]:
    """nexlab's ModelOpt-semantics quantization of one decoder layer's BF16 tensors.

    ``tensors``: the layer's checkpoint tensors named relative to ``layer_prefix``, experts per
    expert (``mlp.experts.{e}.gate_proj.weight``...) as in a BF16 checkpoint. Quantized (scope
    "mlp"): routed experts and the shared expert; gate and up of one expert (and of the shared
    expert) share ``weight_scale_2`` as ModelOpt's export makes them. ``input_scale`` needs
    activations, so it is taken from ``input_scales`` (projection kind -> value; one value per
    kind, as ModelOpt shares input amax across experts) or 1.0. Other tensors pass through.
    """
    if scope != "mlp":
        raise ValueError(f"the nexlab writer implements the 'mlp' scope only, got {scope!r}")
    t = cfg["text_config"] if "text_config" in cfg else cfg
    ins = input_scales or {}
    out: dict[str, Any] = {}
    groups = [f"mlp.experts.{e}" for e in range(t["num_experts"])] + ["mlp.shared_expert"]
    consumed = set()
    for g in groups:
        gate, up, down = (f"{g}.{k}_proj.weight" for k in ("gate", "up", "down"))
        for k in (gate, up, down):
            if k not in tensors:
                raise ValueError(f"layer {layer_prefix}: tensor {k!r} missing")
        out.update(quantize_mlp_group_modelopt(f"{layer_prefix}{g}", tensors[gate], tensors[up], tensors[down], ins))
        consumed.update((gate, up, down))
    for k, v in tensors.items():
        if k not in consumed:
            out[layer_prefix + k] = v
    return out


def quantize_mlp_group_modelopt(prefix: str, gate, up, down, input_scales: dict[str, float] | None = None) -> dict[str, Any]:
    """One SwiGLU group (a routed expert or the shared expert) as ModelOpt exports it: gate and up
    share ``weight_scale_2`` = amax(gate, up) / (6 * 448) (they are fused at inference), down has
    its own; ``input_scale`` from ``input_scales`` keyed ``"experts.gate_proj"`` /
    ``"shared_expert.down_proj"``..., else 1.0. ``prefix`` e.g. ``...layers.0.mlp.experts.7``."""
    ins = input_scales or {}
    kind = "shared_expert" if prefix.endswith("shared_expert") else "experts"
    s2 = shared_weight_scale_2(gate, up)
    out = _modelopt_linear(f"{prefix}.gate_proj", gate, s2, ins.get(f"{kind}.gate_proj", 1.0))
    out.update(_modelopt_linear(f"{prefix}.up_proj", up, s2, ins.get(f"{kind}.up_proj", 1.0)))
    out.update(_modelopt_linear(f"{prefix}.down_proj", down, None, ins.get(f"{kind}.down_proj", 1.0)))
    return out


def random_layer_tensors(cfg: dict, layer: int, generator, std: float = 0.02, *, experts: bool = True) -> dict[str, Any]:
    """Random BF16 tensors of one decoder layer with the real per-layer shapes, named as a BF16
    checkpoint names them (relative to the layer prefix; experts per expert). Norm weights are 0
    (Qwen3.5 RMSNorm computes x * (1 + w)), A_log/dt_bias as transformers initialises them."""
    import torch  # noqa: PLC0415

    from .config import layer_parameter_shapes, text_config  # noqa: PLC0415

    t = text_config(cfg)
    kind = t["layer_types"][layer]
    shapes = layer_parameter_shapes(cfg)[kind]
    out = {}
    for name, shape in shapes.items():
        if name.startswith("mlp.experts."):
            continue
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            v = torch.zeros(shape) if name != "linear_attn.norm.weight" else torch.ones(shape)
        elif name.endswith("A_log"):
            v = torch.log(torch.empty(shape).uniform_(1, 16, generator=generator))
        elif name.endswith("dt_bias"):
            v = torch.ones(shape)
        else:
            v = torch.randn(shape, generator=generator) * std
        out[name] = v.to(torch.bfloat16)
    for ex in range(t["num_experts"] if experts else 0):
        out.update({f"mlp.experts.{ex}.{k}": v for k, v in random_expert_tensors(cfg, generator, std).items()})
    return out


def random_expert_tensors(cfg: dict, generator, std: float = 0.02) -> dict[str, Any]:
    """Random BF16 ``gate_proj.weight``, ``up_proj.weight``, ``down_proj.weight`` of one routed expert."""
    import torch  # noqa: PLC0415

    from .config import text_config  # noqa: PLC0415

    t = text_config(cfg)
    i, h = t["moe_intermediate_size"], t["hidden_size"]
    return {f"{proj}.weight": (torch.randn(shape, generator=generator) * std).to(torch.bfloat16)
            for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i)))}


def write_slice(out_dir: str | os.PathLike | None = None, *, vocab_size: int | None = None, periods: int = 1,
                seed: int = 0, tokenizer_dir=None, show_progress: bool = True, cfg: dict | None = None) -> Path:
    """Write the slice (real per-layer shapes, random weights) as a ModelOpt-layout NVFP4 checkpoint.

    Streams layer by layer: each layer's BF16 tensors are drawn (seeded; routed experts one at a
    time), quantized with :func:`quantize_mlp_group_modelopt` (Nex-N2-mini scope, the semantics
    :func:`quantize_layer_modelopt` checks against ModelOpt) and flushed as its own shard, so peak
    memory is about one quantized layer plus one expert. Embeddings and lm_head (BF16) get their own shards. Writes
    config.json (:func:`nexlab.config.slice_config` + ModelOpt's ``quantization_config``),
    hf_quant_config.json with the exclude list ModelOpt writes for this scope, and tokenizer
    files when ``tokenizer_dir`` is given. ``input_scale`` is 1.0 (no activations for random weights).
    Default folder: ``ARTIFACTS_DIR/slice/nvfp4``. ``cfg`` replaces the slice configuration
    (tests write a tiny-shaped one the same way).
    """
    import torch  # noqa: PLC0415

    from .config import SLICE_DEFAULT_VOCAB  # noqa: PLC0415
    from .progress import progress  # noqa: PLC0415

    if cfg is None:
        cfg = slice_config(vocab_size=vocab_size or SLICE_DEFAULT_VOCAB, periods=periods)
    validate_config(cfg)
    t = cfg["text_config"]
    out = Path(out_dir) if out_dir is not None else default_artifacts_dir() / "slice" / "nvfp4"
    _fix_malloc_mmap_threshold()
    gen = torch.Generator().manual_seed(seed)
    h, v = t["hidden_size"], t["vocab_size"]
    lm = "model.language_model."
    hf_quant = {"producer": {"name": "modelopt", "version": _modelopt_version()},
                "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                                 "exclude_modules": _mlp_scope_excludes(t)}}
    with atomic_directory(out) as tmp:
        w = ShardedWriter(tmp, shard_bytes=1)  # every add() is its own shard
        w.add({lm + "embed_tokens.weight": (torch.randn(v, h, generator=gen) * 0.02).to(torch.bfloat16)})
        layers = range(t["num_hidden_layers"])
        for layer in (progress(layers, total=len(layers), desc="slice layers") if show_progress else layers):
            # Dense tensors and the shared expert first, then one routed expert at a time: only
            # one expert's BF16 weights exist at once, the layer is held quantized (~0.5 GB real).
            prefix = f"{lm}layers.{layer}."
            dense = random_layer_tensors(cfg, layer, gen, experts=False)
            shared = {k: dense.pop(f"mlp.shared_expert.{k}_proj.weight") for k in ("gate", "up", "down")}
            layer_out = {prefix + k: v for k, v in dense.items()}
            layer_out.update(quantize_mlp_group_modelopt(prefix + "mlp.shared_expert", shared["gate"], shared["up"],
                                                         shared["down"]))
            for ex in range(t["num_experts"]):
                e = random_expert_tensors(cfg, gen)
                layer_out.update(quantize_mlp_group_modelopt(f"{prefix}mlp.experts.{ex}", e["gate_proj.weight"],
                                                             e["up_proj.weight"], e["down_proj.weight"]))
            w.add(dict(sorted(layer_out.items())))
            del dense, shared, layer_out
        w.add({lm + "norm.weight": torch.zeros(h, dtype=torch.bfloat16),
               "lm_head.weight": (torch.randn(v, h, generator=gen) * 0.02).to(torch.bfloat16)})
        w.finish()
        full_cfg = copy.deepcopy(cfg)
        full_cfg["quantization_config"] = {
            "config_groups": {"group_0": {
                "input_activations": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
                "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
                "targets": ["Linear"]}},
            "ignore": hf_quant["quantization"]["exclude_modules"], "quant_algo": "NVFP4",
            "producer": hf_quant["producer"], "quant_method": "modelopt"}
        _atomic_write_json(tmp / "config.json", full_cfg)
        _atomic_write_json(tmp / "hf_quant_config.json", hf_quant)
        if tokenizer_dir is not None:
            _copy_tokenizer(Path(tokenizer_dir), tmp)
    return out


def _fix_malloc_mmap_threshold(nbytes: int = 128 * 1024) -> None:
    """Pin glibc's mmap threshold (``mallopt(M_MMAP_THRESHOLD)``) so that every large temporary is
    mmapped and returned to the system when freed. glibc otherwise raises the threshold after the
    first large free, the per-expert float32/BF16 temporaries then come from the heap, interleave
    with the small quantized outputs that are kept, and fragmentation grew the slice writer's
    resident memory to 6.8 GB (measured) instead of about one quantized layer. No-op off glibc."""
    try:
        import ctypes  # noqa: PLC0415

        ctypes.CDLL("libc.so.6").mallopt(-3, int(nbytes))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):  # pragma: no cover
        pass


def _modelopt_version() -> str:
    try:
        from importlib.metadata import version  # noqa: PLC0415

        return version("nvidia-modelopt")
    except Exception:  # pragma: no cover
        return "0.47.0"


def _mlp_scope_excludes(t: dict) -> list[str]:
    """The ``exclude_modules`` ModelOpt writes for NVFP4_MLP_ONLY_CFG on a Qwen3_5Moe model
    (same order: sorted names)."""
    lm = "model.language_model."
    ex = ["lm_head", lm + "embed_tokens"]
    for i, kind in enumerate(t["layer_types"]):
        mixer = "linear_attn*" if kind == "linear_attention" else "self_attn*"
        ex += [f"{lm}layers.{i}.{mixer}", f"{lm}layers.{i}.mlp.gate", f"{lm}layers.{i}.mlp.shared_expert_gate"]
    ex.append("model.visual*")
    return sorted(ex)


def _refresh_tokenizer(tokenizer_dir: Path, ckpt_dir: Path) -> None:
    """Copy the tokenizer files into ``ckpt_dir`` (each atomically) when its tokenizer.json differs."""
    src = tokenizer_dir / "tokenizer.json"
    dst = ckpt_dir / "tokenizer.json"
    if not src.is_file() or (dst.is_file() and dst.read_bytes() == src.read_bytes()):
        return
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            with atomic_output(ckpt_dir / name) as tmp:
                shutil.copyfile(tokenizer_dir / name, tmp)


def ensure_slice(artifacts_dir: str | os.PathLike | None = None, *, vocab_size: int | None = None, seed: int = 0,
                 show_progress: bool = True) -> Path:
    """``ARTIFACTS_DIR/slice/nvfp4``, written by :func:`write_slice` when missing or when its
    vocabulary differs from ``vocab_size`` (default :data:`nexlab.config.SLICE_DEFAULT_VOCAB`).
    The tiny tokenizer is copied in when it exists (its ids are a subset of any slice vocabulary
    >= 2048); a kept slice whose copy differs from the tiny tokenizer (made again since, e.g. by an
    earlier nexlab) gets the current files (the random weights do not depend on it)."""
    from .config import SLICE_DEFAULT_VOCAB  # noqa: PLC0415

    a = Path(artifacts_dir) if artifacts_dir is not None else default_artifacts_dir()
    out = a / "slice" / "nvfp4"
    vocab = vocab_size or SLICE_DEFAULT_VOCAB
    tok = tiny_paths(a)["tokenizer"]
    with locked(a / "slice.lock"):
        try:
            cfg = json.loads((out / "config.json").read_text())
            keep = cfg["text_config"]["vocab_size"] == vocab and (out / "model.safetensors.index.json").is_file()
        except (OSError, ValueError, KeyError):
            keep = False
        if keep:
            _refresh_tokenizer(tok, out)
            return out
        return write_slice(out, vocab_size=vocab, seed=seed, show_progress=show_progress,
                           tokenizer_dir=tok if tok.is_dir() else None)


def tensor_summary(ckpt_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The checkpoint's tensors grouped by pattern (layer number -> ``N``, expert number -> ``E``):
    pattern, count, dtype, shape (of one), total bytes. For tables in notebooks."""
    groups: dict[tuple, dict[str, Any]] = {}
    for r in tensor_table(ckpt_dir):
        pat = re.sub(r"\.experts\.\d+\.", ".experts.E.", re.sub(r"\.layers\.\d+\.", ".layers.N.", r["name"]))
        pat = re.sub(r"\.blocks\.\d+\.", ".blocks.N.", pat)
        key = (pat, r["dtype"], tuple(r["shape"]))
        g = groups.setdefault(key, {"pattern": pat, "count": 0, "dtype": r["dtype"], "shape": r["shape"], "bytes": 0})
        g["count"] += 1
        g["bytes"] += r["bytes"]
    return sorted(groups.values(), key=lambda g: g["pattern"])

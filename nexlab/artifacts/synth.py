"""Synthetic checkpoints of any known configuration, at full size, without downloading one.

``nexlab synth nex-n2-mini -o DIR`` writes what the published ModelOpt NVFP4 checkpoint of
Nex-N2-mini looks like to a converter: the exact config.json (with ModelOpt's
``quantization_config``), ``hf_quant_config.json``, the published key names and prefix
(``model.language_model.*``, ``model.visual.*``, ``lm_head.weight``), dtypes and shapes, sharded
safetensors files of a few GB with ``model.safetensors.index.json``, and a tokenizer. Only the
values are random.

Names and shapes come from transformers itself: ``Qwen3_5MoeForConditionalGeneration`` is built on
the ``meta`` device (no memory) from the configuration and its ``state_dict`` is read. The routed
experts, which transformers stores fused (``mlp.experts.gate_up_proj [E, 2I, H]``), become the
per-expert modules ModelOpt exports (``mlp.experts.{e}.{gate,up,down}_proj``); they and the shared
expert are NVFP4 quartets (``weight`` uint8, ``weight_scale`` float8_e4m3fn, ``weight_scale_2`` and
``input_scale`` float32); everything else is BF16, as in the published checkpoint (MLP-only scope).

Values are plausible and valid, and written at disk speed. 35B floats are never quantized in
Python: a pool of a few thousand rows of heavy-tailed weights is quantized once with
:func:`nexlab.formats.nvfp4.quantize_nvfp4_modelopt` (ModelOpt's exact rules), and every NVFP4 tensor is a
run of pool rows from a random start (codes and their block scales together, so each tensor *is*
ModelOpt's quantization of some float tensor; no NaN scale byte can occur). Each gate/up pair
shares a ``weight_scale_2`` (the pool's amax / 2688 times a per-expert log-normal factor), every
projection kind of a layer shares one ``input_scale``, as ModelOpt writes them. BF16 tensors are
windows of a pool of normal values (std 0.02); norms, ``A_log`` and ``dt_bias`` are set as
transformers initialises them. Everything is a function of ``seed``.

The tokenizer is nexlab's own (trained on the standard library, as the tiny model's); the
configuration keeps the real vocabulary size and converters pad the token list to it.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nexlab.artifacts.checkpoints import (
    ShardedWriter,
    atomic_write_json,
    copy_tokenizer,
    default_artifacts_dir,
    fix_malloc_mmap_threshold,
)
from nexlab.artifacts.modelopt import mlp_scope_excludes, modelopt_version
from nexlab.artifacts.tiny import ensure_text_and_tokenizer
from nexlab.core.errors import NexlabError
from nexlab.core.fileio import atomic_directory
from nexlab.core.progress import progress
from nexlab.formats.nvfp4 import nvfp4_tensor_scale, quantize_nvfp4_modelopt
from nexlab.model.config import (
    PREPROCESSOR_CONFIG,
    real_config,
    slice_config,
    text_config,
    tiny_config,
    to_transformers,
    validate_config,
)

#: Key prefix of the language model in the published checkpoints (transformers' own naming).
TEXT_PREFIX = "model.language_model."


#: Bytes per shard (decimal, as ``save_pretrained(max_shard_size="4GB")``).
DEFAULT_SHARD_BYTES = 4_000_000_000


#: Free space kept beyond the checkpoint's own bytes (safetensors headers, tokenizer, file system).
DISK_MARGIN = 256 * 2**20


_POOL_ROWS = 4096       # rows of the NVFP4 pool per input width


_POOL_VALUES = 1 << 24  # BF16 pool: 16 Mi values


def _configs() -> dict[str, Callable[[], dict]]:

    return {"tiny": tiny_config, "slice": slice_config, "nex-n2-mini": real_config}


CONFIGS = ("tiny", "slice", "nex-n2-mini")


def synth_config(name: str) -> dict:
    """The config.json (without ``quantization_config``) of a known configuration by name."""
    makers = _configs()
    if name not in makers:
        raise NexlabError(f"unknown configuration {name!r}; known: {', '.join(CONFIGS)}")
    return makers[name]()


@dataclass(frozen=True)
class SynthTensor:
    """One stored tensor: key as written, safetensors dtype, shape, and how its values are made."""

    key: str
    dtype: str          # "BF16", "U8", "F8_E4M3", "F32"
    shape: tuple[int, ...]
    kind: str           # float, zeros, ones, a_log, dt_bias, codes, block_scales, weight_scale_2, input_scale
    group: str = ""     # NVFP4: the module whose gate/up share weight_scale_2 / kind sharing input_scale

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * {"BF16": 2, "U8": 1, "F8_E4M3": 1, "F32": 4}[self.dtype]


def meta_state_dict_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of ``Qwen3_5MoeForConditionalGeneration``'s state dict, built on ``meta``."""
    import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)
    from transformers import Qwen3_5MoeForConditionalGeneration  # noqa: PLC0415  (transformers is heavy: only the reference model needs it)


    with torch.device("meta"):
        model = Qwen3_5MoeForConditionalGeneration._from_config(to_transformers(cfg, text_only=False))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _float_kind(key: str) -> str:
    leaf = key.rsplit(".", 1)[-1]
    if key.endswith("A_log"):
        return "a_log"
    if key.endswith("dt_bias"):
        return "dt_bias"
    if ".visual." in key or key.startswith("model.visual"):
        if leaf == "bias":
            return "zeros"
        if ".norm" in key and leaf == "weight":  # LayerNorm
            return "ones"
        return "float"
    if key.endswith("linear_attn.norm.weight"):
        return "ones"  # gated RMSNorm: plain weight
    if key.endswith("norm.weight"):
        return "zeros"  # Qwen3.5 RMSNorm computes x * (1 + w)
    return "float"


def _nvfp4_quartet(module: str, out: int, n_in: int, group: str, kind_key: str) -> list[SynthTensor]:
    return [SynthTensor(module + ".weight", "U8", (out, n_in // 2), "codes", str(n_in)),
            SynthTensor(module + ".weight_scale", "F8_E4M3", (out, n_in // 16), "block_scales", str(n_in)),
            SynthTensor(module + ".weight_scale_2", "F32", (), "weight_scale_2", f"{group}@{n_in}"),
            SynthTensor(module + ".input_scale", "F32", (), "input_scale", kind_key)]


def synth_plan(cfg: dict) -> list[list[SynthTensor]]:
    """Every tensor of the synthetic checkpoint of ``cfg``, in groups written together (embeddings,
    one group per decoder layer, then the final norm and lm_head, then the vision tower)."""

    validate_config(cfg)
    t = text_config(cfg)
    n_exp, n_ff = int(t["num_experts"]), int(t["moe_intermediate_size"])
    shapes = meta_state_dict_shapes(cfg)
    head, tail, vision = [], [], []
    layers: list[list[SynthTensor]] = [[] for _ in range(int(t["num_hidden_layers"]))]
    for key, shape in shapes.items():
        if key.startswith(TEXT_PREFIX + "layers."):
            layer = int(key[len(TEXT_PREFIX + "layers."):].split(".", 1)[0])
            g = layers[layer]
            if ".mlp.experts." in key:
                base = key[: key.index(".mlp.experts.") + len(".mlp.experts.")]
                if key.endswith("gate_up_proj"):
                    e_, two_i, h = shape
                    if e_ != n_exp or two_i != 2 * n_ff:
                        raise NexlabError(f"{key}: shape {list(shape)} does not match the configuration")
                    for e in range(n_exp):
                        for proj in ("gate_proj", "up_proj"):
                            g += _nvfp4_quartet(f"{base}{e}.{proj}", n_ff, h, f"{base}{e}", f"{base}{proj}")
                elif key.endswith("down_proj"):
                    _, h, i = shape
                    for e in range(n_exp):
                        g += _nvfp4_quartet(f"{base}{e}.down_proj", h, i, f"{base}{e}.down_proj", f"{base}down_proj")
                else:
                    raise NexlabError(f"unexpected expert tensor {key!r} in transformers' model")
            elif ".mlp.shared_expert." in key and key.endswith("_proj.weight"):
                module = key[: -len(".weight")]
                out, n_in = shape
                proj = module.rsplit(".", 1)[1]
                share = module.rsplit(".", 1)[0] if proj in ("gate_proj", "up_proj") else module
                g += _nvfp4_quartet(module, out, n_in, share, module)
            else:
                g.append(SynthTensor(key, "BF16", shape, _float_kind(key)))
        elif key.startswith("model.visual."):
            vision.append(SynthTensor(key, "BF16", shape, _float_kind(key)))
        elif key == TEXT_PREFIX + "embed_tokens.weight":
            head.append(SynthTensor(key, "BF16", shape, "float"))
        elif key in (TEXT_PREFIX + "norm.weight", "lm_head.weight"):
            tail.append(SynthTensor(key, "BF16", shape, _float_kind(key)))
        else:
            raise NexlabError(f"unexpected tensor {key!r} in transformers' model")
    groups = [head] + [sorted(g, key=lambda s: s.key) for g in layers] + [tail, sorted(vision, key=lambda s: s.key)]
    return [g for g in groups if g]


def synth_nbytes(cfg: dict) -> int:
    """Tensor bytes of the synthetic checkpoint (the safetensors files add a few MB of headers)."""
    return sum(s.nbytes for g in synth_plan(cfg) for s in g)


class _Values:
    """The pools and the random stream every tensor's values are drawn from."""

    def __init__(self, seed: int):
        import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)

        self.rng = np.random.default_rng(seed)
        g = torch.Generator().manual_seed(seed)
        self.bf16 = (torch.randn(_POOL_VALUES, generator=g) * 0.02).to(torch.bfloat16)
        self._nvfp4: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}
        self._ws2: dict[str, float] = {}
        self._input: dict[str, float] = {}

    def nvfp4_pool(self, n_in: int):
        if n_in not in self._nvfp4:

            # Student-t (5 degrees of freedom): heavier tails than a normal, as trained weights have.
            w = (self.rng.standard_t(5, size=(_POOL_ROWS, n_in)) * 0.02).astype(np.float32)
            q, s, s2 = quantize_nvfp4_modelopt(w, name=f"synthetic pool {n_in}")
            self._nvfp4[n_in] = (q, s, float(s2))
        return self._nvfp4[n_in]

    def rows(self, pool: np.ndarray, n: int) -> np.ndarray:
        start = int(self.rng.integers(pool.shape[0]))
        idx = (start + np.arange(n)) % pool.shape[0]
        return pool[idx]

    def make(self, s: SynthTensor):
        import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)

        if s.kind == "codes":
            return torch.from_numpy(self.rows(self.nvfp4_pool(int(s.group))[0], s.shape[0]))
        if s.kind == "block_scales":
            return torch.from_numpy(self.rows(self.nvfp4_pool(int(s.group))[1], s.shape[0])).view(torch.float8_e4m3fn)
        if s.kind == "weight_scale_2":
            if s.group not in self._ws2:
                pool_s2 = self.nvfp4_pool(int(s.group.rsplit("@", 1)[1]))[2]
                self._ws2[s.group] = float(np.float32(pool_s2 * np.exp(self.rng.normal(0.0, 0.25))))
            return torch.tensor(self._ws2[s.group], dtype=torch.float32)
        if s.kind == "input_scale":
            if s.group not in self._input:  # activation amax / 2688 for amax ~ 1..100
                self._input[s.group] = float(nvfp4_tensor_scale(np.exp(self.rng.uniform(np.log(1.0), np.log(100.0)))))
            return torch.tensor(self._input[s.group], dtype=torch.float32)
        n = int(np.prod(s.shape, dtype=np.int64))
        if s.kind == "zeros":
            return torch.zeros(s.shape, dtype=torch.bfloat16)
        if s.kind == "ones":
            return torch.ones(s.shape, dtype=torch.bfloat16)
        if s.kind == "a_log":
            return torch.from_numpy(np.log(self.rng.uniform(1, 16, n)).astype(np.float32)).reshape(s.shape).bfloat16()
        if s.kind == "dt_bias":
            return torch.ones(s.shape, dtype=torch.bfloat16)
        # float: a window of the pool from a random start (wrapping), reshaped
        pool = self.bf16
        start = int(self.rng.integers(pool.numel()))
        parts, left = [], n
        while left > 0:
            take = min(left, pool.numel() - start)
            parts.append(pool[start:start + take])
            left -= take
            start = 0
        flat = parts[0].clone() if len(parts) == 1 else torch.cat(parts)
        return flat.reshape(s.shape)



    def close(self) -> None:
        pass


def _check_free_space(folder: Path, needed: int) -> None:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise NexlabError(f"not enough free disk space in {probe}: the checkpoint needs {needed / 1e9:.2f} GB "
                         f"(incl. {DISK_MARGIN / 2**20:.0f} MiB margin), {free / 1e9:.2f} GB free")


def _quant_configs(t: dict) -> tuple[dict, dict]:

    producer = {"name": "modelopt", "version": modelopt_version()}
    exclude = mlp_scope_excludes(t)
    hf_quant = {"producer": producer,
                "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                                 "exclude_modules": exclude}}
    qc = {"config_groups": {"group_0": {
        "input_activations": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
        "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
        "targets": ["Linear"]}},
        "ignore": exclude, "quant_algo": "NVFP4", "producer": producer, "quant_method": "modelopt"}
    return hf_quant, qc


@dataclass
class SynthResult:
    path: Path
    nbytes: int
    n_tensors: int
    n_shards: int
    seconds: float


def write_synth(config: str | dict, out_dir: str | os.PathLike, *, seed: int = 0,
                shard_bytes: int = DEFAULT_SHARD_BYTES, tokenizer_dir: str | os.PathLike | None = None,
                show_progress: bool = True) -> SynthResult:
    """Write the synthetic ModelOpt NVFP4 checkpoint of ``config`` (a name of :data:`CONFIGS` or a
    config.json dict) to ``out_dir`` (replaced atomically; nothing is left on failure).

    The free space of the target is checked first against the exact tensor bytes plus
    :data:`DISK_MARGIN` (ValueError with both numbers). ``tokenizer_dir``: tokenizer files to copy
    (default: nexlab's trained tokenizer, built in a few seconds when missing). One shard is written by a
    background thread while the next is generated, so memory is about two shards (``shard_bytes``)
    plus the pools (~100 MB), and the time about the larger of generating and writing.
    """

    if not isinstance(seed, int) or seed < 0:
        raise NexlabError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(shard_bytes, int) or shard_bytes < 2**20:
        raise NexlabError(f"shard_bytes must be an int of at least 1 MiB, got {shard_bytes!r}")
    cfg = copy.deepcopy(synth_config(config) if isinstance(config, str) else config)
    out = Path(out_dir)
    plan = synth_plan(cfg)
    total = sum(s.nbytes for g in plan for s in g)
    _check_free_space(out.parent if out.parent != Path("") else Path("."), total + DISK_MARGIN)
    if tokenizer_dir is None:
        tokenizer_dir = ensure_text_and_tokenizer(default_artifacts_dir())["tokenizer"]
    tok = Path(tokenizer_dir)
    if not (tok / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {tok}")
    fix_malloc_mmap_threshold()
    t0 = time.perf_counter()
    values = _Values(seed)
    n = sum(len(g) for g in plan)
    hf_quant, qc = _quant_configs(cfg["text_config"])
    with atomic_directory(out) as tmp:
        w = ShardedWriter(tmp, shard_bytes=shard_bytes, background=True)
        bar = progress(total=total, desc=f"synth {out.name}", unit="B", unit_scale=True, unit_divisor=1024,
                       show_progress=show_progress)
        try:
            for g in plan:
                batch: dict[str, Any] = {}
                size = 0
                for s in g:
                    batch[s.key] = values.make(s)
                    size += s.nbytes
                    if size >= shard_bytes // 8:  # hand over in pieces so a shard never overshoots much
                        w.add(batch)
                        bar.update(size)
                        batch, size = {}, 0
                if batch:
                    w.add(batch)
                    bar.update(size)
            shards = w.finish()
        finally:
            w.close()
            bar.close()
        full = copy.deepcopy(cfg)
        full["quantization_config"] = qc
        atomic_write_json(tmp / "config.json", full)
        atomic_write_json(tmp / "hf_quant_config.json", hf_quant)
        if full.get("vision_config"):  # the image processor settings the mmproj stores (nexlab.convert.mmproj)

            atomic_write_json(tmp / "preprocessor_config.json", PREPROCESSOR_CONFIG)
        copy_tokenizer(tok, tmp)
    return SynthResult(out, total, n, len(shards), time.perf_counter() - t0)


def _cli(args: argparse.Namespace) -> int:
    r = write_synth(args.config, args.output, seed=args.seed, shard_bytes=int(args.shard_gb * 1e9),
                    tokenizer_dir=args.tokenizer)
    print(f"wrote {r.path}: {r.n_tensors} tensors, {r.nbytes / 2**30:.2f} GiB in {r.n_shards} shards, "
          f"{r.seconds:.1f} s ({r.nbytes / 1e6 / max(r.seconds, 1e-9):.0f} MB/s)")
    return 0


def register_cli(subparsers) -> None:
    """``nexlab synth CONFIG -o DIR [--seed N] [--shard-gb G] [--tokenizer DIR]``."""
    p = subparsers.add_parser("synth", help="write a random-weight ModelOpt NVFP4 checkpoint of a known configuration")
    p.add_argument("config", choices=CONFIGS, help="configuration: tiny, slice (4 real layers) or nex-n2-mini (35B)")
    p.add_argument("-o", "--output", required=True, help="output checkpoint folder (replaced atomically)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 1e9, help="shard size in GB (default 4)")
    p.add_argument("--tokenizer", default=None, help="folder with tokenizer.json (default: nexlab's trained tokenizer)")
    p.set_defaults(func=_cli)

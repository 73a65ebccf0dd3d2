"""Checkpoint folders of the workbook's models: writing them sharded, reading their tables.

- :class:`ShardedWriter` writes ``model-0000N-of-0000M.safetensors`` + ``model.safetensors.index.json``
  group by group (one layer at a time), so peak memory is about one shard; the slice, the synthetic
  checkpoints and the tiny VL model are written with it.
- :func:`save_bf16_checkpoint`: a trained ``Qwen3_5MoeForCausalLM`` as a published-style BF16
  ``Qwen3_5MoeForConditionalGeneration`` checkpoint (transformers' ``save_pretrained``).
- :func:`random_layer_tensors` / :func:`random_expert_tensors`: seeded BF16 tensors with a
  configuration's real per-layer shapes.
- :func:`checkpoint_index`, :func:`read_tensors`, :func:`tensor_table`, :func:`tensor_summary`: a
  folder's tensors by stored key, all through :class:`nexlab.model.checkpoint.Checkpoint`.
- :func:`default_artifacts_dir`: ``$NEXLAB_ARTIFACTS`` or the repository's ``build/artifacts``.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

from nexlab.core.errors import NexlabError, NexlabKeyError
from nexlab.core.fileio import atomic_directory, atomic_write_text
from nexlab.model.checkpoint import Checkpoint
from nexlab.model.config import layer_parameter_shapes, text_config, to_transformers, validate_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def default_artifacts_dir() -> Path:
    """``$NEXLAB_ARTIFACTS`` or ``build/artifacts`` of the repository."""
    env = os.environ.get("NEXLAB_ARTIFACTS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "build" / "artifacts"


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def copy_tokenizer(tokenizer_dir: Path, dest: Path) -> None:
    for name in TOKENIZER_FILES:
        src = tokenizer_dir / name
        if src.is_file():
            shutil.copyfile(src, dest / name)


def checkpoint_index(ckpt_dir: str | os.PathLike) -> dict[str, str]:
    """``tensor key -> shard file name`` of a checkpoint folder (sharded or one ``model.safetensors``).

    Keys are as stored (``model.language_model.``, ``model.visual.`` ... included). Read through
    :class:`nexlab.model.checkpoint.Checkpoint`, the workbook's one safetensors reader, so the index file
    is checked against the shards' headers and a truncated or missing shard is refused by name.
    """
    with Checkpoint(ckpt_dir) as ck:
        return {k: e.shard.name for k, e in ck.stored.items()}


def read_tensors(ckpt_dir: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, Any]:
    """Load tensors (torch, on CPU, stored dtype) of a checkpoint folder by stored key; all when ``names`` is None.

    Reads through :meth:`nexlab.model.checkpoint.Checkpoint.load_stored` (one positioned read per tensor).
    Raises KeyError listing (up to five) keys that are not in the checkpoint.
    """
    d = Path(ckpt_dir)
    with Checkpoint(d) as ck:
        wanted = list(ck.stored) if names is None else list(names)
        missing = [n for n in wanted if n not in ck.stored]
        if missing:
            raise NexlabKeyError(f"tensor(s) not in checkpoint {d}: {missing[:5]}")
        return {k: ck.load_stored(k) for k in wanted}


def tensor_table(ckpt_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per stored tensor: name (key as stored), dtype (safetensors name), shape, bytes, shard.

    From the safetensors headers only (:class:`nexlab.model.checkpoint.Checkpoint`, which also refuses
    truncated shards, naming them); nothing is loaded.
    """
    with Checkpoint(ckpt_dir) as ck:
        rows = [{"name": k, "dtype": e.dtype, "shape": list(e.shape), "bytes": e.nbytes, "shard": e.shard.name}
                for k, e in ck.stored.items()]
    return sorted(rows, key=lambda r: r["name"])


class ShardedWriter:
    """Write a checkpoint as ``model-0000N-of-0000M.safetensors`` + ``model.safetensors.index.json``.

    Tensors are added group by group (:meth:`add`, e.g. one layer at a time); a shard is flushed
    to disk once it holds at least ``shard_bytes``, so peak memory is about one shard plus one
    group. :meth:`finish` renames the shards to their final ``-of-M`` names and writes the index
    (``metadata.total_size`` = sum of tensor bytes, as transformers writes it). Write into a
    staging folder (see :func:`nexlab.artifacts.slice.write_slice`) so a failure leaves nothing half-written.
    """

    def __init__(self, out_dir: str | os.PathLike, shard_bytes: int, *, background: bool = False):
        if shard_bytes <= 0:
            raise NexlabError(f"shard_bytes must be positive, got {shard_bytes}")
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
                raise NexlabError(f"tensor {name!r} written twice")
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
        from safetensors.torch import save_file  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)

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
        atomic_write_json(self.out / "model.safetensors.index.json", index)
        return names


def save_bf16_checkpoint(causal_lm, cfg: dict, out_dir: str | os.PathLike, tokenizer_dir=None, *, seed: int = 0,
                         min_shards: int = 2) -> Path:
    """Save a trained ``Qwen3_5MoeForCausalLM`` as a published-style BF16 checkpoint.

    The text weights go into a ``Qwen3_5MoeForConditionalGeneration`` built from ``cfg`` (its
    vision tower keeps its seeded random initialisation), saved with transformers'
    ``save_pretrained`` (which writes experts per expert, ``mlp.experts.{e}.{gate,up,down}_proj.weight``,
    and ``model.language_model.`` / ``model.visual.`` prefixes, as published checkpoints do) with
    a shard size that gives at least ``min_shards`` shards; tokenizer files copied in.
    """
    import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)
    from transformers import Qwen3_5MoeForConditionalGeneration  # noqa: PLC0415  (transformers is heavy: only the reference model needs it)

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
            copy_tokenizer(Path(tokenizer_dir), tmp)
    return out


def random_layer_tensors(cfg: dict, layer: int, generator, std: float = 0.02, *,
                         experts: bool = True) -> dict[str, Any]:
    """Random BF16 tensors of one decoder layer with the real per-layer shapes, named as a BF16
    checkpoint names them (relative to the layer prefix; experts per expert). Norm weights are 0
    (Qwen3.5 RMSNorm computes x * (1 + w)), A_log/dt_bias as transformers initialises them."""
    import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)


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
    import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)


    t = text_config(cfg)
    i, h = t["moe_intermediate_size"], t["hidden_size"]
    return {f"{proj}.weight": (torch.randn(shape, generator=generator) * std).to(torch.bfloat16)
            for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i)))}


def fix_malloc_mmap_threshold(nbytes: int = 128 * 1024) -> None:
    """Pin glibc's mmap threshold (``mallopt(M_MMAP_THRESHOLD)``) so that every large temporary is
    mmapped and returned to the system when freed. glibc otherwise raises the threshold after the
    first large free, the per-expert float32/BF16 temporaries then come from the heap, interleave
    with the small quantized outputs that are kept, and fragmentation grew the slice writer's
    resident memory to 6.8 GB (measured) instead of about one quantized layer. No-op off glibc."""
    try:

        ctypes.CDLL("libc.so.6").mallopt(-3, int(nbytes))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):  # pragma: no cover
        pass


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

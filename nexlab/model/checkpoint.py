"""Reading and validating Hugging Face / ModelOpt NVFP4 checkpoints of the Qwen3.5-MoE family.

A checkpoint directory holds ``config.json`` (possibly with ``quantization_config``), optionally
``hf_quant_config.json`` (ModelOpt export), and either one ``model.safetensors`` or shards listed
in ``model.safetensors.index.json``. :class:`Checkpoint` indexes every tensor from the safetensors
*headers* only (name, dtype, shape, byte range), so nothing is loaded until a tensor is asked for
with :meth:`Checkpoint.load`, which reads exactly that tensor's bytes (one positioned read, no
memory map, so nothing stays resident after use). Peak memory of a conversion is therefore about
one layer's experts, not the model.

Tensor names are canonicalised to the ``model.layers.N...`` / ``lm_head.weight`` form used by
``Qwen3_5MoeForCausalLM``: published checkpoints may prefix keys with ``model.language_model.``
or ``language_model.model.`` (the multimodal wrapper); vision-tower (``visual``) and MTP
(``mtp.``) tensors are not part of the text model and are set aside. Every stored tensor, set
aside or not, stays reachable under its key as written (:attr:`Checkpoint.stored`,
:meth:`Checkpoint.load_stored`): this module is the workbook's one safetensors reader
(``nexlab.artifacts.checkpoints.read_tensors`` / ``checkpoint_index`` / ``tensor_table`` go
through it).

:func:`validate_checkpoint` checks everything a converter relies on before one byte is written,
and names the tensor at fault: dtypes and shapes of ``weight`` / ``weight_scale`` /
``weight_scale_2`` / ``input_scale``, group size 16, input features divisible by 64 (one ggml
NVFP4 block), finite positive per-tensor scales, every expert of every layer, and every tensor
llama.cpp's qwen35moe loader requires.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nexlab.core.errors import NexlabError, NexlabTypeError
from nexlab.formats.minifloat import GGML_NVFP4_BLOCK, NVFP4_GROUP

# safetensors dtype string -> bytes per element
_ST_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


_FLOAT_DTYPES = ("F32", "BF16", "F16")


def _torch_dtypes() -> dict[str, Any]:
    import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)

    out = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
           "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
           "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
    # newer torch only (safetensors maps them the same way when torch has them)
    for st, attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E8M0", "float8_e8m0fnu")):
        if hasattr(torch, attr):
            out[st] = getattr(torch, attr)
    return out


class _LazyDtypes(dict):
    def get(self, k, default=None):
        if not self:
            self.update(_torch_dtypes())
        return super().get(k, default)


_TORCH_DTYPES = _LazyDtypes()


_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.lm_head.", "lm_head."),
)


_SKIP_PREFIXES = ("model.visual.", "visual.", "mtp.", "model.mtp.", "vision_tower.", "model.vision_tower.")


_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(.+)$")


def canonical_name(key: str) -> str | None:
    """Map a checkpoint key to the ``Qwen3_5MoeForCausalLM`` name, or None for non-text tensors."""
    for pre, rep in _PREFIXES:
        if key.startswith(pre):
            key = rep + key[len(pre):]
            break
    if key.startswith(_SKIP_PREFIXES):
        return None
    return key


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: canonical name, key in the file, shard, dtype string, shape."""

    name: str
    key: str
    shard: Path
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]  # byte range inside the data section
    data_start: int = 0  # file offset of the data section (8 + header length)

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]


def read_safetensors_header(path: Path, *, with_data_start: bool = False):
    """Parse a safetensors header and check that the file holds every byte it announces.

    Raises ValueError naming the shard when the file is shorter than its header says (a truncated
    download or copy) or the header is not valid safetensors.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise NexlabError(f"{path.name}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise NexlabError(f"{path.name}: truncated or corrupt safetensors header "
                             f"(header says {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise NexlabError(f"{path.name}: corrupt safetensors header ({exc})") from None
    data_len = size - 8 - n
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if end > data_len:
        bad = sorted((k for k, v in header.items() if k != "__metadata__" and v["data_offsets"][1] > data_len))
        raise NexlabError(f"{path.name}: truncated shard: data section has {data_len} bytes but tensors need {end} "
                         f"({len(bad)} tensors cut off, e.g. {bad[0]!r})")
    for k, v in header.items():
        if k == "__metadata__":
            continue
        want = math.prod(v["shape"]) * _ST_DTYPE_BYTES.get(v["dtype"], 0)
        got = v["data_offsets"][1] - v["data_offsets"][0]
        if v["dtype"] in _ST_DTYPE_BYTES and want != got:
            raise NexlabError(f"{path.name}: tensor {k!r} has {got} bytes, "
                              f"shape {v['shape']} {v['dtype']} needs {want}")
    return (header, 8 + n) if with_data_start else header


class Checkpoint:
    """Index of a (possibly sharded, possibly ModelOpt NVFP4) safetensors checkpoint.

    Attributes: ``path``, ``config`` (text hyper-parameters: ``text_config`` merged over the top
    level), ``raw_config``, ``quant`` (``{"quant_algo", "group_size", "exclude_modules", ...}`` or
    None), ``entries`` (canonical name -> :class:`TensorEntry`), ``skipped`` (keys set aside),
    ``stored`` (every key as written in the files, set-aside ones included -> :class:`TensorEntry`,
    in shard order then header order).

    Use it as a context manager (or call :meth:`close`) to close the shard files it opened.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.path} does not exist")
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise NexlabError(f"{self.path}: no config.json")
        self.raw_config: dict[str, Any] = json.loads(cfg_path.read_text())
        self.config: dict[str, Any] = {**self.raw_config, **self.raw_config.get("text_config", {})}
        self.quant = self._read_quant()
        self.entries: dict[str, TensorEntry] = {}
        self.skipped: list[str] = []
        self.stored: dict[str, TensorEntry] = {}
        self._handles: dict[Path, Any] = {}
        self._index()

    # ----------------------------------------------------------------- reading
    def _read_quant(self) -> dict[str, Any] | None:
        q: dict[str, Any] = {}
        qc = self.raw_config.get("quantization_config") or {}
        if qc:
            q.update({k: v for k, v in qc.items()
                      if k in ("quant_algo", "group_size", "exclude_modules", "quant_method")})
            cg = qc.get("config_groups") or {}
            for g in cg.values():  # compressed-tensors style config groups
                gs = (g.get("weights") or {}).get("group_size") if isinstance(g, dict) else None
                if gs is not None:
                    q.setdefault("group_size", gs)
        hq = self.path / "hf_quant_config.json"
        if hq.is_file():
            data = json.loads(hq.read_text())
            qq = data.get("quantization") or {}
            for k in ("quant_algo", "group_size", "exclude_modules", "kv_cache_quant_algo"):
                if k in qq:
                    q[k] = qq[k]
            q["producer"] = data.get("producer")
        return q or None

    def _index(self) -> None:
        index = self.path / "model.safetensors.index.json"
        weight_map: dict[str, str] = {}
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
            if not weight_map:
                raise NexlabError(f"{index.name}: no weight_map")
            shards = sorted(set(weight_map.values()))
        else:
            shards = sorted(p.name for p in self.path.glob("model*.safetensors"))
        if not shards:
            raise NexlabError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        seen: set[str] = set()
        for shard in shards:
            sp = self.path / shard
            if not sp.is_file():
                missing = sorted(k for k, v in weight_map.items() if v == shard)
                raise NexlabError(f"shard {shard} listed in the index is missing "
                                  f"({len(missing)} tensors, e.g. {missing[0]!r})")
            header, data_start = read_safetensors_header(sp, with_data_start=True)
            for key, v in header.items():
                if key == "__metadata__":
                    continue
                if key in seen:
                    raise NexlabError(f"tensor {key!r} is stored twice ({self.stored[key].shard.name} and {shard})")
                seen.add(key)
                if weight_map and weight_map.get(key) != shard:
                    raise NexlabError(f"tensor {key!r} found in {shard} but the index puts it in {weight_map.get(key)}")
                name = canonical_name(key)
                entry = TensorEntry(name if name is not None else key, key, sp, v["dtype"], tuple(v["shape"]),
                                    tuple(v["data_offsets"]), data_start)
                self.stored[key] = entry
                if name is None:
                    self.skipped.append(key)
                    continue
                if name in self.entries:
                    raise NexlabError(f"tensor {name!r} appears twice ({self.entries[name].key!r} and {key!r})")
                self.entries[name] = entry
        if weight_map:
            missing = sorted(set(weight_map) - seen)
            if missing:
                raise NexlabError(f"{len(missing)} tensors listed in the index are not in their shard, "
                                 f"e.g. {missing[0]!r} (expected in {weight_map[missing[0]]})")

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def info(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise NexlabError(f"tensor {name!r} is missing from checkpoint {self.path}") from None

    def load(self, name: str):
        """Return one tensor, by canonical name, as a torch tensor (CPU, stored dtype), read with one
        positioned read.

        Plain reads rather than a memory map: mapped pages a conversion has touched stay in the
        process's resident set until the map closes (for a whole model: the whole checkpoint),
        while a read buffer is freed as soon as the tensor is. Byte ranges come from the
        safetensors header, validated when the checkpoint was opened.
        """
        return self._read(self.info(name))

    def load_stored(self, key: str):
        """Like :meth:`load`, by the key as written in the file (set-aside vision / MTP tensors too)."""
        e = self.stored.get(key)
        if e is None:
            raise NexlabError(f"tensor {key!r} is not stored in checkpoint {self.path}")
        return self._read(e)

    def _read(self, e: TensorEntry):
        import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)

        f = self._handles.get(e.shard)
        if f is None:
            f = open(e.shard, "rb")  # noqa: SIM115 - closed in close()
            self._handles[e.shard] = f
        n = e.nbytes
        buf = np.empty(n, dtype=np.uint8)  # not zero-filled: every byte is read below
        if n:
            got = os.preadv(f.fileno(), [buf], e.data_start + e.offsets[0]) if hasattr(os, "preadv") else None
            if got is None:
                f.seek(e.data_start + e.offsets[0])
                got = f.readinto(buf)
            if got != n:
                raise NexlabError(f"{e.shard.name}: tensor {e.key!r} truncated ({got} of {n} bytes)")
        dtype = _TORCH_DTYPES.get(e.dtype)
        if dtype is None:
            raise NexlabTypeError(f"tensor {e.key!r}: unsupported safetensors dtype {e.dtype}")
        if n == 0:
            return torch.empty(e.shape, dtype=dtype)
        return torch.from_numpy(buf).view(dtype).reshape(e.shape)

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------- structure
    @property
    def n_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def n_experts(self) -> int:
        return int(self.config["num_experts"])

    def layer_types(self) -> list[str]:
        """``"linear_attention"`` / ``"full_attention"`` per layer (config ``layer_types`` or the interval rule)."""
        lt = self.config.get("layer_types")
        if lt is not None:
            if len(lt) != self.n_layers:
                raise NexlabError(f"config layer_types has {len(lt)} entries, num_hidden_layers is {self.n_layers}")
            return list(lt)
        k = int(self.config.get("full_attention_interval", 4))
        return ["full_attention" if (i + 1) % k == 0 else "linear_attention" for i in range(self.n_layers)]

    def is_nvfp4(self, module: str) -> bool:
        """True when ``module.weight`` is stored as ModelOpt NVFP4 (has a ``weight_scale`` sibling)."""
        return f"{module}.weight_scale" in self.entries

    def experts_fused(self, layer: int) -> bool:
        return f"model.layers.{layer}.mlp.experts.gate_up_proj" in self.entries

    @property
    def quant_algo(self) -> str | None:
        return (self.quant or {}).get("quant_algo")


# ------------------------------------------------------------------ validation
@dataclass
class ValidationReport:
    n_tensors: int = 0
    nvfp4_modules: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _required_modules(ck: Checkpoint) -> list[str]:
    """HF tensor names (without experts) that llama.cpp's qwen35moe loader needs, per config."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not ck.config.get("tie_word_embeddings", False):
        names.append("lm_head.weight")
    for i, t in enumerate(ck.layer_types()):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight", p + "mlp.gate.weight",
                  p + "mlp.shared_expert_gate.weight"]
        names += [p + f"mlp.shared_expert.{x}_proj.weight" for x in ("gate", "up", "down")]
        if t == "full_attention":
            names += [p + f"self_attn.{x}.weight" for x in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")]
        elif t == "linear_attention":
            la = p + "linear_attn."
            names += [la + x for x in ("in_proj_qkv.weight", "in_proj_z.weight", "in_proj_a.weight", "in_proj_b.weight",
                                       "conv1d.weight", "A_log", "dt_bias", "norm.weight", "out_proj.weight")]
        else:
            raise NexlabError(f"config layer_types[{i}] = {t!r}: expected linear_attention or full_attention")
    return names


def _scalar_f32(ck: Checkpoint, name: str, problems: list[str]) -> None:
    e = ck.entries.get(name)
    if e is None:
        return
    if e.dtype != "F32":
        problems.append(f"{name}: dtype {e.dtype}, expected F32 (per-tensor NVFP4 scale)")
        return
    if math.prod(e.shape) != 1:
        problems.append(f"{name}: shape {list(e.shape)}, expected a scalar")
        return
    v = float(ck.load(name).float().reshape(-1)[0])
    if not math.isfinite(v) or v <= 0.0:
        problems.append(f"{name}: value {v} is not a finite positive scale")


def _check_nvfp4_module(ck: Checkpoint, module: str, problems: list[str], group_size: int) -> None:
    w = ck.entries.get(f"{module}.weight")
    s = ck.entries[f"{module}.weight_scale"]
    if w is None:
        problems.append(f"{module}.weight is missing (its weight_scale is present)")
        return
    if w.dtype != "U8" or len(w.shape) != 2:
        problems.append(f"{module}.weight: dtype {w.dtype} shape {list(w.shape)}, "
                        "expected U8 [out, in/2] (packed E2M1)")
        return
    out, half = w.shape
    n_in = 2 * half
    if s.dtype != "F8_E4M3":
        problems.append(f"{module}.weight_scale: dtype {s.dtype}, expected F8_E4M3 (float8_e4m3fn block scales)")
    if len(s.shape) != 2 or s.shape[0] != out:
        problems.append(f"{module}.weight_scale: shape {list(s.shape)}, expected [{out}, {n_in // NVFP4_GROUP}]")
    elif s.shape[1] * NVFP4_GROUP != n_in:
        g = n_in / s.shape[1] if s.shape[1] else float("nan")
        problems.append(f"{module}.weight_scale: {s.shape[1]} scales per row for {n_in} inputs = group size {g:g}; "
                        f"NVFP4 needs group size {NVFP4_GROUP}")
    if n_in % GGML_NVFP4_BLOCK:
        problems.append(f"{module}.weight: {n_in} input features, "
                        f"not a multiple of {GGML_NVFP4_BLOCK} (ggml NVFP4 block)")
    if f"{module}.weight_scale_2" not in ck.entries:
        problems.append(f"{module}.weight_scale_2 is missing")
    _scalar_f32(ck, f"{module}.weight_scale_2", problems)
    _scalar_f32(ck, f"{module}.input_scale", problems)


def validate_checkpoint(ck: Checkpoint, *, raise_on_error: bool = True) -> ValidationReport:
    """Check a checkpoint before conversion; raise ValueError listing every problem by tensor name.

    Checks (all from headers except the per-tensor scalars, which are read): config has the
    hyper-parameters the converter needs; quantization is NVFP4 with group size 16; every tensor
    the qwen35moe loader needs is present for each layer type; every routed expert (gate, up,
    down) of every layer is present, per expert or fused; NVFP4 modules have U8 codes
    ``[out, in/2]``, F8_E4M3 scales ``[out, in/16]``, ``in % 64 == 0`` and finite positive F32
    scalar ``weight_scale_2`` / ``input_scale``; unquantized weights are floating point.
    Block scales are checked for NaN while they are repacked (they are streamed, not preloaded).

    Kept in one function: one pass over the checkpoint's modules that collects every problem before raising.
    """
    rep = ValidationReport(n_tensors=len(ck.entries))
    problems = rep.problems
    cfg = ck.config
    need = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
            "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
            "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
            "linear_conv_kernel_dim", "rms_norm_eps"]
    missing_cfg = [k for k in need if k not in cfg]
    if missing_cfg:
        raise NexlabError(f"config.json lacks {', '.join(missing_cfg)} (needed for qwen35moe metadata)")
    if cfg["linear_num_value_heads"] % cfg["linear_num_key_heads"]:
        problems.append("config: linear_num_value_heads must be a multiple of linear_num_key_heads")

    q = ck.quant
    group_size = NVFP4_GROUP
    if q is not None and q.get("quant_algo") is not None:
        algo = q.get("quant_algo")
        if algo not in ("NVFP4", "W4A16_NVFP4", "MIXED_PRECISION"):
            problems.append(f"quantization: quant_algo {algo!r} is not NVFP4")
        gs = q.get("group_size")
        if gs is not None and int(gs) != NVFP4_GROUP:
            problems.append(f"quantization: group_size {gs}, NVFP4 needs {NVFP4_GROUP}")
            group_size = int(gs)

    for name in _required_modules(ck):
        if name not in ck.entries:
            if name.endswith(".weight") and name[: -len(".weight")] + ".weight_scale" in ck.entries:
                problems.append(f"{name} is missing (its weight_scale is present)")
            else:
                problems.append(f"{name} is missing")

    n_exp = ck.n_experts
    for i in range(ck.n_layers):
        p = f"model.layers.{i}.mlp.experts."
        if ck.experts_fused(i):
            gu, dn = ck.entries.get(p + "gate_up_proj"), ck.entries.get(p + "down_proj")
            if dn is None:
                problems.append(f"{p}down_proj is missing (gate_up_proj is present)")
            for e, want in ((gu, (n_exp, 2 * cfg["moe_intermediate_size"], cfg["hidden_size"])),
                            (dn, (n_exp, cfg["hidden_size"], cfg["moe_intermediate_size"]))):
                if e is not None and tuple(e.shape) != want:
                    problems.append(f"{e.name}: shape {list(e.shape)}, expected {list(want)}")
            continue
        absent = [f"{p}{x}.{proj}.weight" for x in range(n_exp) for proj in ("gate_proj", "up_proj", "down_proj")
                  if f"{p}{x}.{proj}.weight" not in ck.entries]
        if absent:
            experts = sorted({int(a.split(".")[5]) for a in absent})
            problems.append(f"layer {i}: {len(absent)} expert tensors missing (experts {experts[:8]}"
                            f"{'...' if len(experts) > 8 else ''}), e.g. {absent[0]}")

    for name, e in ck.entries.items():
        if name.endswith(".weight_scale"):
            module = name[: -len(".weight_scale")]
            rep.nvfp4_modules.append(module)
            _check_nvfp4_module(ck, module, problems, group_size)
        elif name.endswith((".weight_scale_2", ".input_scale")):
            module = name.rsplit(".", 1)[0]
            if f"{module}.weight_scale" not in ck.entries and name.endswith("weight_scale_2"):
                problems.append(f"{name} has no matching weight_scale")
        elif e.dtype not in _FLOAT_DTYPES and not (e.dtype == "U8" and f"{name}_scale" in ck.entries):
            problems.append(f"{name}: dtype {e.dtype} for an unquantized tensor (expected BF16/F16/F32)")

    # NVFP4 experts of one layer must agree on shape (they are stacked into one 3-D tensor)
    shapes: dict[tuple[int, str], set] = {}
    for name, e in ck.entries.items():
        m = _EXPERT_RE.match(name)
        if m and m.group(4) == "weight":
            shapes.setdefault((int(m.group(1)), m.group(3)), set()).add((e.dtype, e.shape))
    for (i, proj), s in shapes.items():
        if len(s) > 1:
            problems.append(f"layer {i} {proj}: experts differ in dtype/shape {sorted(s)}")

    if problems and raise_on_error:
        head = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise NexlabError(f"checkpoint {ck.path} is not convertible ({len(problems)} problems):\n  {head}{more}")
    return rep


def e4m3_bytes_nan_mask(scale_bytes: np.ndarray) -> np.ndarray:
    """True where an E4M3 (float8_e4m3fn) byte encodes NaN (S.1111.111); the format has no Inf."""
    return (scale_bytes & 0x7F) == 0x7F

"""Importance matrices in llama.cpp's GGUF imatrix format, and the column weights llama-quantize uses.

File format (what ``llama-imatrix`` writes, tools/imatrix/imatrix.cpp ``save_imatrix``; read by
common/imatrix-loader.cpp ``common_imatrix_load``; llama.cpp as vendored by llama-cpp-python 0.3.36):

* metadata: ``general.type = "imatrix"``, ``imatrix.datasets`` (array of strings),
  ``imatrix.chunk_count`` (u32), ``imatrix.chunk_size`` (u32). llama-quantize refuses a GGUF imatrix
  without the three ``imatrix.*`` keys ("missing imatrix metadata").
* per weight tensor ``<name>`` (a GGUF tensor name such as ``blk.0.attn_qkv.weight``), tensors in
  sorted name order:
  ``<name>.in_sum2``: F32, ggml ne ``[ne0, n_mat]`` - per input column the sum over tokens of x^2,
  one row per expert (n_mat = n_expert for ``*_exps`` tensors, 1 otherwise);
  ``<name>.counts``: F32, ne ``[1, n_mat]`` - tokens seen, per expert.
  ggml drops trailing 1-dimensions, so a dense entry is stored 1-D (``[ne0]`` and ``[1]``).

Column weights (tools/quantize/quantize.cpp ``load_imatrix``): for expert j,
``w[j*ne0 + i] = in_sum2[j, i] / (float) lround(counts[j])`` in float32, and ``w = 1`` for an expert
that saw no tokens; llama_model_quantize then hands expert j's slice to ggml_quantize_chunk.

In numpy, an entry is ``in_sum2`` float32 ``[n_mat, ne0]`` and ``counts`` float32 ``[n_mat]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nexlab import qwen35moe as Q
from nexlab.fileio import atomic_output

__all__ = [
    "ImatrixEntry",
    "Imatrix",
    "write_imatrix",
    "read_imatrix",
    "column_weights",
    "quantize_weights",
    "imatrix_for_tensor",
    "collect_imatrix",
    "register_cli",
]

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUFFIX_SUM2 = ".in_sum2"
SUFFIX_COUNTS = ".counts"


@dataclass
class ImatrixEntry:
    """Statistics of one weight tensor: ``in_sum2`` float32 [n_mat, ne0], ``counts`` float32 [n_mat]."""

    in_sum2: np.ndarray
    counts: np.ndarray

    def __post_init__(self):
        s = np.asarray(self.in_sum2, dtype=np.float32)
        if s.ndim == 1:
            s = s[None, :]
        c = np.asarray(self.counts, dtype=np.float32).reshape(-1)
        if s.ndim != 2 or s.shape[0] != c.shape[0] or s.shape[1] == 0:
            raise ValueError(f"in_sum2 {s.shape} and counts {c.shape} do not describe [n_mat, ne0] and [n_mat]")
        self.in_sum2 = np.ascontiguousarray(s)
        self.counts = c

    @property
    def n_mat(self) -> int:
        return self.in_sum2.shape[0]

    @property
    def ne0(self) -> int:
        return self.in_sum2.shape[1]


@dataclass
class Imatrix:
    """A whole importance matrix: entries by GGUF tensor name plus the ``imatrix.*`` metadata."""

    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0


def _validate(im: Imatrix, where: str) -> None:
    if not im.entries:
        raise ValueError(f"{where}: imatrix has no entries")
    for name, e in im.entries.items():
        if not np.isfinite(e.in_sum2).all():
            raise ValueError(f"{where}: imatrix entry {name}: in_sum2 has non-finite values (NaN/Inf)")
        if not np.isfinite(e.counts).all():
            raise ValueError(f"{where}: imatrix entry {name}: counts has non-finite values (NaN/Inf)")
        if (e.in_sum2 < 0).any() or (e.counts < 0).any():
            raise ValueError(f"{where}: imatrix entry {name}: negative sums of squares or counts")


def write_imatrix(path: str | os.PathLike, imatrix: Imatrix) -> Path:
    """Write ``imatrix`` as a GGUF imatrix file llama-quantize and llama-imatrix read.

    Key order, tensor order (sorted names, in_sum2 then counts) and tensor shapes follow
    llama-imatrix's ``save_imatrix``. The file is written to a temporary name in the target folder
    and renamed, so no half-written file is left behind.
    """
    import gguf  # noqa: PLC0415

    path = Path(path)
    _validate(imatrix, str(path))
    if not imatrix.datasets:
        raise ValueError(f"{path}: imatrix.datasets must name at least one dataset (llama-imatrix records its text "
                         "file; gguf-py cannot write an empty array)")
    with atomic_output(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch="imatrix")
        w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes no architecture
        w.add_type("imatrix")
        w.add_array(KEY_DATASETS, [str(d) for d in imatrix.datasets])
        w.add_uint32(KEY_CHUNK_COUNT, int(imatrix.chunk_count))
        w.add_uint32(KEY_CHUNK_SIZE, int(imatrix.chunk_size))
        for name in sorted(imatrix.entries):
            e = imatrix.entries[name]
            s, c = e.in_sum2, e.counts
            if e.n_mat == 1:  # ggml_n_dims drops the trailing 1
                s, c = s.reshape(-1), c.reshape(1)
            else:
                c = c.reshape(e.n_mat, 1)
            w.add_tensor(name + SUFFIX_SUM2, np.ascontiguousarray(s, dtype=np.float32))
            w.add_tensor(name + SUFFIX_COUNTS, np.ascontiguousarray(c, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def read_imatrix(path: str | os.PathLike) -> Imatrix:
    """Read a GGUF imatrix with the checks of common_imatrix_load and llama-quantize.

    Raises ValueError for: a file without the ``imatrix.*`` metadata, an ``in_sum2`` without its
    ``counts`` (or the reverse), non-F32 tensors, sums whose size is not a multiple of the count size,
    non-finite values. (The legacy ``.dat`` format is not supported.)
    """
    import gguf  # noqa: PLC0415

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"imatrix file {path} does not exist")
    try:
        r = gguf.GGUFReader(path)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path}: not a GGUF imatrix ({exc}); the legacy .dat format is not supported") from exc
    fields = r.fields
    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in fields]
    if missing:
        raise ValueError(f"{path}: missing imatrix metadata {missing} (llama-quantize refuses such a file)")
    datasets = list(fields[KEY_DATASETS].contents())
    chunk_count = int(fields[KEY_CHUNK_COUNT].contents())
    chunk_size = int(fields[KEY_CHUNK_SIZE].contents())

    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in r.tensors:
        for suffix, dst in ((SUFFIX_SUM2, sums), (SUFFIX_COUNTS, counts)):
            if t.name.endswith(suffix):
                base = t.name[: -len(suffix)]
                if t.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise ValueError(f"{path}: {t.name} is {t.tensor_type.name}, sums and counts must be F32")
                dst[base] = np.array(t.data, dtype=np.float32).reshape(-1)
    if not sums and not counts:
        raise ValueError(f"{path}: no imatrix entries")
    entries = {}
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            raise ValueError(f"{path}: mismatched sums and counts for {name}")
        s, c = sums[name], counts[name]
        if c.size == 0 or s.size % c.size:
            raise ValueError(f"{path}: {name}: {s.size} sums are not a whole number of rows for {c.size} counts")
        entries[name] = ImatrixEntry(s.reshape(c.size, -1), c)
    im = Imatrix(entries, datasets, chunk_count, chunk_size)
    _validate(im, str(path))
    return im


def column_weights(entry: ImatrixEntry) -> np.ndarray:
    """The float32 importance vector llama-quantize builds for one tensor: ``[n_mat * ne0]``.

    Matches load_imatrix (GGUF format): counts are rounded with ``lround`` (half away from zero),
    then ``in_sum2 / count`` in float32 per expert; an expert with count 0 gets weights 1.
    """
    c = np.floor(np.abs(entry.counts.astype(np.float64)) + 0.5) * np.sign(entry.counts)  # lround
    cf = c.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = entry.in_sum2 / cf[:, None]
    w = np.where((cf > 0)[:, None], w, np.float32(1)).astype(np.float32)
    return np.ascontiguousarray(w.reshape(-1))


def quantize_weights(imatrix: Imatrix) -> dict[str, np.ndarray]:
    """``{name: column_weights(entry)}`` for every entry: what llama-quantize passes as
    ``llama_model_quantize_params.imatrix`` (checked for non-finite values as llama_model_quantize does)."""
    out = {}
    for name, e in imatrix.entries.items():
        w = column_weights(e)
        if not np.isfinite(w).all():
            raise ValueError(f"imatrix entry {name}: column weights are non-finite")
        out[name] = w
    return out


def imatrix_for_tensor(weights: dict[str, np.ndarray] | None, name: str, ne0: int, n_expert: int = 1,
                       *, log=None) -> np.ndarray | None:
    """The importance weights llama_model_quantize would use for tensor ``name``, or None.

    As in llama-quant.cpp: no imatrix or no entry -> None (the tensor is quantized without importance
    weights; ``log`` is told "did not find weights for ..."); an entry whose size is not
    ``ne0 * n_expert`` -> ValueError, except for ``token_embd.weight`` where it is ignored. Returns
    float32 ``[n_expert, ne0]``: row j is expert j's column weights.
    """
    if weights is None:
        return None
    w = weights.get(name)
    if w is None:
        if log is not None:
            log(f"imatrix: did not find weights for {name}; quantizing it without importance weights")
        return None
    if w.size != ne0 * n_expert:
        if name in ("token_embd.weight", "per_layer_token_embd.weight"):
            if log is not None:
                log(f"imatrix: size {w.size} differs from tensor size {ne0 * n_expert} for {name}; ignored")
            return None
        raise ValueError(f"imatrix size {w.size} is different from tensor size {ne0 * n_expert} for {name}")
    return np.asarray(w, dtype=np.float32).reshape(n_expert, ne0)


def _linear_attn_out_perm(config) -> np.ndarray | None:
    """Input-column permutation the converter applies to ``linear_attn.out_proj`` (value heads grouped ->
    tiled, :func:`nexlab.qwen35moe.ssm_out_column_permutation`), or None when key and value head counts
    are equal."""
    return Q.ssm_out_column_permutation(Q.LinearAttnDims(
        int(config.linear_num_key_heads), int(config.linear_num_value_heads),
        int(config.linear_key_head_dim), int(config.linear_value_head_dim)))


def collect_imatrix(model, tokens, *, chunk_size: int = 512, n_chunks: int | None = None,
                    dataset: str = "", process_output: bool = False, progress: bool = True) -> Imatrix:
    """Collect llama-imatrix's statistics from transformers' Qwen3_5MoeForCausalLM on ``tokens``.

    ``tokens`` (a flat sequence of ids) is cut into ``chunk_size`` pieces (a partial last piece is
    dropped, as llama-imatrix does); each chunk is one forward pass. For every matmul weight, named by
    its GGUF tensor name, it accumulates the per-input-column sum of squared inputs and the number of
    input rows (tokens), as ``IMatrixCollector::collect_imatrix`` does:

    * nn.Linear weights of the blocks (attention, linear attention, shared expert, shared-expert gate)
      and the router (``ffn_gate_inp``): one row, count = tokens; ``output.weight`` (lm_head) only with
      ``process_output=True`` (llama-imatrix's ``--process-output``; off by default there too);
    * routed experts (``ffn_gate_exps``/``ffn_up_exps`` share the routed hidden states,
      ``ffn_down_exps`` sees ``act(gate) * up``): one row per expert, count = (token, slot) pairs routed
      to it (an expert never chosen keeps count 0, so llama-quantize gives it weights 1).

    ``ssm_out`` columns are permuted like the converter permutes that weight's columns. Sums are kept in
    float64 and stored as float32. The model computes in its own precision (the reference path), so the
    numbers are close to, not bit-equal with, what llama-imatrix measures on the GGUF.
    """
    import torch  # noqa: PLC0415

    from nexlab.progress import progress as bar  # noqa: PLC0415

    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", cfg)
    tokens = [int(t) for t in tokens]
    total = len(tokens) // chunk_size
    if n_chunks is not None:
        total = min(total, int(n_chunks))
    if total < 1:
        raise ValueError(f"need at least one chunk of {chunk_size} tokens, got {len(tokens)} tokens")
    perm = _linear_attn_out_perm(cfg)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}

    def add(name: str, x, row: int = 0, n_rows: int = 1):
        x = x.detach().double().reshape(-1, x.shape[-1])
        s = (x * x).sum(dim=0).numpy()
        if name not in sums:
            sums[name] = np.zeros((n_rows, s.shape[0]), np.float64)
            counts[name] = np.zeros(n_rows, np.float64)
        sums[name][row] += s
        counts[name][row] += x.shape[0]

    hooks = []
    for mname, mod in model.named_modules():
        cls = type(mod).__name__
        if isinstance(mod, torch.nn.Linear):
            try:
                gname = Q.gguf_name(mname + ".weight")
            except ValueError:
                continue
            if not (gname.startswith("blk.") or (process_output and gname == "output.weight")):
                continue  # llama-imatrix collects blk.* (and output.weight on request) only
            if gname.endswith("ssm_out.weight") and perm is not None:
                hooks.append(mod.register_forward_pre_hook(
                    lambda m, a, g=gname: add(g, a[0][..., torch.from_numpy(perm)])))
            else:
                hooks.append(mod.register_forward_pre_hook(lambda m, a, g=gname: add(g, a[0])))
        elif cls.endswith("TopKRouter"):
            gname = Q.gguf_name(mname + ".weight")
            hooks.append(mod.register_forward_pre_hook(lambda m, a, g=gname: add(g, a[0])))
        elif cls.endswith("Experts") and hasattr(mod, "gate_up_proj"):
            layer = int(mname.split(".")[2])

            def experts_hook(m, a, layer=layer):
                h, idx = a[0].detach(), a[1]
                E = m.num_experts
                names = [Q.expert_gguf_name(layer, p) for p in Q.EXPERT_PROJS]
                for e in range(E):
                    tok = (idx == e).nonzero()[:, 0]
                    if tok.numel() == 0:
                        for nm in names:  # make sure the entry exists with count 0
                            if nm not in sums:
                                dim = m.intermediate_dim if nm.endswith("down_exps.weight") else m.hidden_dim
                                sums[nm] = np.zeros((E, dim), np.float64)
                                counts[nm] = np.zeros(E, np.float64)
                        continue
                    x = h[tok]
                    add(names[0], x, e, E)
                    add(names[1], x, e, E)
                    gate, up = torch.nn.functional.linear(x, m.gate_up_proj[e]).chunk(2, dim=-1)
                    add(names[2], m.act_fn(gate) * up, e, E)

            hooks.append(mod.register_forward_pre_hook(experts_hook))
    try:
        it = range(total)
        if progress:
            it = bar(it, total=total, desc="imatrix chunks")
        with torch.no_grad():
            for c in it:
                ids = torch.tensor([tokens[c * chunk_size : (c + 1) * chunk_size]])
                model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    entries = {}
    for name in sorted(sums):
        s = sums[name]
        if not np.isfinite(s).all():
            raise ValueError(f"non-finite activations detected in {name}")
        entries[name] = ImatrixEntry(s.astype(np.float32), counts[name].astype(np.float32))
    return Imatrix(entries, [dataset] if dataset else [], total, chunk_size)


def _cmd_imatrix(args) -> int:
    from nexlab.reference import build_hf_model  # noqa: PLC0415

    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise ValueError(f"{model_dir}: MODEL must be a checkpoint directory (GGUF input is not supported yet)")
    from tokenizers import Tokenizer  # noqa: PLC0415

    tok_dir = Path(args.tokenizer) if args.tokenizer else model_dir
    tok_file = tok_dir / "tokenizer.json"
    if not tok_file.exists():
        raise ValueError(f"{tok_file} not found (use --tokenizer DIR)")
    text = Path(args.text).read_text(encoding="utf-8")
    ids = Tokenizer.from_file(str(tok_file)).encode(text, add_special_tokens=False).ids
    model = build_hf_model(model_dir)
    im = collect_imatrix(model, ids, chunk_size=args.chunk_size, n_chunks=args.chunks, dataset=str(args.text),
                         process_output=args.process_output)
    out = write_imatrix(args.output, im)
    print(f"wrote {out}: {len(im.entries)} entries, {im.chunk_count} chunks of {im.chunk_size} tokens")
    return 0


def _cmd_imatrix_show(args) -> int:
    im = read_imatrix(args.imatrix)
    print(f"datasets={im.datasets} chunk_count={im.chunk_count} chunk_size={im.chunk_size} entries={len(im.entries)}")
    for name, e in im.entries.items():
        print(f"{name:48s} ne0={e.ne0:6d} n_mat={e.n_mat:4d} tokens={int(e.counts.max()):8d}")
    return 0


def register_cli(subparsers) -> None:
    """``nexlab imatrix MODEL --text FILE [--chunk-size N] -o OUT`` and ``nexlab imatrix-show FILE``."""
    p = subparsers.add_parser("imatrix", help="collect an importance matrix (llama.cpp GGUF imatrix format)")
    p.add_argument("model", help="checkpoint directory (ModelOpt NVFP4 or BF16; NVFP4 is dequantized)")
    p.add_argument("--text", required=True, help="calibration text file")
    p.add_argument("--chunk-size", type=int, default=512, help="tokens per chunk (llama-imatrix -c)")
    p.add_argument("--chunks", type=int, default=None, help="maximum number of chunks")
    p.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (default: MODEL)")
    p.add_argument("--process-output", action="store_true", help="also collect output.weight (as llama-imatrix)")
    p.add_argument("-o", "--output", required=True, help="output imatrix .gguf")
    p.set_defaults(func=_cmd_imatrix)
    s = subparsers.add_parser("imatrix-show", help="print the entries of a GGUF imatrix file")
    s.add_argument("imatrix", help="GGUF imatrix file")
    s.set_defaults(func=_cmd_imatrix_show)

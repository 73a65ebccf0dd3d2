"""An importance matrix from transformers' reference model: the checkpoint-directory path of ``nexlab imatrix``.

:func:`collect_imatrix` runs transformers' ``Qwen3_5MoeForCausalLM`` (a float32 copy of the whole model,
so the tiny teaching model only) over calibration chunks and sums, per GGUF weight name, what
llama-imatrix sums on the GGUF (:func:`nexlab.analysis.imatrix.collect_imatrix_gguf`, the path for the
real model). The numbers are close to, not bit-equal with, llama-imatrix's: the model computes in its
own precision.
"""

from __future__ import annotations

import numpy as np

from nexlab.core.errors import NexlabError
from nexlab.core.progress import progress
from nexlab.ggufio.imatrix_file import Imatrix, ImatrixEntry
from nexlab.model import qwen35moe as Q
from nexlab.model.qwen35moe import linear_attn_out_perm


def collect_imatrix(model, tokens, *, chunk_size: int = 512, n_chunks: int | None = None,
                    dataset: str = "", process_output: bool = False, show_progress: bool = True) -> Imatrix:
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
    import torch  # noqa: PLC0415  (heavy: the transformers model runs in torch)

    tokens = [int(t) for t in tokens]
    total = len(tokens) // chunk_size
    if n_chunks is not None:
        total = min(total, int(n_chunks))
    if total < 1:
        raise NexlabError(f"need at least one chunk of {chunk_size} tokens, got {len(tokens)} tokens")
    col = _TorchCollector(model, process_output)
    try:
        it = progress(range(total), total=total, desc="imatrix chunks", show_progress=show_progress)
        with torch.no_grad():
            for c in it:
                ids = torch.tensor([tokens[c * chunk_size : (c + 1) * chunk_size]])
                model(input_ids=ids, use_cache=False)
    finally:
        col.remove()
    return Imatrix(col.entries(), [dataset] if dataset else [], total, chunk_size)


class _TorchCollector:
    """Forward pre-hooks on a transformers Qwen3.5-MoE model that sum squared inputs per GGUF weight name
    (:func:`collect_imatrix`): nn.Linear of the blocks (``ssm_out`` columns permuted as the converter
    permutes that weight), the router, and the routed experts per expert."""

    def __init__(self, model, process_output: bool):
        cfg = getattr(model, "config", None)
        self.perm = linear_attn_out_perm(getattr(cfg, "text_config", cfg))
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}
        self.hooks = []
        for mname, mod in model.named_modules():
            self._register(mname, mod, process_output)

    def add(self, name: str, x, row: int = 0, n_rows: int = 1) -> None:
        x = x.detach().double().reshape(-1, x.shape[-1])
        s = (x * x).sum(dim=0).numpy()
        if name not in self.sums:
            self.sums[name] = np.zeros((n_rows, s.shape[0]), np.float64)
            self.counts[name] = np.zeros(n_rows, np.float64)
        self.sums[name][row] += s
        self.counts[name][row] += x.shape[0]

    def _register(self, mname: str, mod, process_output: bool) -> None:
        import torch  # noqa: PLC0415  (heavy: the transformers model runs in torch)

        cls = type(mod).__name__
        if isinstance(mod, torch.nn.Linear):
            try:
                gname = Q.gguf_name(mname + ".weight")
            except ValueError:
                return
            if not (gname.startswith("blk.") or (process_output and gname == "output.weight")):
                return  # llama-imatrix collects blk.* (and output.weight on request) only
            if gname.endswith("ssm_out.weight") and self.perm is not None:
                perm = torch.from_numpy(self.perm)
                self.hooks.append(mod.register_forward_pre_hook(lambda m, a, g=gname: self.add(g, a[0][..., perm])))
            else:
                self.hooks.append(mod.register_forward_pre_hook(lambda m, a, g=gname: self.add(g, a[0])))
        elif cls.endswith("TopKRouter"):
            gname = Q.gguf_name(mname + ".weight")
            self.hooks.append(mod.register_forward_pre_hook(lambda m, a, g=gname: self.add(g, a[0])))
        elif cls.endswith("Experts") and hasattr(mod, "gate_up_proj"):
            layer = int(mname.split(".")[2])
            self.hooks.append(mod.register_forward_pre_hook(lambda m, a, layer=layer: self._experts(m, a, layer)))

    def _experts(self, m, a, layer: int) -> None:
        """Routed experts: gate and up see the routed hidden states, down sees ``act(gate) * up``; one row
        per expert, counted in (token, slot) pairs; an expert never chosen keeps count 0."""
        import torch  # noqa: PLC0415  (heavy: the transformers model runs in torch)

        h, idx = a[0].detach(), a[1]
        n_exp = m.num_experts
        names = [Q.expert_gguf_name(layer, p) for p in Q.EXPERT_PROJS]
        for e in range(n_exp):
            tok = (idx == e).nonzero()[:, 0]
            if tok.numel() == 0:
                for nm in names:  # make sure the entry exists with count 0
                    if nm not in self.sums:
                        dim = m.intermediate_dim if nm.endswith("down_exps.weight") else m.hidden_dim
                        self.sums[nm] = np.zeros((n_exp, dim), np.float64)
                        self.counts[nm] = np.zeros(n_exp, np.float64)
                continue
            x = h[tok]
            self.add(names[0], x, e, n_exp)
            self.add(names[1], x, e, n_exp)
            gate, up = torch.nn.functional.linear(x, m.gate_up_proj[e]).chunk(2, dim=-1)
            self.add(names[2], m.act_fn(gate) * up, e, n_exp)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()

    def entries(self) -> dict[str, ImatrixEntry]:
        out = {}
        for name in sorted(self.sums):
            s = self.sums[name]
            if not np.isfinite(s).all():
                raise NexlabError(f"non-finite activations detected in {name}")
            out[name] = ImatrixEntry(s.astype(np.float32), self.counts[name].astype(np.float32))
        return out

"""nexlab: a research workbook for NVFP4 quantization of mixture-of-experts models for llama.cpp.

Layered sub-packages, lowest first; each imports only those below it (import-linter checks it, see
pyproject.toml [tool.importlinter] and CONTRIBUTING.md; notebooks/README.md lists the chapters):

1. core: the one bad-input error (NexlabError), atomic file writes, progress bars, text helpers
2. formats: numpy codecs: minifloats, NVFP4, MXFP4 / INT4, Q8_0 and K-quants, NVFP4 scale rules, the type registry
3. ggufio: GGUF I/O: layout and sizes, header checks, the streaming writer, metadata, anatomy, inspect, imatrix files
4. model: qwen35moe: configs, hyper-parameters, names / transforms / tensor plan, type mixes, mmproj plan, checkpoints
5. convert: checkpoint -> GGUF: the text model (``nexlab convert``) and the vision tower's mmproj
6. llamacpp: llama.cpp itself: source tree and reference converter, tools, llama-server, runtime, libggml's oracle
7. analysis: memory, roofline, benchmarks, quality, llama.cpp vs transformers, imatrix collection, mtmd, speed
8. artifacts: the workbook's models: tiny, its ModelOpt checkpoints, slice, tiny VL, training, corpus, synthetic
9. chapters (chNN.py: one notebook's helpers) and workbook (parameters, results, records, README, the runner)
10. cli: the ``nexlab`` command

Why the cuts are there: the lowest layers (core, then formats) are plain helpers and pure numpy
codecs, each codec testable bit for bit against libggml, ModelOpt, gguf-py or ml_dtypes without a
model or a file. GGUF I/O knows no model, so any architecture can use it. The model layer knows
qwen35moe but no llama.cpp. llama.cpp's tools sit above the converter, which never needs them:
llama.cpp only checks what nexlab wrote. Analysis uses llama.cpp (and transformers) as the engine it
measures with. Artifacts build the workbook's models and may use any layer below. Chapters and the
workbook sit on top, the ``nexlab`` command above them.
"""

__version__ = "0.1.0"

import logging as _logging


class _NoCpuKernelNotice(_logging.Filter):
    """transformers tells once per process that the CUDA kernel packages ``causal_conv1d`` and
    ``flash-linear-attention`` are missing and it uses their PyTorch reference instead. Without a GPU
    that reference is the only possible path, so the notice is noise in every chapter's output; with
    a GPU it is kept."""

    def filter(self, record: _logging.LogRecord) -> bool:
        if "is falling back to its reference PyTorch implementation" not in record.getMessage():
            return True
        import torch  # noqa: PLC0415  (already imported by transformers when it logs this)

        return bool(torch.cuda.is_available())


_logging.getLogger("transformers.integrations.hub_kernels").addFilter(_NoCpuKernelNotice())

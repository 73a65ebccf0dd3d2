"""nexlab: a research workbook for NVFP4 quantization of mixture-of-experts models for llama.cpp.

One module per stage of the pipeline (see notebooks/README.md for the chapters):

- formats / nvfp4: E2M1, E4M3, UE4M3, E8M0 codecs; NVFP4 (ModelOpt and ggml layouts), MXFP4, INT4
- ggml_ref: ctypes access to libggml's C quantizers (the bit-exact oracle)
- config / models: Nex-N2-mini, tiny and slice configurations; tokenizer, training, ModelOpt checkpoints
- qwen35moe: the one model of the architecture (hyper-parameters, GGUF names, HF -> GGUF transforms,
  metadata, the tensor plan of every variant); vision: the mmproj's tensor plan
- checkpoint / convert / chat_template / gguf_inspect / gguf_layout: ModelOpt checkpoint -> qwen35moe GGUF
- kquants / imatrix / quantize: Q8_0, Q4_K, Q5_K, Q6_K, importance matrices, llama-quantize's type mixes
- memory: weights, KV-cache and recurrent-state sizing; mmproj: the vision tower's GGUF
- scales: NVFP4 scale rules (ModelOpt's max, Four Over Six, nexlab's search) for BF16 experts
- bench / roofline: llama.cpp's benchmarks and the bytes-and-flops model that explains them
- anatomy / params / gguf_check / synth: file anatomy for the chapters, parameter checks, GGUF
  validation, full-size synthetic checkpoints
- llamacpp: llama.cpp itself (its converter as the reference, its tools, the model wrapper, the
  allocation probe); reference / quality: llama.cpp against transformers
- results / progress / workbook / cli: notebook plumbing and the `nexlab` command
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

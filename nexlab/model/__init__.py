"""nexlab.model: the qwen35moe architecture and its checkpoints, with no llama.cpp in sight.

- config: Nex-N2-mini, tiny and slice configurations, structural checks, parameter counts
- hparams: qwen35moe hyper-parameters in llama.cpp's names, from config.json or a GGUF
- qwen35moe: GGUF tensor names, HF -> GGUF transforms, ``qwen35moe.*`` metadata, the tensor plan
- mixes: llama-quantize's per-tensor type choice for the q4_k_m / q8_0 / bf16 variants
- vision: the mmproj's tensor plan (the vision tower as llama.cpp's converter writes it)
- checkpoint: safetensors / ModelOpt checkpoint reading and validation
- tokenizer: the byte-level BPE and llama.cpp's pre-tokenizer names
- vocab: the tokenizer's ``tokenizer.ggml.*`` metadata
- chat_template: the embedded chat template, the seed's thinking bug and its fix

May import :mod:`nexlab.ggufio`, :mod:`nexlab.formats` and :mod:`nexlab.core`.
"""

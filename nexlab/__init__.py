"""nexlab: a research workbook for NVFP4 quantization of mixture-of-experts models for llama.cpp.

One module per stage of the pipeline (see notebooks/README.md for the chapters):

- formats / nvfp4: E2M1, E4M3, UE4M3, E8M0 codecs; NVFP4 (ModelOpt and ggml layouts), MXFP4, INT4
- ggml_ref: ctypes access to libggml's C quantizers (the bit-exact oracle)
- config / models: Nex-N2-mini, tiny and slice configurations; tokenizer, training, ModelOpt checkpoints
- qwen35moe: the one model of the architecture (hyper-parameters, GGUF names, HF -> GGUF transforms,
  metadata, the tensor plan of every variant); vision: the mmproj's tensor plan
- checkpoint / convert / chat_template / gguf_inspect / gguf_layout: ModelOpt checkpoint -> qwen35moe GGUF
- kquants / imatrix / quantize: Q8_0, Q4_K, Q5_K, Q6_K, importance matrices, llama-quantize's type mixes
- memory: weights, KV-cache and recurrent-state sizing
- llamacpp: llama.cpp itself (its converter as the reference, its tools, the model wrapper, the
  allocation probe); reference / quality: llama.cpp against transformers
- results / progress / workbook / cli: notebook plumbing and the `nexlab` command
"""

__version__ = "0.1.0"

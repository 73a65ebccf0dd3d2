"""nexlab.analysis: measurements and models that use llama.cpp (and transformers) as the engine.

- memory: weights, KV-cache, recurrent-state and mmproj sizing, as llama.cpp allocates them
- roofline: the bytes-and-flops model of a decode step, and the tiny model's measured routing
- bench: llama-bench / llama-batched-bench runs and records, ``nexlab bench`` and ``nexlab stock``
- quality: KL divergence, top-1 agreement and perplexity of GGUF variants through llama.cpp
- reference: llama.cpp's logits against transformers' reference model
- imatrix: the importance-matrix collector inside llama.cpp, llama-imatrix as its reference, ``nexlab imatrix``
- imatrix_torch: the same statistics from transformers' reference model (small models only)
- mtmd: image embeddings through transformers and libmtmd, ``llama-mtmd-cli``
- speed: nexlab against libggml's C and against llama.cpp's converter, timed

May import :mod:`nexlab.llamacpp` and everything below it.
"""

"""nexlab.formats: numpy codecs of the number formats, each bit-exact with its reference.

- minifloat: E2M1, E4M3, UE4M3, E8M0 and BF16 codecs and the formats' constants
- nvfp4: NVFP4 in ModelOpt's and ggml's layouts, and the lossless ModelOpt -> ggml repack
- mxfp4: MXFP4 (ggml layout) and INT4-g16, the formats NVFP4 is compared with
- kquants: Q8_0, Q4_K, Q5_K, Q6_K layouts, quantize / dequantize as ``ggml_quantize_chunk``
- kquant_search: ggml's scale searches (make_qx_quants, make_qkx, make_qp_quants, nearest_int)
- scales: NVFP4 scale rules for BF16 weights (ModelOpt's max, Four Over Six, nexlab's search)
- registry: encode a float tensor into a ggml type's bytes (the converters' one entry point)
- metrics: error metrics (relative MSE, SQNR)

May import :mod:`nexlab.core` only: pure array code, testable against libggml, ModelOpt, gguf-py
and ml_dtypes without a model or a file.
"""

"""nexlab.ggufio: GGUF files, read, validated, sized and written, without knowing any model.

- layout: where a GGUF's bytes go; gguf-py's writer set up from a plan, exact sizes, TensorSpec
- check: the header walker every reader runs first (one error line for a damaged file)
- writer: PlannedTensor, the atomic, streaming :func:`~nexlab.ggufio.writer.write_gguf` and
  :func:`~nexlab.ggufio.writer.write_plan`, the one driver of the text and mmproj converters
- gguf_internals: the one module that touches gguf-py's writer internals
- metadata: the ``general.*`` keys of every file nexlab writes
- regions: a file's anatomy region by region, and a hex dump
- inspector: ``nexlab inspect FILE.gguf`` (metadata, tensor table, totals per type)
- imatrix_file: llama.cpp's GGUF imatrix format and llama-quantize's column weights

May import :mod:`nexlab.formats` and :mod:`nexlab.core`.
"""

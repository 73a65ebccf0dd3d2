"""nexlab.artifacts: the workbook's models, built once into ``ARTIFACTS_DIR`` and reused.

- checkpoints: the sharded safetensors writer and checkpoint helpers
- modelopt: the real ModelOpt NVFP4 export, and its semantics for models too big for it
- tiny: the trained tiny model and its ModelOpt checkpoints (:func:`~nexlab.artifacts.tiny.ensure_tiny`)
- slice: the full-width slice (real per-layer shapes, one period)
- tiny_vl: the tiny vision-language checkpoint and a test image
- train: training the tiny model on CPU
- corpus: the standard-library text splits and tokenizer training
- synth: full-size synthetic checkpoints (``nexlab synth``)

May import :mod:`nexlab.analysis` and everything below it.
"""

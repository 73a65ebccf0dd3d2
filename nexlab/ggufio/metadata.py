"""The ``general.*`` key/values every GGUF nexlab writes, model or mmproj.

:func:`add_general_metadata` adds ``general.type`` (``model``, or ``mmproj`` for the vision tower),
``general.name``, the size label (from gguf-py's ``size_label`` over the writer's parameter count),
``general.license``, ``general.quantized_by`` and the source URL, in the order llama.cpp's
``convert_hf_to_gguf.py`` writes them, so the text converter (:mod:`nexlab.convert.text`) and the
mmproj writer (:mod:`nexlab.convert.mmproj`) share one copy. Architecture keys belong to the model
layer (:func:`nexlab.model.qwen35moe.add_metadata`).
"""

from __future__ import annotations

import gguf


def add_general_metadata(w, *, name: str, license: str, quantized_by: str, source_url: str | None,
                      gguf_type: str | None = None) -> None:
    """general.type (``model``, or ``gguf_type``: ``mmproj``), name, size label, license, quantized_by
    and source URL, in the order llama.cpp's converter writes them."""
    g = gguf
    w.add_type(gguf_type or g.GGUFType.MODEL)
    w.add_name(name)
    total, shared, expert, n_exp = w.get_total_parameter_count()
    w.add_size_label(g.size_label(total, shared, expert, n_exp))
    w.add_license(license)
    w.add_quantized_by(quantized_by)
    if source_url:
        w.add_source_url(source_url)

"""nexlab.convert: checkpoint -> GGUF, the converters that attach producers to the model's plans.

- plan: the text model's tensor plan with a producer per tensor (repack, transform, encode)
- text: the qwen35moe converter, exact size prediction and ``nexlab convert``
- mmproj: the vision tower's mmproj GGUF (``nexlab convert --mmproj``)

May import :mod:`nexlab.model`, :mod:`nexlab.ggufio`, :mod:`nexlab.formats` and :mod:`nexlab.core`;
it never needs llama.cpp, which only checks its output.
"""

"""Checks of each chapter's papermill parameters, called at the top of its setup cell.

papermill injects parameters as plain assignments, so a typo (``VARIANT = "q4km"``), a negative
length or a missing folder would otherwise surface minutes later as an unrelated traceback deep in
the chapter. :func:`check_parameters` checks every parameter of a chapter against :data:`CHAPTERS`
and stops the chapter at once with :class:`ParameterError`, one message naming each bad parameter,
its value and what it must be (papermill shows it as the failed cell's error).

A chapter's parameters cell and its entry here must list the same names (a test compares them):
adding a parameter to a notebook means adding its rule here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from nexlab.core.errors import NexlabError
from nexlab.core.text import parse_int_list

Rule = Callable[[Any], "str | None"]  # None when the value is fine, else what it must be


class ParameterError(NexlabError):
    """A chapter parameter with a value the chapter cannot run with."""


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be True or False"


def integer(minimum: int = 0) -> Rule:
    def rule(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            return f"must be an integer >= {minimum}"
        return None
    return rule


def number(minimum: float = 0.0) -> Rule:
    def rule(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= minimum:
            return f"must be a number >= {minimum:g}"
        return None
    return rule


def multiple_of(step: int, minimum: int) -> Rule:
    def rule(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum or v % step:
            return f"must be a multiple of {step}, at least {minimum}"
        return None
    return rule


def one_of(*choices: str) -> Rule:
    def rule(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(map(repr, choices))}"
    return rule


def folder(v: Any) -> str | None:
    """A folder the chapter writes to (created when missing): a non-empty path not naming a file."""
    if not isinstance(v, (str, Path)) or not str(v).strip():
        return "must be a folder path (str)"
    if Path(v).exists() and not Path(v).is_dir():
        return "names a file, not a folder"
    return None


def existing_folder(v: Any) -> str | None:
    """A folder the chapter reads (a checkpoint): it must exist."""
    if (msg := folder(v)) is not None:
        return msg
    return None if Path(v).is_dir() else "does not exist"


def int_list(v: Any) -> str | None:
    """Comma-separated positive integers (``"1,2"``), as the bench options take them."""

    try:
        parse_int_list(v, "value")
    except (ValueError, TypeError):
        return "must be positive integers separated by commas, e.g. '1,2'"
    return None


def optional(rule: Rule) -> Rule:
    """None (the chapter's smoke / full default) or a value ``rule`` accepts."""
    def check(v: Any) -> str | None:
        msg = rule(v)
        return None if v is None or msg is None else f"{msg} (or None for the default)"
    return check


_COMMON: dict[str, Rule] = {"SMOKE": boolean, "SEED": integer(0), "OUTPUT_DIR": folder, "ARTIFACTS_DIR": folder}


_VARIANTS = ("bf16", "q8_0", "q4_k_m")


#: every chapter's parameters and their rules, in the order of its parameters cell
CHAPTERS: dict[str, dict[str, Rule]] = {
    "00_models": {**_COMMON, "SLICE_VOCAB": integer(1), "WRITE_SLICE": boolean},
    "01_nvfp4_numerics": {**_COMMON, "N_VALUES": integer(0), "BENCH_ROWS": integer(0),  # 0: smoke / full default
                          "BENCH_COLS": multiple_of(64, 0), "BENCH_REPEAT": integer(0)},
    "02_checkpoint_repacking": {**_COMMON, "LAYER": integer(0)},
    "03_gguf_writing": {**_COMMON, "N_POSITIONS": integer(128), "RUN_REFERENCE_CONVERTER": boolean,
                        "RUN_BENCHMARK": boolean},
    "04_imatrix_quantization": {**_COMMON, "IMATRIX_CHUNK": integer(1), "IMATRIX_CHUNKS": integer(0),
                                "EVAL_CHUNK": integer(1), "EVAL_CHUNKS": integer(0), "LLAMA_THREADS": integer(1),
                                "BENCH_ROWS": integer(0)},
    "05_kv_cache_sizing": {**_COMMON, "VARIANT": one_of(*_VARIANTS), "RESERVE_GIB": number(0.0),
                           "MMPROJ_DTYPE": one_of("f16", "bf16", "f32"), "VERIFY_WITH_LLAMA": boolean},
    "06_throughput": {**_COMMON, "THREADS": int_list, "PARALLEL": int_list, "REPS": integer(1),
                      "DEPTH": integer(0)},
    "07_better_nvfp4_scales": {**_COMMON, "LAYER": integer(0), "IMATRIX_CHUNKS": integer(1),
                               "EVAL_CHUNK": integer(16), "EVAL_CHUNKS": optional(integer(1)),
                               "LLAMA_THREADS": integer(1)},
}


def check_parameters(chapter: str, namespace: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``chapter``'s parameters in ``namespace`` (a notebook passes ``globals()``).

    Returns ``{name: value}`` of the chapter's parameters; raises :class:`ParameterError` naming every
    missing or bad one (``"notebook 05_kv_cache_sizing: parameter VARIANT = 'q5' must be one of ..."``).
    """
    if chapter not in CHAPTERS:
        raise ParameterError(f"unknown chapter {chapter!r}; nexlab.workbook.params knows {', '.join(CHAPTERS)}")
    bad = []
    for name, rule in CHAPTERS[chapter].items():
        if name not in namespace:
            bad.append(f"parameter {name} is missing")
        elif (msg := rule(namespace[name])) is not None:
            bad.append(f"parameter {name} = {namespace[name]!r} {msg}")
    if bad:
        raise ParameterError(f"notebook {chapter}: " + "; ".join(bad))
    return {name: namespace[name] for name in CHAPTERS[chapter]}

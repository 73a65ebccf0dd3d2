"""The ``nexlab`` command.

Subcommands live next to the code they drive: each module listed in
``_SUBCOMMAND_MODULES`` defines ``register_cli(subparsers)``, which adds its
parser(s) and sets ``func`` (called with the parsed ``argparse.Namespace``,
returning an exit code). A module that is missing or fails to import is skipped,
so one broken stage never hides the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_SUBCOMMAND_MODULES = (
    "nexlab.workbook",      # nexlab workbook
    "nexlab.convert",       # nexlab convert
    "nexlab.mmproj",        # nexlab convert --mmproj (after nexlab.convert)
    "nexlab.gguf_inspect",  # nexlab inspect
    "nexlab.imatrix",       # nexlab imatrix
    "nexlab.memory",        # nexlab memory
    "nexlab.llamacpp",      # nexlab setup
    "nexlab.synth",         # nexlab synth
    "nexlab.bench",         # nexlab bench, stock, bandwidth
    "nexlab.roofline",      # nexlab roofline
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nexlab", description="NVFP4 mixture-of-experts workbook for llama.cpp")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            if exc.name != name:  # the module exists but one of its imports failed: say so
                print(f"nexlab: warning: {name} unavailable ({exc})", file=sys.stderr)
            continue
        register = getattr(module, "register_cli", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError, KeyError, RuntimeError) as exc:  # one line, no traceback
        print(f"nexlab {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: child processes are stopped and temporary files removed on the way out
        print(f"nexlab {args.command}: interrupted; no partial output was left", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

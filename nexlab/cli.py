"""The ``nexlab`` command: one subcommand per stage, each registered by the module that runs it.

Each module below defines ``register_cli(subparsers)``, which adds its parser(s) and sets ``func``
(called with the parsed ``argparse.Namespace``, returning an exit code). The imports are explicit, so
a broken module fails the command loudly instead of silently losing its subcommand.

Errors: a :class:`nexlab.core.errors.NexlabError` (bad input: it names the parameter, file or tensor)
or an OSError (a missing file, a full disk) is printed as one line and exits 1; Ctrl-C exits 130 after
child processes are stopped and temporary files removed; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import sys

from nexlab.analysis import bench, imatrix, memory, roofline
from nexlab.artifacts import synth
from nexlab.convert import text
from nexlab.core.errors import NexlabError
from nexlab.ggufio import inspector
from nexlab.llamacpp import build
from nexlab.workbook import readme, runner

_SUBCOMMANDS = (
    runner,     # nexlab workbook
    text,       # nexlab convert (text model, or the vision tower with --mmproj)
    inspector,  # nexlab inspect
    imatrix,    # nexlab imatrix
    memory,     # nexlab memory
    build,      # nexlab setup
    synth,      # nexlab synth
    bench,      # nexlab bench, stock, bandwidth
    roofline,   # nexlab roofline
    readme,     # nexlab readme: README.md's measured figures from data/results/
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nexlab", description="NVFP4 mixture-of-experts workbook for llama.cpp")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _SUBCOMMANDS:
        module.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (NexlabError, OSError) as exc:  # bad input or the environment: one line, no traceback
        print(f"nexlab {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: child processes are stopped and temporary files removed on the way out
        print(f"nexlab {args.command}: interrupted; no partial output was left", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

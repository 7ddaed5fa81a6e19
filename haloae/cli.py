"""The one runner every console script goes through (core: stdlib only).

    def main(argv=None) -> int:
        return cli.run("haloae-train", _main, argv)

- `UserError` -> ``<prog>: error: <message>`` on stderr, exit 2 (no traceback);
- `Failure` -> ``<prog>: failed: <message>``, exit 1 (no traceback);
- `KeyboardInterrupt` -> ``<prog>: interrupted``, exit 130; a closed output pipe
  (``haloae-config | head``) -> exit 0, quietly;
- anything else is a bug: its traceback is printed and the exit code is 1.

`add_version` gives a parser ``--version``. Set ``HALOAE_TRACEBACK=1`` to see the traceback of
a user error or failure too.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, Optional, Sequence

from . import __version__
from .errors import EXIT_FAILED, EXIT_INTERRUPTED, Failure, UserError


def add_version(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--version`` (prints ``<prog> <version>`` and exits 0)."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def run(prog: str, body: Callable[[Optional[Sequence[str]]], Optional[int]],
        argv: Optional[Sequence[str]] = None, interrupted_hint: str = "") -> int:
    """Run ``body(argv)`` and turn what it raises into one line and an exit code."""
    show = os.environ.get("HALOAE_TRACEBACK") == "1"
    try:
        code = body(argv)
        return 0 if code is None else int(code)
    except UserError as exc:
        if show:
            traceback.print_exc()
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Failure as exc:
        if show:
            traceback.print_exc()
        print(f"{prog}: failed: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `haloae-config | head`: the reader left, nothing is wrong
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python flushes stdout at exit
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{'; ' + interrupted_hint if interrupted_hint else ''}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit:
        raise  # argparse's own exits (--help, --version, usage errors)
    except Exception:  # a bug: never dressed up as bad input
        traceback.print_exc()
        print(f"{prog}: internal error (a bug, not your input): please report the traceback "
              "above", file=sys.stderr)
        return EXIT_FAILED

"""``haloae-config``: list the configs shipped in the package and write one out to edit.

After ``pip install haloae`` there is no ``configs/`` folder to copy from; this prints (or
writes) the shipped example, comments included, e.g. the edge daemon's
``haloae-config edge/one-camera --out /etc/haloae/line1.yaml``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import cli, named_configs
from .errors import UserError

EXAMPLES = """examples:
  haloae-config                                   # list the shipped configs
  haloae-config edge/one-camera > line1.yaml      # an edge daemon config to edit
  haloae-config edge/one-camera --out /etc/haloae/line1.yaml
  haloae-config train/mtd-edge --out my-run.yaml  # a training config to start from

Model and training configs are also used by name: `model: edge` in a training config,
`haloae-train --config tiny`.
"""


class ConfigNotFound(UserError):
    """No shipped config has that name."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="haloae-config", description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help="KIND/NAME, e.g. edge/one-camera (none: list them)")
    p.add_argument("--out", type=Path, help="write the config to this file (it must not exist)")
    cli.add_version(p)
    return p


def _main(argv: Optional[Sequence[str]]) -> int:
    args = _parser().parse_args(argv)
    available = named_configs.all_names()
    if args.name is None:
        print("\n".join(available))
        return 0
    try:
        text = named_configs.read_text(args.name)
    except KeyError:
        raise ConfigNotFound(f"no shipped config {args.name!r}; use one of: {', '.join(available)}") from None
    if args.out is None:
        sys.stdout.write(text)
        return 0
    if args.out.exists():
        raise UserError(f"--out {args.out} exists; remove it or choose another file (nothing overwritten)")
    try:
        args.out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"--out {args.out}: cannot write ({exc.strerror}); use a writable folder") from None
    print(f"haloae-config: wrote {args.out}", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run("haloae-config", _main, argv)


if __name__ == "__main__":
    sys.exit(main())

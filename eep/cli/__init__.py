"""The applications on top of every layer: the ``eep`` console script (``eep demo``, ``eep launch``),
the demo, and the answer check against the reference (docs/design.md "Layers")."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"demo": "eep.cli.demo", "launch": "eep.cli.launch"}
    if not argv or argv[0] not in commands:
        print(f"usage: eep {{{','.join(commands)}}} [options]", file=sys.stderr)
        return 2
    import importlib
    return importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

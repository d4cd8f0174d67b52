"""The applications on top of every layer: the ``eep`` console script (``eep demo``, ``eep launch``,
``eep build-gemm``), the demos (CPU and GPU) and the answer checks (docs/design.md "Layers")."""

from __future__ import annotations

import sys

from eep.cli.options import CliError, Parser, fail
from eep.errors import EEPError

DESCRIPTION = """\
eep keeps a Mixture-of-Experts serving instance alive when one of its expert-parallel ranks dies:
the instance shrinks around the dead rank, restores its experts, and takes it back once restarted.
"""


def build_parser() -> Parser:
    from eep.cli import build_gemm, demo, launch

    parser = Parser(prog="eep", description=DESCRIPTION,
                    epilog="Run 'eep COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"eep {_version()}")
    commands = parser.add_subparsers(title="commands", dest="command", parser_class=Parser)
    demo.add_parser(commands)
    launch.add_parser(commands)
    build_gemm.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = next(a for a in parser._actions if a.dest == "command")
    if args.command is None:
        parser.print_help(sys.stderr)
        fail("a command is required: " + ", ".join(commands.choices))
    try:
        return args.run(args)
    except CliError as exc:
        fail(str(exc))
    except (EEPError, OSError) as exc:  # bad input found while running, or the machine refused (a port, a disk)
        fail(f"{type(exc).__name__}: {exc}", code=1)
    except KeyboardInterrupt:
        print("eep: interrupted", file=sys.stderr)
        return 130


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("eep")
    except PackageNotFoundError:
        return "(not installed)"


if __name__ == "__main__":
    sys.exit(main())

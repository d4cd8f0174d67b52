"""What every ``eep`` subcommand shares: the parser that fails in one line, and argument types."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from eep.runtime.control.launcher import Fault


class CliError(Exception):
    """A bad argument found after parsing (e.g. a rank outside ``--ranks``): ``eep: error: ...``, exit 2."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``eep: error: ...`` (exit 2), with a pointer
    to the subcommand's help instead of the usage block; every option's default is in its help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", lambda prog: HelpFormatter(prog, max_help_position=30))
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see '{self.prog} --help')")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option's help; descriptions keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        # "(default: None)" and "(default: False)" say nothing a reader can use
        if action.default in (None, False, []) or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"eep: error: {message}", file=sys.stderr)
    sys.exit(code)


def int_at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def seconds(text: str) -> float:
    """An argparse type: a duration in seconds, >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be a duration >= 0, got {text}")
    return value


def positive_seconds(text: str) -> float:
    value = seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def fault_spec(action: str):
    """An argparse type for ``RANK@ANSWERS``: ``action`` ``RANK`` once ``ANSWERS`` requests are answered."""
    def parse(text: str) -> Fault:
        rank, sep, at = text.partition("@")
        try:
            if not sep:
                raise ValueError
            fault = Fault(action, int(rank), at_results=int(at))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not RANK@ANSWERS, e.g. 1@100") from None
        if fault.rank < 0 or fault.at_results < 0:
            raise argparse.ArgumentTypeError(f"{text!r}: RANK and ANSWERS must be >= 0")
        return fault
    return parse


def check_faults(faults: list[Fault], *, num_ranks: int, num_requests: int) -> None:
    """Raise ``CliError`` for a fault on a rank the run does not have, or one that cannot fire
    (the run ends once ``num_requests`` answers are in)."""
    for f in faults:
        flag = f"--{f.action} {f.rank}@{f.at_results}"
        if f.rank >= num_ranks:
            raise CliError(f"{flag}: there is no rank {f.rank} (ranks are 0..{num_ranks - 1}, --ranks {num_ranks})")
        if f.at_results is not None and f.at_results >= num_requests:
            raise CliError(f"{flag}: the run ends once {num_requests} requests are answered (--requests), "
                           f"so this fault would never fire; use ANSWERS below {num_requests}")

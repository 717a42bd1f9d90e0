"""What every launcher in ``launch/`` does around its work: options in any order, user errors as one line.

    parser = launcher_parser(__doc__)
    parser.add_argument("--prompt", action="append", default=[])
    args = parse_args(parser, argv)          # --config, --prompt and key=value in any order
    return run_launcher(lambda: work(args))  # UserError -> "error: ..." + exit code; bugs keep the traceback
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from arra_ds import distributed
from arra_ds.config import describe_fields
from arra_ds.errors import UserError

BAD_INPUT_EXIT_CODE = 2


def launcher_parser(
    description: str | None, config_cls: type | None = None, config_help: str = "YAML file with the config's fields"
) -> argparse.ArgumentParser:
    """A parser with ``--config FILE`` and any number of ``key=value`` overrides; ``--help`` lists the
    keys of ``config_cls`` with their defaults."""
    epilog = "keys (key=value, in any order, also after other options):\n" + "\n".join(describe_fields(config_cls)) if config_cls else None
    parser = argparse.ArgumentParser(
        description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=None, help=config_help)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=20")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Options and ``key=value`` overrides intermixed in any order (argparse's plain ``parse_args``
    stops collecting positionals at the first option)."""
    return parser.parse_intermixed_args(argv)


def run_launcher(work: Callable[[], object]) -> int:
    """Run ``work``; its result is the exit code when it is an int (e.g. 75: preempted), else 0.

    A ``UserError`` prints ``error: <why>`` and returns its exit code (2 unless the
    error class sets ``exit_code``). Other exceptions propagate with their traceback. The process
    group is torn down either way, so a failing rank does not leave the others waiting until their
    collective timeout."""
    try:
        result = work()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return getattr(e, "exit_code", BAD_INPUT_EXIT_CODE)
    finally:
        distributed.destroy_process_group()
    return result if isinstance(result, int) and not isinstance(result, bool) else 0

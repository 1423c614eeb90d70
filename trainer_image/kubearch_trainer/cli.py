"""Command line: ``kubearch-train`` (= ``python -m kubearch_trainer`` = ``kubearch train``) and ``kubearch``.

Precedence: built-in defaults < ``--config FILE.yaml`` < flags actually given. Every flag defaults
to "not given" (``argparse.SUPPRESS``) so a flag never silently overrides the YAML with its own
default. The YAML has the sections of :class:`~kubearch_trainer.config.TrainConfig` (``model``,
``data``, ``training``) in camelCase or snake_case; a whole TrainingRun manifest works too (its
``spec`` is used).

Validation happens before any work (no model, no data, no process group): a bad value exits with
``ExitCode.CONFIG_ERROR`` and a line naming the field and the allowed values.

Subcommands of ``kubearch`` live in :data:`SUBCOMMANDS`; another package adds one with
:func:`register_subcommand` (e.g. the operator's helpers) without touching this file's parser code.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

# The flag table and its parsing live in args.py (shared with compare and the trial runner); these
# names are re-exported because callers and tests import them from here.
from kubearch_trainer.args import (  # noqa: F401
    _FLAGS,
    _IMAGE_FIELDS,
    _REG,
    _SEED_FLAGS,
    S,
    _check_architecture_available,
    _Parser,
    _snake,
    _snake_keys,
    add_train_arguments,
    config_from_args,
    import_plugins,
    read_yaml_config,
)
from kubearch_trainer.config import ConfigError, TrainConfig, load_config  # noqa: F401
from kubearch_trainer.exit_codes import ExitCode


def run_train(argv: Sequence[str] | None = None, prog: str = "kubearch-train") -> int:
    """Parse, validate, train; returns the exit code (tests call this in-process)."""
    parser = _Parser(prog=prog, description="Train one architecture (see README).")
    add_train_arguments(parser)
    ns = parser.parse_args(argv)
    return _train_from_namespace(ns, prog)


def _train_from_namespace(ns: argparse.Namespace, prog: str) -> int:
    try:
        cfg = config_from_args(ns)
    except ConfigError as err:
        print(f"{prog}: config error:\n  " + str(err).replace("\n", "\n  "), file=sys.stderr)
        _termination_message(
            {"status": "config_error", "exit_code": int(ExitCode.CONFIG_ERROR), "error": str(err)}
        )
        return int(ExitCode.CONFIG_ERROR)
    from kubearch_trainer.trainer import train

    results = train(cfg)
    return int(results["exit_code"])


def _termination_message(summary: dict[str, Any]) -> None:
    """Where ``KUBEARCH_TERMINATION_LOG`` points (the pod's /dev/termination-log), a < 4 KB JSON reason."""
    path = os.environ.get("KUBEARCH_TERMINATION_LOG")
    if path:
        import json

        summary["error"] = str(summary.get("error", ""))[:2000]
        with contextlib.suppress(OSError):  # a missing mount must not mask the config error
            Path(path).write_text(json.dumps(summary))


def train_main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of ``kubearch-train`` and ``python -m kubearch_trainer``."""
    sys.exit(run_train(argv))


# ------------------------------------------------------------------------------------ kubearch
@dataclass(frozen=True)
class Subcommand:
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {}


def register_subcommand(name: str, help: str, configure: Callable, run: Callable) -> None:
    """Add ``kubearch NAME``: ``configure(parser)`` adds arguments, ``run(args)`` returns the exit code."""
    SUBCOMMANDS[name] = Subcommand(help, configure, run)


def _configure_compare(p: argparse.ArgumentParser) -> None:
    from kubearch_trainer.compare import add_compare_arguments

    add_compare_arguments(p)


def _run_compare(ns: argparse.Namespace) -> int:
    from kubearch_trainer.compare import run_compare_from_args

    return run_compare_from_args(ns)


register_subcommand(
    "train",
    "train one architecture (same flags as kubearch-train)",
    add_train_arguments,
    lambda ns: _train_from_namespace(ns, "kubearch train"),
)
register_subcommand(
    "compare", "train several architectures the same way and compare them", _configure_compare, _run_compare
)


def _configure_search(p: argparse.ArgumentParser) -> None:
    from kubearch_operator.search.local import add_search_arguments

    add_search_arguments(p)


def _run_search(ns: argparse.Namespace) -> int:
    from kubearch_operator.search.local import run_search_from_args

    return run_search_from_args(ns)


def _configure_report(p: argparse.ArgumentParser) -> None:
    from kubearch_operator.search.local import add_report_arguments

    add_report_arguments(p)


def _run_report(ns: argparse.Namespace) -> int:
    from kubearch_operator.search.local import run_report_from_args

    return run_report_from_args(ns)


register_subcommand(
    "search",
    "run an ArchitectureSearch manifest with local trainer processes (kubearch search -f SEARCH.yaml)",
    _configure_search,
    _run_search,
)
register_subcommand(
    "report",
    "print and write the report of an ArchitectureSearch (from the cluster, or --file search.json)",
    _configure_report,
    _run_report,
)


def run_kubearch(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="kubearch", description="kubearch: train and compare architectures.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, command in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        command.configure(p)
    ns = parser.parse_args(argv)
    ns.argv = list(argv) if argv is not None else sys.argv[1:]  # for reports that quote the command
    if not ns.command:
        parser.print_help()
        return int(ExitCode.CONFIG_ERROR)
    return SUBCOMMANDS[ns.command].run(ns)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of ``kubearch``."""
    sys.exit(run_kubearch(argv))

"""The ``gradscope`` command: ``check`` a run like a linter, write its HTML ``report``, run the ``demo``.

Exit status of ``gradscope check``: 0 when no finding reaches ``--fail-on``, 1 when one does, 2 for
a usage error, a run that cannot be read, a run holding no step, or a ``--select``/``--ignore`` that
leaves no detector to run (with a one-line reason on stderr).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from gradscope._version import __version__
from gradscope.errors import GradscopeError

__all__ = ["OneLineParser", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

_DESCRIPTION = "Find out why a PyTorch training run is failing."
_EPILOG = """exit status of check: 0 no finding at or above --fail-on, 1 at least one, 2 usage error, unreadable run, run without steps
or no detector left by --select/--ignore.
examples:
  gradscope check runs/exp1
  gradscope check runs/exp1 --fail-on error --format github
  gradscope report runs/exp1 -o report.html
  gradscope demo"""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr, ``PROG: error: MESSAGE``, and exit status 2.

    ``--help`` still prints the full help. Every parser of the ``gradscope`` commands is one of these.
    """

    def error(self, message: str) -> NoReturn:
        # argparse prints its usage block first; CI logs and scripts read stderr as one line per error,
        # and the usage is one `--help` away.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {' '.join(message.split())}\n")


def _parser() -> argparse.ArgumentParser:
    from gradscope.checks import OutputFormat

    parser = OneLineParser(
        prog="gradscope", description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"gradscope {__version__}")
    # add_subparsers would default to type(parser) too; spelled out so that a change above cannot lose it.
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=OneLineParser)

    check = commands.add_parser(
        "check",
        help="diagnose a run and print its findings like a linter",
        description="Diagnose a run and print its findings, most severe first, with their fixes.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("run", metavar="RUN", help="run directory (the log_dir given to gradscope.Monitor)")
    check.add_argument(
        "--fail-on",
        choices=["info", "warning", "error"],
        default="warning",
        help="exit with status 1 when a finding is at or above this severity (default: warning)",
    )
    check.add_argument(
        "--format",
        dest="output",
        choices=[f.value for f in OutputFormat],
        default=OutputFormat.TEXT.value,
        help="text for people, json for scripts, junit for CI test reports, github for workflow annotations",
    )
    _add_selection(check)

    report = commands.add_parser(
        "report",
        help="write the HTML report of a run",
        description="Diagnose a run and write one self-contained HTML page (opens offline).",
    )
    report.add_argument("run", metavar="RUN", help="run directory (the log_dir given to gradscope.Monitor)")
    report.add_argument("-o", "--output", default="report.html", help="HTML file to write (default: report.html)")
    _add_selection(report)

    # The demo parses its own options; listed here so that it shows in --help.
    commands.add_parser("demo", help="train small models into runs with known problems, and diagnose them", add_help=False)
    commands.add_parser("preflight", help="check a model in seconds before training it (see docs/preflight.md)", add_help=False)
    return parser


def _add_selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--select", action="append", metavar="CODES", help="only these detector codes (comma-separated, repeatable)"
    )
    parser.add_argument("--ignore", action="append", metavar="CODES", help="skip these detector codes (comma-separated, repeatable)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``gradscope`` command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        if args_list[:1] == ["demo"]:
            # The demo parses its own options (and its own --help).
            return _demo(args_list[1:])
        if args_list[:1] == ["preflight"]:
            from gradscope.preflight_checks import main as preflight_main  # imports torch: only when asked

            return preflight_main(args_list[1:])
        args = _parser().parse_args(args_list)  # exits with 2 on usage errors, 0 on --help/--version
        if args.command == "check":
            return _check(args)
        return _report(args)
    except GradscopeError as e:
        return _fail(str(e))
    except OSError as e:
        # Writing the report or reading the run hit the file system (permissions, full disk, …).
        return _fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))
    except KeyboardInterrupt:
        return 130


def _fail(message: str) -> int:
    print(f"gradscope: error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_USAGE


def _selection(args: argparse.Namespace) -> tuple[list[str] | None, list[str] | None]:
    from gradscope.checks import parse_codes, require_detectors
    from gradscope.errors import InvalidInputError

    select, ignore = parse_codes(args.select), parse_codes(args.ignore)
    if select == []:
        raise InvalidInputError("expected detector codes after --select but got none; omit --select to run every detector")
    require_detectors(select, ignore, flag="--")
    return select, ignore


def _check(args: argparse.Namespace) -> int:
    from gradscope.checks import checked_codes, failing, format_findings
    from gradscope.detect.registry import diagnose
    from gradscope.store.run import load, require_steps

    select, ignore = _selection(args)
    run = require_steps(load(args.run), "check")  # no steps: nothing was measured, so it must not "pass"
    findings = diagnose(run, select=select, ignore=ignore)
    text = format_findings(
        findings, args.output, source=args.run, fail_on=args.fail_on, run=run, codes=checked_codes(select, ignore)
    )
    _write_stdout(text)
    return EXIT_FAILED if failing(findings, args.fail_on) else EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from gradscope.reporting import report

    select, ignore = _selection(args)
    path = report(args.run, args.output, select=select, ignore=ignore)
    _write_stdout(f"wrote {path}\n")
    return EXIT_OK


def _demo(argv: list[str]) -> int:
    try:
        demo = importlib.import_module("gradscope.demo")
    except ModuleNotFoundError as e:
        if e.name != "gradscope.demo":
            raise
        return _fail("the demo is not available in this installation of gradscope (gradscope.demo is missing); reinstall gradscope")
    status = demo.main(argv)
    return int(status) if status is not None else EXIT_OK


def _write_stdout(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # `gradscope check … | head`: the reader left; the exit status still tells the verdict.
        # Point stdout at /dev/null so that the interpreter's final flush does not complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())

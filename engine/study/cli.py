"""`python -m engine.study STUDY.yaml [--print [FILE] | --report]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine import config
from engine.errors import UserError
from engine.study.cells import cells, finished
from engine.study.check import check
from engine.study.report import write_report
from engine.study.runner import print_commands, run
from engine.study.spec import Study, load


def main(argv: list[str] | None = None) -> int:
    """Command line: run, --print or --report; user errors exit 2 with one line."""
    parser = argparse.ArgumentParser(
        prog="python -m engine.study",
        description="Run a study: every cell of a grid of recipe overrides, for every seed.\n"
        "Every cell's recipe is loaded first, as engine.run would load it (also for --print):\n"
        "a problem stops the study before anything runs, with exit code 2 and one line naming\n"
        "the cell and the key.",
        epilog="study file keys:\n" + "\n".join(config.describe(Study)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("study", help="study YAML file")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--print",
        nargs="?",
        const="-",
        metavar="FILE",
        help="print one command per unfinished cell (to FILE if given) instead of running; "
        "cells are checked unless they use variables not set here",
    )
    mode.add_argument("--report", action="store_true", help="only rewrite study.md and study.png")
    args = parser.parse_args(argv)
    try:
        study = load(args.study)
        all_cells = cells(study)
        if not args.report:
            check(study, elsewhere=bool(args.print))  # every cell's recipe, before any runs
        if args.print:
            text = print_commands(study, all_cells)
            if args.print == "-":
                sys.stdout.write(text)
            else:
                Path(args.print).write_text(text)
                todo = sum(not finished(study, c.name) for c in all_cells)
                print(f"{todo} of {len(all_cells)} cells to run: commands written to {args.print}")
            return 0
        if args.report:
            write_report(study, all_cells)
            print(Path(study.out) / "study.md")
            return 0
        return run(study, all_cells)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

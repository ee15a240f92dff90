"""Studies: a base recipe x a grid of overrides x seeds, run cell by cell as `engine.run`
subprocesses (or printed as cluster commands), summarised in study.md and study.png.

    python -m engine.study STUDY.yaml            run every unfinished cell, then write the report
    python -m engine.study STUDY.yaml --print    one command per cell instead (or --print FILE)
    python -m engine.study STUDY.yaml --report   only rewrite study.md and study.png

Each cell is `python -m engine.run BASE overrides... seed=S run.dir=OUT/CELL run.resume=auto`, so a
killed study continues where it stopped and finished cells (summary.json) are skipped. A bad study
file, or a cell whose recipe would not load (checked for every cell before any runs, also for
--print), ends with exit code 2 and one line naming the cell and key; a cell that fails while it
runs is reported and the study goes on, exiting 1 at the end.

Modules: spec (the study file), cells (the grid as engine commands), check (every cell's recipe,
before anything runs), runner (running them, or --print), report (study.md, study.json), chart
(study.png), cli (the command line).
"""

from engine.study.cells import Cell, cells, command, finished
from engine.study.chart import ChartData, chart, chart_data
from engine.study.check import check
from engine.study.cli import main
from engine.study.report import rows, table_markdown, write_report
from engine.study.runner import print_commands, run
from engine.study.spec import Chart, Launch, PrepareCell, Study, axes, load

__all__ = [
    "Cell",
    "Chart",
    "ChartData",
    "Launch",
    "PrepareCell",
    "Study",
    "axes",
    "cells",
    "chart",
    "chart_data",
    "check",
    "command",
    "finished",
    "load",
    "main",
    "print_commands",
    "rows",
    "run",
    "table_markdown",
    "write_report",
]

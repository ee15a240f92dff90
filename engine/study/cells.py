"""The cells of a study: prepare cells and grid points, once per seed, each one `engine.run`
command with its `${NAME.checkpoint}` references resolved to the same seed's runs.

The study's `set` goes to every cell, prepare cells included (so that a dense model is trained
with the model, data and schedule its grid cells assume), except its `stages` keys (a cell's
stages say what it does) and values that refer to prepare cells: those go to grid cells only.
A prepare cell's own `set` comes after the study's."""

from __future__ import annotations

import itertools
import json
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.config import YAMLLoader
from engine.study.spec import REF, Study, axes


@dataclass
class Cell:
    """One engine run: a prepare cell or a grid point, for one seed."""

    name: str  # folder under the study's out
    group: str  # the table row: the name without the seed
    labels: dict[str, str]  # axis -> label; {} for prepare cells
    seed: int
    recipe: str
    overrides: list[str]
    env: dict[str, str]
    needs: list[str] = field(default_factory=list)  # cells of the same seed that must finish


def cells(s: Study, runs: Callable[[str], Path] | None = None) -> list[Cell]:
    """Prepare cells (in order, per seed), then the grid (axis order, per seed). `runs` gives
    the run folder a `${NAME.checkpoint}` reference points into (default: OUT/NAME-sSEED; the
    check before a study points unfinished ones at stand-ins)."""
    out = Path(s.out)
    runs = runs or (lambda name: out / name)
    found = []
    grid = axes(s)
    shared = {k: v for k, v in s.set.items() if not grid_only(k, v)}
    for seed in s.seeds:
        for name, p in s.prepare.items():
            sets = {**shared, **p.set}
            found.append(_cell(name, {}, seed, p.base or s.base, sets, {}, out, runs))
    for labels in itertools.product(*grid.values()):
        named = dict(zip(grid, labels, strict=True))
        sets = dict(s.set)
        for axis, label in named.items():
            sets.update(grid[axis][label])
        group = "-".join(labels)
        found += [_cell(group, named, seed, s.base, sets, s.env, out, runs) for seed in s.seeds]
    return found


def grid_only(key: str, value: Any) -> bool:
    """A study `set` entry that prepare cells do not take: a `stages` key, or a value that
    refers to a prepare cell (which cannot use its own output)."""
    return key == "stages" or key.startswith("stages.") or bool(REF.search(json.dumps(value)))


def _cell(
    group: str,
    labels: dict,
    seed: int,
    recipe: str,
    sets: dict,
    env: dict,
    out: Path,
    runs: Callable[[str], Path],
) -> Cell:
    """A cell with its `${NAME.checkpoint}` references resolved to this seed's runs."""
    name = f"{group}-s{seed}"
    needs: list[str] = []

    def sub(m: re.Match) -> str:
        needs.append(f"{m.group(1)}-s{seed}")
        run = runs(needs[-1])
        return str(run / "checkpoints" / "last.pt" if m.group(2) == "checkpoint" else run)

    def resolve(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return REF.sub(sub, value) if isinstance(value, str) else value

    overrides = [f"{k}={_yaml(resolve(v))}" for k, v in sets.items()]
    overrides += [f"seed={seed}", f"run.dir={out / name}", "run.resume=auto", "log.progress=false"]
    resolved_env = {str(k): str(resolve(v)) for k, v in env.items()}
    return Cell(name, group, labels, seed, recipe, overrides, resolved_env, sorted(set(needs)))


def _yaml(value: Any) -> str:
    """A value as the engine's `key=value` overrides read it (YAML, one line)."""
    try:
        if isinstance(value, str) and yaml.load(value, YAMLLoader) == value:
            return value
    except yaml.YAMLError:
        pass  # quoted below
    return (
        yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip().removesuffix("\n...")
    )


def command(s: Study, cell: Cell, local: bool) -> list[str]:
    """The engine command of a cell; locally a leading `python` is this interpreter, and
    `torchrun` its torch.distributed.run (found without an activated environment)."""
    args = shlex.split(s.launch.command)
    if local and args[0] == "python":
        args[0] = sys.executable
    elif local and args[0] == "torchrun":
        args[:1] = [sys.executable, "-m", "torch.distributed.run"]
    return [*args, cell.recipe, *cell.overrides]


def finished(s: Study, name: str) -> bool:
    """The run of the cell `name` wrote summary.json."""
    return (Path(s.out) / name / "summary.json").is_file()


def waiting_for(s: Study, cell: Cell) -> list[str]:
    """The cells `cell` needs that have not finished."""
    return [n for n in cell.needs if not finished(s, n)]

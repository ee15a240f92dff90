"""The study file: its schema (typed dataclasses with help text), loading, and the checks the
types cannot make, including `${NAME.checkpoint}` / `${NAME.dir}` references to prepare cells.

Type checking, unknown-key suggestions and `--help` lines come from engine.config, so a study file
is read exactly like a recipe; only the messages say "study key".
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import config
from engine.config import opt
from engine.errors import UserError

NAME = re.compile(r"[A-Za-z0-9_.+-]+")
REF = re.compile(r"\$\{([A-Za-z0-9_.+-]+)\.(checkpoint|dir)\}")

Axes = dict[str, dict[str, dict[str, Any]]]  # {axis: {label: {dotted.key: value}}}


@dataclass
class PrepareCell:
    """A cell run before the grid, once per seed: e.g. the dense model the grid cells load."""

    base: str = opt("", "recipe file; empty = the study's base")
    set: dict = opt({}, "overrides of that recipe, `dotted.key: value`")


@dataclass
class Chart:
    """study.png: top-1 against one axis, one line per combination of the other axes."""

    x: str = opt("", "grid axis on the x axis (the retraining budget); empty = the last axis")


@dataclass
class Launch:
    """How a cell is started, here and in --print."""

    command: str = opt(
        "python -m engine.run",
        "the engine command, e.g. `torchrun --nproc_per_node=8 -m engine.run` ('python' runs "
        "this interpreter)",
    )
    sbatch: str = opt(
        "",
        "--print only: submit each cell with `sbatch <these options> --wrap CMD`, each job "
        "depending (afterok) on the prepare cells it uses",
    )


@dataclass
class Study:
    """A study file: the base recipe, the grid, the seeds, and where the runs go."""

    name: str = opt("", "study name; empty = the file name")
    base: str = opt("", "base recipe of the grid cells, relative to the current folder")
    out: str = opt("", "study folder: one run folder per cell; empty = runs/studies/<name>")
    seeds: list[int] = opt([0], "every cell runs once per seed (recipe key `seed`)")
    set: dict = opt(
        {},
        "overrides of every cell, `dotted.key: value`; prepare cells take them too (so that "
        "e.g. a shorter schedule.epochs or data.steps_per_epoch shrinks the dense runs as well), "
        "except keys under `stages` and values naming a prepare cell (`${NAME.checkpoint}`), "
        "which go to grid cells only",
    )
    env: dict = opt({}, "environment variables of every grid cell")
    prepare: dict = opt(
        {},
        "cells run first, in order: `NAME: {base, set}` (this set after the study's); "
        "`${NAME.checkpoint}` (its final checkpoints/last.pt) and `${NAME.dir}` in set, env and "
        "grid values refer to the same seed's run, which then runs first",
    )
    grid: dict = opt(
        {},
        "axes of the grid: `dotted.key: [values]`, or `axis: {label: {dotted.key: value, ...}}` "
        "for values that set several keys",
    )
    chart: Chart = opt(Chart(), "the chart")
    launch: Launch = opt(Launch(), "how cells start")


def load(path: str | Path) -> Study:
    """Read and check a study file; every problem is a UserError naming the key."""
    path = Path(path)
    raw = config.read_yaml(path, "study")
    study = _build(Study, raw, "")
    prepare = study.prepare.items()
    study.prepare = {str(n): _build(PrepareCell, p, f"prepare.{n}") for n, p in prepare}
    study.name = study.name or path.stem
    study.out = study.out or f"runs/studies/{study.name}"
    _check(study)
    return study


def _build(cls: type, raw: Any, key: str) -> Any:
    """engine.config's typed builder, its messages worded for a study file."""
    try:
        return config._build(cls, raw, key)
    except UserError as e:
        text = str(e).replace("recipe key", "study key", 1)
        raise UserError(text.replace("expected dict,", "expected a mapping,")) from None


def _check(s: Study) -> None:
    """What the types cannot say: files exist, names are usable, axes and references fit."""
    if not NAME.fullmatch(s.name):
        raise UserError(f"study key 'name': {s.name!r} may hold only letters, digits, _ . + -")
    if not s.base:
        raise UserError("study key 'base': required (the recipe the grid cells start from)")
    bases = [("base", s.base)] + [(f"prepare.{n}.base", p.base) for n, p in s.prepare.items()]
    for key, base in bases:
        if base and not Path(base).is_file():
            raise UserError(f"study key '{key}': recipe file not found: {base}")
    for name in s.prepare:
        if not NAME.fullmatch(name):
            raise UserError(f"study key 'prepare.{name}': a name of letters, digits, _ . + -")
    if not shlex.split(s.launch.command):
        raise UserError("study key 'launch.command': empty (e.g. python -m engine.run)")
    if not s.seeds:
        raise UserError("study key 'seeds': expected a non-empty list, got []")
    if len(set(s.seeds)) != len(s.seeds) or min(s.seeds) < 0:
        raise UserError(f"study key 'seeds': {s.seeds} must be distinct integers >= 0")
    for name, value in s.env.items():
        if not _plain(value):
            raise UserError(f"study key 'env.{name}': expected a string or number")
    if not s.grid:
        raise UserError("study key 'grid': at least one axis is required")
    grid = axes(s)
    if s.chart.x and s.chart.x not in grid:
        raise UserError(f"study key 'chart.x': {s.chart.x!r} is not an axis ({', '.join(grid)})")
    names = set(s.prepare)
    for labels in itertools.product(*grid.values()):
        name = "-".join(labels)
        if name in names:
            raise UserError(f"study key 'grid': two cells are both named {name!r}")
        names.add(name)
    _check_references(s, grid)


def _check_references(s: Study, grid: Axes) -> None:
    """`${NAME.checkpoint}` must name a prepare cell; in a prepare cell, one before it."""
    every = list(s.prepare)
    values = [(f"env.{k}", v, every) for k, v in s.env.items()]
    values += [(f"set.{k}", v, every) for k, v in s.set.items()]
    for axis, options in grid.items():
        for label, sets in options.items():
            values += [(f"grid.{axis}.{label}.{k}", v, every) for k, v in sets.items()]
    for i, (name, p) in enumerate(s.prepare.items()):
        values += [(f"prepare.{name}.set.{k}", v, every[:i]) for k, v in p.set.items()]
    for key, value, allowed in values:
        for ref, what in REF.findall(json.dumps(value)):
            if ref not in allowed:
                raise UserError(
                    f"study key '{key}': ${{{ref}.{what}}} names no prepare cell before it "
                    f"(prepare cells: {', '.join(allowed) or 'none'})"
                )


def axes(s: Study) -> Axes:
    """The grid as {axis: {label: {dotted.key: value}}}; `key: [values]` axes are named by the
    key's last part and labelled by their values (numbers prefixed with that name)."""
    found: Axes = {}
    for key, spec in s.grid.items():
        if isinstance(spec, list) and spec:
            axis = str(key).rsplit(".", 1)[-1]
            options = {}
            for v in spec:
                if not _plain(v):
                    raise UserError(
                        f"study key 'grid.{key}': {config._show(v)} is not a plain value; use a "
                        "named axis (`axis: {label: {dotted.key: value}}`)"
                    )
                options[f"{axis}{v}" if isinstance(v, (int, float)) else str(v)] = {key: v}
        elif isinstance(spec, dict) and spec and all(isinstance(v, dict) for v in spec.values()):
            axis, options = str(key), {str(k): v for k, v in spec.items()}
        else:
            raise UserError(
                f"study key 'grid.{key}': expected a non-empty list of values or a mapping "
                "label: {dotted.key: value}"
            )
        if axis in found:
            raise UserError(f"study key 'grid.{key}': a second axis named {axis!r}; name one")
        for label in options:
            if not NAME.fullmatch(label):
                raise UserError(
                    f"study key 'grid.{key}': label {label!r} may hold only letters, digits, "
                    "_ . + -"
                )
        found[axis] = options
    return found


def _plain(value: Any) -> bool:
    """A string or a number (not a bool): what an env value or a grid list value may be."""
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)

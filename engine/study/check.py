"""The check before a study runs anything (or prints it): every unfinished cell's recipe, base
recipe + study `set` + its grid or prepare overrides, is loaded as its `engine.run` would load it
(engine.config.load, with the cell's environment), so that a misspelt grid key stops the study
at once rather than after hours of prepare runs. No data is read and no weights are made (the
check of a filter-pruning setting builds a weightless, meta-device model).

What prepare cells will leave has not been written yet: a `${NAME.checkpoint}` or `${NAME.dir}`
of an unfinished prepare cell points at a stand-in of its run folder, holding what that cell's
run will write (checkpoints/last.pt, and the rewind-epoch<e>.pt of its train stages), made in a
temporary folder. For `--print` the cells run elsewhere: when a `${VAR}` they use is not set
here, the check is skipped, said so, rather than guessing what the variable holds there.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine import config
from engine.config import Recipe, TrainStage
from engine.errors import UserError
from engine.study.cells import Cell, cells, finished
from engine.study.spec import Study


def check(s: Study, elsewhere: bool = False) -> None:
    """Load the recipe of every cell that has not finished, prepare cells first; the first
    problem is a UserError naming the cell. A grid point's seeds differ only in `seed` and in
    which seed's prepare runs they name, so one unfinished seed of each is loaded (filter
    pruning's check builds a weightless model, about 0.1 s). `elsewhere`: the cells run on
    another machine (--print); unless every variable they use is set here too, nothing is
    checked (said on stderr)."""
    out = Path(s.out)
    if elsewhere and (unset := _unset(cells(s))):
        print(f"cells not checked: {', '.join(unset)} not set here", file=sys.stderr)
        return
    checked: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="study-check-") as tmp:
        stand = Path(tmp)
        runs = lambda name: out / name if finished(s, name) else stand / name
        for cell in cells(s, runs):
            if finished(s, cell.name) or cell.group in checked:
                continue
            try:
                with _environ(cell.env):
                    recipe = config.load(cell.recipe, cell.overrides)
            except UserError as e:  # said with the paths the cell will have
                raise UserError(f"cell {cell.name}: {str(e).replace(tmp, str(out))}") from None
            if cell.labels:
                checked.add(cell.group)
            else:  # a prepare cell, every seed: what its run leaves for the cells after it
                _leave(stand / cell.name, recipe)


def _unset(all_cells: list[Cell]) -> list[str]:
    """The `${VAR}`s (without a default) that cells use and neither they nor this process set:
    those of each cell's recipe after its overrides, as engine.run expands them (a prepare
    cell's `stages` replace the base recipe's, and the variables those named)."""
    names = set()
    for cell in all_cells:
        try:
            raw = config.read_raw(cell.recipe, cell.overrides)
        except UserError:  # the check proper says what is wrong
            raw = {}
        found = config.ENV_VAR.finditer(
            " ".join([json.dumps(raw, default=str), *cell.env.values()])
        )
        used = {m.group(1) for m in found if m.group(2) is None}  # no default
        names |= {v for v in used if v not in cell.env and v not in os.environ}
    return sorted(names)


def _leave(run: Path, recipe: Recipe) -> None:
    """What a prepare cell's run leaves in its folder for the cells that name it: its final
    checkpoints/last.pt and the rewind-epoch<e>.pt files of its train stages (empty stand-ins)."""
    ckpts = run / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    (ckpts / "last.pt").touch()
    for stage in recipe.stages:
        if isinstance(stage, TrainStage):
            for epoch in stage.rewind_epochs:
                (ckpts / f"rewind-epoch{epoch}.pt").touch()


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set, as the cell's process will have it; restored after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

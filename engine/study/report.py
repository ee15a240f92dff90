"""The study report: one row per cell group (mean ± std over seeds of each run's summary.json),
written as study.md (a table, then why any cell has no result), study.json and study.png."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import yaml

from engine.errors import UserError
from engine.study.cells import Cell, waiting_for
from engine.study.chart import chart
from engine.study.spec import Study

NUMBERS = ("top1", "sparsity", "params", "flops", "img_per_s", "seconds")


def write_report(s: Study, all_cells: list[Cell]) -> None:
    """Write study.md and study.png (study.json too: the table as data) into the study folder."""
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    table = rows(s, all_cells)
    (out / "study.md").write_text(table_markdown(s, table))
    (out / "study.json").write_text(json.dumps(table, indent=1) + "\n")
    if not chart(s, table, out / "study.png"):
        print("matplotlib is not installed (pip install 'engine[plots]'): no study.png")


def rows(s: Study, all_cells: list[Cell]) -> list[dict]:
    """One row per cell group: seeds finished, mean ± std of top-1, the other numbers."""
    groups: dict[str, list[Cell]] = {}
    for cell in all_cells:
        groups.setdefault(cell.group, []).append(cell)
    table = []
    for group, members in groups.items():
        results = {c.name: run_result(Path(s.out) / c.name) for c in members}
        done = [r for r in results.values() if r is not None]
        row: dict[str, Any] = {"cell": group, "labels": members[0].labels, "runs": len(members)}
        row["done"] = len(done)
        row["missing"] = {c.name: _status(s, c) for c in members if results[c.name] is None}
        for key in NUMBERS:
            values = [r[key] for r in done if r[key] is not None]
            row[key] = _mean_std(values) if values else None
        table.append(row)
    return table


def run_result(run_dir: Path) -> dict | None:
    """The numbers of a finished run, from its summary.json: final top-1, sparsity, nonzero
    parameters and effective FLOPs (of the last prune stage; of the dense model without one),
    images/s (of the last training stage), wall time."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())

    def last(key: str) -> Any:
        return next((st[key] for st in reversed(summary["stages"]) if key in st), None)

    row = {"top1": last("top1"), "sparsity": last("sparsity"), "img_per_s": last("img_per_s")}
    row |= {"params": last("params"), "flops": last("flops_effective")}
    row["seconds"] = summary["seconds"]
    if row["flops"] is None:
        row["params"], row["flops"] = _dense_counts(run_dir)
    return row


def _dense_counts(run_dir: Path) -> tuple[int | None, int | None]:
    """Parameters and FLOPs of a run without a prune stage: its model, dense, at its image
    size."""
    from engine.models import build_model
    from engine.prune import count_flops

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    try:
        model = build_model(cfg["model"]["arch"], cfg["model"]["num_classes"])
    except (KeyError, ValueError, UserError):
        return None, None
    params = sum(p.numel() for p in model.parameters())
    return params, count_flops(model, cfg["data"]["image_size"])[0]


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _status(s: Study, cell: Cell) -> str:
    """Why a cell has no result: not run (and what it waits for), or the error of its log."""
    if blocked := waiting_for(s, cell):
        return f"not run (needs {', '.join(blocked)})"
    log = Path(s.out) / "logs" / f"{cell.name}.log"
    if not log.exists() and not (Path(s.out) / cell.name).exists():
        return "not run"
    return f"failed or unfinished: {last_error(log)}"


def last_error(log: Path) -> str:
    """The line of a cell's log that says why its latest attempt failed: the last `error:`
    line after the last `$ command` header, else the last line of output."""
    if not log.is_file():
        return "no log"
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("$ ")]
    lines = [
        ln for ln in lines[starts[-1] if starts else 0 :] if not ln.startswith(("exit code", "$ "))
    ]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or ["no output"])[-1]


def table_markdown(s: Study, table: list[dict]) -> str:
    """study.md: the table, then why any cell is missing."""
    base = next((r for r in table if not r["labels"]), None)  # the base recipe's cell
    head = ["cell", "seeds", "top-1 %", "sparsity", "params", "FLOPs", "img/s", "engine time"]
    lines = [
        f"# Study {s.name}",
        "",
        f"Base recipe `{s.base}`, seeds {s.seeds}, runs in `{s.out}`. Top-1: final accuracy, "
        "mean ± std over the finished seeds; sparsity: zero fraction of the masked weights "
        "(filter pruning removes weights instead: 0); params: nonzero parameters; FLOPs: "
        "effective multiply-adds per image (masked weights not counted); both with their share "
        "of the base cell's; img/s: training throughput of the last stage; engine time: mean "
        "per run, from its run folder's set-up to its end, over all its resumes (process "
        "start-up and time between them not counted).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join([" --- "] + [" ---: "] * (len(head) - 1)) + "|",
    ]
    for r in table:
        failed = any(why.startswith("failed") for why in r["missing"].values())
        top1 = "failed" if failed and not r["done"] else "-"
        if r["top1"]:
            top1 = f"{r['top1'][0]:.2f} ± {r['top1'][1]:.2f}"
        cols = [
            f"`{r['cell']}`",
            f"{r['done']}/{r['runs']}",
            top1,
            "-" if r["sparsity"] is None else f"{r['sparsity'][0]:.3f}",
            _count(r, base, "params"),
            _count(r, base, "flops"),
            "-" if r["img_per_s"] is None else f"{r['img_per_s'][0]:.0f}",
            "-" if r["seconds"] is None else _duration(r["seconds"][0]),
        ]
        lines.append("| " + " | ".join(cols) + " |")
    missing = [(n, why) for r in table for n, why in r["missing"].items()]
    if missing:
        lines += ["", "Cells without a result:", ""]
        lines += [f"- `{n}`: {why}" for n, why in missing]
    return "\n".join(lines) + "\n"


def _count(row: dict, base: dict | None, key: str) -> str:
    """A row's mean count of `key`, with its share of the base cell's when the row has labels."""
    if not row[key]:
        return "-"
    text = _si(row[key][0])
    if base and base[key] and row["labels"]:
        text += f" ({100 * row[key][0] / base[key][0]:.0f}%)"
    return text


def _si(n: float) -> str:
    """A count with a k / M / G suffix."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    """Seconds as s, min or h."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"

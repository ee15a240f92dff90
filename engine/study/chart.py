"""study.png: top-1 (mean ± std over seeds) against one grid axis, one line per combination of
the other axes, the prepare cells as reference levels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.study.spec import Study, axes


@dataclass
class ChartData:
    """What study.png plots: top-1 (mean, std) against the x axis, one line per combination of
    the other axes' labels, and the prepare cells' top-1 as reference levels."""

    x_axis: str
    ticks: dict[str, float]  # x label -> position (the number in it, else its index)
    lines: dict[tuple[str, ...], list[tuple[float, float, float]]]  # (x, mean, std), sorted
    levels: dict[str, float]  # prepare cell -> mean top-1


def chart_data(s: Study, table: list[dict]) -> ChartData:
    """The chart's numbers, from the report's table rows."""
    grid = axes(s)
    x_axis = s.chart.x or list(grid)[-1]
    others = [a for a in grid if a != x_axis]
    numbers = {label: _number(label.removeprefix(x_axis)) for label in grid[x_axis]}
    numeric = None not in numbers.values()
    ticks = {label: numbers[label] if numeric else i for i, label in enumerate(numbers)}
    lines: dict[tuple[str, ...], list[tuple[float, float, float]]] = {}
    for r in table:
        if r["labels"] and r["top1"] is not None:
            key = tuple(r["labels"][a] for a in others)
            lines.setdefault(key, []).append((ticks[r["labels"][x_axis]], *r["top1"]))
    levels = {r["cell"]: r["top1"][0] for r in table if not r["labels"] and r["top1"]}
    return ChartData(x_axis, ticks, {k: sorted(v) for k, v in lines.items()}, levels)


def _number(text: str) -> float | None:
    """The number in `text`, or None."""
    try:
        return float(text)
    except ValueError:
        return None


def chart(s: Study, table: list[dict], path: Path) -> bool:
    """study.png from chart_data: colour by the last non-x axis, line style by the others;
    prepare cells as grey dashed levels. False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    data = chart_data(s, table)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    last = list(dict.fromkeys(k[-1] for k in data.lines if k))  # in grid order
    colour_of = {v: colours[i % len(colours)] for i, v in enumerate(last)}
    styles = ["-", "--", ":", "-."]
    rest = list(dict.fromkeys(k[:-1] for k in data.lines))
    style_of = {k: styles[i % len(styles)] for i, k in enumerate(rest)}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for key, points in data.lines.items():
        xs, ys, errs = zip(*points, strict=True)
        ax.errorbar(
            xs,
            ys,
            yerr=errs,
            marker="o",
            capsize=3,
            label=" + ".join(key) or "top-1",
            color=colour_of.get(key[-1]) if key else None,
            linestyle=style_of.get(key[:-1], "-"),
        )
    for name, level in data.levels.items():
        ax.axhline(level, color="grey", linestyle="--", linewidth=1)
        ax.annotate(
            f"{name} {level:.1f}%",
            (0.01, level),
            xycoords=("axes fraction", "data"),
            va="bottom",
            fontsize=8,
            color="grey",
        )
    ax.set_xticks(list(data.ticks.values()), [t.removeprefix(data.x_axis) for t in data.ticks])
    ax.set_xlabel(data.x_axis)
    ax.set_ylabel("top-1 % (mean ± std over seeds)")
    ax.set_title(f"{s.name}: {len(s.seeds)} seed(s)")
    ax.grid(alpha=0.3)
    if data.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True

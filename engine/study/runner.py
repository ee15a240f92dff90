"""Running a study's cells: here, one `engine.run` subprocess after another (finished cells
skipped, killed ones resumed, failures reported and passed over), or elsewhere, as the shell or
sbatch script that `--print` writes."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.preemption import FORWARDED_ENV
from engine.study.cells import Cell, command, finished, waiting_for
from engine.study.report import last_error, run_result, write_report
from engine.study.spec import Study


class _Stop:
    """SIGTERM or SIGINT to the study is passed on to the running cell, which saves last.pt and
    exits. A signal sent to the whole process group (Ctrl-C, a scheduler) reaches the cell twice
    then: FORWARDED_ENV in its environment makes it take the second as the same request."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.signal = 0

    def __call__(self, signum: int, frame: Any) -> None:
        self.signal = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)


def run(s: Study, all_cells: list[Cell]) -> int:
    """Run the unfinished cells one after another; rewrite the report after each. Returns the
    exit code: 0 all finished, 1 some failed, 128+N stopped by signal N."""
    out = Path(s.out)
    program = command(s, all_cells[0], local=True)[0]
    if shutil.which(program) is None:
        raise UserError(
            f"study key 'launch.command': {program!r} is not a program found on PATH (variables "
            "go under env:, not before the command)"
        )
    (out / "logs").mkdir(parents=True, exist_ok=True)
    stop = _Stop()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    width = len(str(len(all_cells)))
    failed: set[str] = set()
    try:
        for i, cell in enumerate(all_cells, 1):
            tag = f"[{i:>{width}}/{len(all_cells)}] {cell.name}"
            log = out / "logs" / f"{cell.name}.log"
            if stop.signal:  # arrived between two cells
                break
            if finished(s, cell.name):
                print(f"{tag}: finished already", flush=True)
                continue
            blocked = [n for n in cell.needs if n in failed or not finished(s, n)]
            if blocked:
                failed.add(cell.name)
                print(f"{tag}: not run, needs {', '.join(blocked)}", flush=True)
                continue
            run_dir = out / cell.name
            if run_dir.exists() and not (run_dir / "checkpoints" / "last.pt").exists():
                shutil.rmtree(run_dir)  # started but saved nothing: nothing to resume
            print(f"{tag}: running (log: {log})", flush=True)
            began = time.time()
            code = _run_cell(s, cell, log, stop)
            row = run_result(run_dir)
            stopped = stop.signal or code in (128 + signal.SIGINT, 128 + signal.SIGTERM)
            if code == 0 and row is not None:
                top1 = "no val set" if row["top1"] is None else f"top-1 {row['top1']:.2f}%"
                print(f"{tag}: {top1} in {time.time() - began:.0f} s", flush=True)
            elif not stopped:
                failed.add(cell.name)
                print(f"{tag}: FAILED (exit {code}): {last_error(log)}", flush=True)
            if stopped:
                stop.signal = stop.signal or code - 128
                break
            write_report(s, all_cells)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    write_report(s, all_cells)
    if stop.signal:
        print("study stopped; run the same command again to continue", flush=True)
        return 128 + stop.signal
    done = sum(finished(s, c.name) for c in all_cells)
    print(f"{done}/{len(all_cells)} cells finished; report: {out / 'study.md'}", flush=True)
    return 0 if done == len(all_cells) else 1


def _run_cell(s: Study, cell: Cell, log: Path, stop: _Stop) -> int:
    """Run one cell's engine process, its output appended to `log`; its exit code."""
    with log.open("a") as f:
        f.write(f"$ {shell_line(s, cell)}\n")
        f.flush()
        stop.child = subprocess.Popen(
            command(s, cell, local=True),
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, **cell.env, FORWARDED_ENV: "1"},
        )
        code = stop.child.wait()
        stop.child = None
        f.write(f"exit code {code}\n")
    return code


def print_commands(s: Study, all_cells: list[Cell]) -> str:
    """One shell line per cell (prepare cells first), or an sbatch script with dependencies."""
    out = Path(s.out)
    lines = [
        "#!/bin/sh",
        f"# study {s.name}: {len(all_cells)} cells, in order (prepare cells first); then "
        "`python -m engine.study STUDY.yaml --report` writes study.md and study.png",
        *(["set -e"] if s.launch.sbatch else []),
        f"mkdir -p {shlex.quote(str(out / 'logs'))}",
    ]
    for cell in all_cells:
        if finished(s, cell.name):
            lines.append(f"# finished: {cell.name}")
            continue
        cmd = shell_line(s, cell)
        if not s.launch.sbatch:
            lines.append(cmd)
            continue
        # A dependency that fails (a prepare job past its time limit) cancels its dependents
        # rather than leaving them pending for ever.
        sbatch = [
            "sbatch",
            "--parsable",
            "--kill-on-invalid-dep=yes",
            *shlex.split(s.launch.sbatch),
        ]
        sbatch += [f"--job-name={s.name}-{cell.name}", f"--output={out / 'logs' / cell.name}.log"]
        text = shlex.join(sbatch)
        if deps := waiting_for(s, cell):
            text += f" --dependency=afterok:{':'.join(f'$j_{_var(n)}' for n in deps)}"
        text += f" --wrap {shlex.quote(cmd)}"
        lines.append(f"j_{_var(cell.name)}=$({text})" if not cell.labels else text)
    return "\n".join(lines) + "\n"


def shell_line(s: Study, cell: Cell) -> str:
    """The cell's command as a shell line, its environment variables first."""
    env = [f"{k}={shlex.quote(v)}" for k, v in cell.env.items()]
    return " ".join([*env, shlex.join(command(s, cell, local=False))])


def _var(name: str) -> str:
    """A shell variable name for a cell's job id."""
    return re.sub(r"\W", "_", name)

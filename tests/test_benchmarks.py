"""The benchmark scripts on the CPU: a tiny throughput grid end to end, the baseline loop, the
command line, the peak table, and the GPU check script's syntax."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks import baseline, common, ddp, throughput
from engine.config import DataConfig
from engine.data import build_loaders
from engine.distributed import Dist

TINY = dict(
    arch="resnet20", num_classes=10, batch_size=8, image_size=32, device="cpu", warmup=1,
    repeats=2, steps=2, workers=0,
)  # fmt: skip
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """One CPU thread, as --quick uses: two threads on a busy 2-core machine are 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_grid_writes_a_full_report(tmp_path: Path) -> None:
    opts = throughput.Options(**TINY, jpeg_root=str(tmp_path / "jpeg"))
    configs = [
        throughput.Config("eager", "nhwc", "off", "dense", "synthetic"),
        throughput.Config("eager", "nhwc", "bf16", "masked", "jpeg"),
        throughput.Config("eager", "nhwc", "off", "dense", "nvjpeg"),
        throughput.Config("eager", "nhwc", "off", "dense", "nvjpeg-main"),
        throughput.Config("eager", "nhwc", "off", "dense", "jpeg256"),
    ]
    stem = tmp_path / "out" / "tp"
    report = throughput.run_grid(opts, configs, stem)
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["options"]["arch"] == "resnet20" and saved["meta"]["torch"] == torch.__version__
    assert saved["meta"]["device"] == common.device_name(torch.device("cpu"))
    assert saved["meta"]["train_flops_per_image"] > 0
    assert set(saved["baseline"]) == {"synthetic", "jpeg"}
    assert saved["peaks"]["off"]["source"] == "measured matmul"
    for row in saved["rows"]:
        assert row["status"] == "ok", row["status"]
        assert row["img_per_s_min"] <= row["img_per_s"] <= row["img_per_s_max"]
        assert row["img_per_s"] > 0 and row["vs_baseline"] > 0 and row["mfu"] > 0
        assert row["step_ms"] > 0 and row["warmup_s"] > 0 and row["peak_mem_gib"] is None
    table = stem.with_suffix(".md").read_text()
    assert table == throughput.markdown(saved)
    assert "| baseline loop | nchw | off | dense | jpeg |" in table
    assert "| eager | nhwc | bf16 | masked | jpeg |" in table
    assert "| eager | nhwc | off | dense | nvjpeg |" in table  # vs the jpeg baseline: no third
    assert "| eager | nhwc | off | dense | nvjpeg-main |" in table
    assert "| eager | nhwc | off | dense | jpeg256 |" in table
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()[6:]]
    vs_synthetic = {(c[0], c[4]): c[9] for c in cells}  # (compile, data) -> x synthetic
    base = saved["baseline"]
    rates = {r["data"]: r["img_per_s"] for r in saved["rows"] if r["weights"] == "dense"}
    assert vs_synthetic["eager", "jpeg256"] == f"{rates['jpeg256'] / rates['synthetic']:.2f}"
    assert vs_synthetic["eager", "nvjpeg"] == f"{rates['nvjpeg'] / rates['synthetic']:.2f}"
    assert vs_synthetic["eager", "synthetic"] == "-"
    assert vs_synthetic["eager", "jpeg"] == "-"  # bf16 masked: no synthetic row alike
    ratio = base["jpeg"]["img_per_s"] / base["synthetic"]["img_per_s"]
    assert vs_synthetic["baseline loop", "jpeg"] == f"{ratio:.2f}"
    assert len(table.splitlines()) == 6 + 2 + 5  # title, text, head (with blanks), 2 + 5 rows
    if importlib.util.find_spec("matplotlib"):
        assert stem.with_suffix(".png").stat().st_size > 0


def test_rows_reading_files_skip_the_worker_burst_and_read_prepared_copies(tmp_path: Path):
    """With workers, file rows warm up past 2 x workers + 1 batches and time windows of at least
    `workers` steps; jpeg256 reads engine.data.prepare's 256 px copy of 500x375 photos."""
    opts = throughput.Options(
        **{**TINY, "image_size": 128, "batch_size": 2, "workers": 3}, jpeg_root=str(tmp_path)
    )
    assert opts.windows("synthetic") == dict(warmup=1, repeats=2, steps=2)
    assert opts.windows("jpeg256") == dict(warmup=7, repeats=2, steps=3)
    root = throughput.jpeg_folder(opts, "jpeg256")
    train = sorted((root / "train").rglob("*.JPEG"))
    assert len(train) >= (7 + 2 * 3) * 2
    with Image.open(train[0]) as im:
        assert im.size == (256, 192)
    assert throughput.jpeg_folder(opts, "jpeg256") == root  # made once, then reused


def test_nvjpeg_rows_decode_in_the_prefetch_thread_or_the_main_one(tmp_path: Path) -> None:
    opts = throughput.Options(**TINY, jpeg_root=str(tmp_path))
    dist = Dist(device=torch.device("cpu"))
    threaded = throughput.make_loader("nvjpeg", opts, dist, channels_last=True)
    main = throughput.make_loader("nvjpeg-main", opts, dist, channels_last=True)
    assert threaded.dataset.on_device and main.dataset.on_device
    assert threaded.prepare_in_thread and not main.prepare_in_thread


def test_ddp_bucket_benchmark_under_torchrun(tmp_path: Path) -> None:
    """Two gloo ranks: a no-DDP row, then one row per bucket size, written by rank 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "benchmarks" / "ddp.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "ddp.json").read_text())
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    assert [r["bucket_mb"] for r in report["rows"]] == [None, *ddp.QUICK["bucket_mb"]]
    assert all(r["img_per_s"] > 0 and r["step_ms"] > 0 for r in report["rows"])
    table = (tmp_path / "ddp.md").read_text()
    assert table == ddp.markdown(report) and "| no DDP |" in table and "| 0.25 |" in table


def test_ddp_bucket_benchmark_needs_torchrun(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        ddp.main(["--quick"])
    assert exit_.value.code == 2 and "--nproc_per_node=2" in capsys.readouterr().err


def test_failing_and_late_rows_are_reported(tmp_path: Path, monkeypatch) -> None:
    """A row that raises becomes an error row and the grid goes on; past the budget, rows are
    skipped."""
    opts = throughput.Options(**TINY)

    def broken(cfg, opts, dist):
        raise RuntimeError("no kernel\nsecond line")

    monkeypatch.setattr(throughput, "engine_run", broken)
    report = throughput.run_grid(opts, [throughput.Config(amp="off")])
    assert report["rows"][0]["status"] == "error: RuntimeError: no kernel"
    assert "error: RuntimeError: no kernel" in throughput.markdown(report)
    late = throughput.run_grid(throughput.Options(**TINY, budget_s=1e-9), [throughput.Config()])
    assert late["rows"][0]["status"].startswith("skipped") and late["baseline"] == {}


def test_baseline_loop_runs() -> None:
    device = torch.device("cpu")
    data = DataConfig(backend="synthetic", steps_per_epoch=4, batch_size=8, image_size=32)
    loader, _ = build_loaders(
        data, dist=Dist(device=device), seed=0, num_classes=10, channels_last=False
    )
    r = baseline.measure("resnet20", 10, loader, device, warmup=1, repeats=3, steps=1, batch_size=8)
    assert r["img_per_s"] > 0 and r["spread_pct"] >= 0


def test_command_line() -> None:
    opts, configs, out = throughput.parse_args(["--quick"])
    assert configs == throughput.PRESETS["quick"] and opts.arch == "resnet20"
    assert opts.device == "cpu" and out.name == "throughput"
    opts, configs, _ = throughput.parse_args(["--quick", "--amp", "off", "bf16", "--workers", "0"])
    assert [c.amp for c in configs] == ["off", "bf16"] and opts.workers == 0
    assert {c.compile for c in configs} == {"eager"}
    with pytest.raises(ValueError, match="layout"):
        throughput.Config(layout="nhcw")
    _, configs, _ = throughput.parse_args(["--rows", "default/nhwc/fp16/masked/nvjpeg"])
    assert configs == [throughput.Config("default", "nhwc", "fp16", "masked", "nvjpeg")]
    for bad in (["--rows", "eager/nhwc"], ["--rows", "eager/nhwc/off/dense/png"]):
        with pytest.raises(SystemExit) as exit_info:
            throughput.parse_args(bad)
        assert exit_info.value.code == 2


def test_gpu_peak_table() -> None:
    assert common.gpu_peak("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert common.gpu_peak("NVIDIA H100 PCIe", "fp16") == pytest.approx(756.5e12)
    assert common.gpu_peak("NVIDIA H200", "off") == pytest.approx(494.7e12)
    assert common.gpu_peak("NVIDIA A100-SXM4-80GB", "bf16") == pytest.approx(312e12)
    assert common.gpu_peak("NVIDIA A100 80GB PCIe", "off") == pytest.approx(156e12)
    assert common.gpu_peak("Tesla T4", "bf16") is None
    assert common.gpu_peak("NVIDIA RTX A1000 6GB Laptop GPU", "bf16") is None


def test_gpu_check_script_parses() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)


FAKE_PYTHON = """#!/usr/bin/env bash
case $1 in
  -c) echo "$FAKE_GPUS Fake GPU" ;;  # the CUDA probe: device count and name
  -) cat >/dev/null ;;           # the versions header
  *) echo "ran: $*" ;;
esac
"""


def run_gpu_check(tmp_path: Path, parts: str, gpus: int) -> subprocess.CompletedProcess:
    """gpu_check.sh with a stand-in python that claims `gpus` GPUs, results under tmp/out."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "OUT": str(tmp_path / "out")}
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        env={**env, "PARTS": parts, "FAKE_GPUS": str(gpus)},
        capture_output=True,
        text=True,
    )


DEFAULT_PARTS = ["gpu-tests", "throughput", "kernels", "data", "demo"]


@pytest.mark.parametrize(
    ("parts", "gpus", "expected"),
    [
        ("", 1, [*DEFAULT_PARTS, "ddp:SKIP"]),
        ("", 2, [*DEFAULT_PARTS, "ddp"]),
        ("autotune", 1, ["autotune"]),
        ("structured", 1, ["structured"]),
        ("kernels demo", 1, ["kernels", "demo"]),
    ],
)
def test_gpu_check_runs_the_parts_asked_for(
    tmp_path: Path, parts: str, gpus: int, expected: list
) -> None:
    """With a stand-in python that claims `gpus` GPUs: every default part but the opt-in
    structured and autotune (ddp only with several GPUs, else skipped and said so), or exactly
    the parts named in PARTS; each logged and summarised, exit 0 when all pass."""
    done = run_gpu_check(tmp_path, parts, gpus)
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    headers = [line.split() for line in log.splitlines() if line.startswith("=== ")]
    assert [h[1].rstrip(":") for h in headers[:-1]] == [e.split(":")[0] for e in expected]
    assert headers[-1][1] == "summary:"
    summary = log.split("=== summary: Fake GPU")[1].splitlines()[1:]
    outcomes = [(e.split(":") + ["PASS"])[:2] for e in expected]
    assert [line.split()[:2] for line in summary if line] == outcomes
    if gpus > 1 and not parts:
        assert f"--nproc_per_node={gpus} benchmarks/ddp.py" in log
    if not parts:  # under 7 minutes with the script's own start-up
        assert sum(int(s) for s in re.findall(r"\(limit (\d+)s\)", log)) <= 415


def test_gpu_check_rejects_an_unknown_part(tmp_path: Path) -> None:
    """A mistyped part name stops the script before anything runs, naming it."""
    done = run_gpu_check(tmp_path, "kernels kernel", 1)
    assert done.returncode == 2 and "unknown part 'kernel'" in done.stderr
    assert not (tmp_path / "out").exists()

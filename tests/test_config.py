"""Recipe loading: types, overrides, ${VAR}, and the one-line errors users see (exit code 2)."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine import config
from engine.config import LoadStage, TrainStage
from engine.errors import UserError


def write(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def base(tmp_path: Path, **extra) -> dict:
    (tmp_path / "d" / "train").mkdir(parents=True, exist_ok=True)
    (tmp_path / "d" / "val").mkdir(parents=True, exist_ok=True)
    body = {
        "model": {"arch": "resnet20", "num_classes": 10},
        "data": {"root": str(tmp_path / "d"), "batch_size": 8},
        "schedule": {"kind": "step", "epochs": 4, "milestones": [2]},
        "stages": [{"train": {}}],
    }
    body.update(extra)
    return body


def test_load_defaults_types_and_name(tmp_path):
    r = config.load(write(tmp_path, base(tmp_path)))
    assert r.name == "r"  # from the file name
    assert r.optim.lr == 0.1 and isinstance(r.optim.lr, float)
    assert r.data.batch_size == 8
    assert r.stages == [TrainStage(epochs=0)]


def test_overrides_typed_and_nested(tmp_path):
    path = write(tmp_path, base(tmp_path))
    r = config.load(
        path,
        [
            "optim.lr=0.4",
            "data.batch_size=16",
            "schedule.milestones=[1,3]",
            "stages.0.train.epochs=2",
            "precision.amp=fp16",
        ],
    )
    assert r.optim.lr == 0.4
    assert r.data.batch_size == 16
    assert r.schedule.milestones == [1, 3]
    assert r.stages[0].epochs == 2
    assert r.precision.amp == "fp16"


def test_env_expansion(tmp_path, monkeypatch):
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"x")
    monkeypatch.setenv("CKPT", str(ckpt))
    monkeypatch.setenv("BS", "32")
    body = base(tmp_path, stages=[{"load": {"checkpoint": "${CKPT}"}}])
    body["data"]["batch_size"] = "${BS}"
    r = config.load(write(tmp_path, body))
    assert r.stages == [LoadStage(checkpoint=str(ckpt))]
    assert r.data.batch_size == 32


@pytest.mark.parametrize(
    "mutate, overrides, fragment",
    [
        (lambda b: b["optim"].__setitem__("lrr", 1), [], "'optim.lrr' (did you mean 'lr'?"),
        (lambda b: None, ["optim.lr=abc"], "'optim.lr': expected a number, got 'abc'"),
        (lambda b: None, ["data.batch_size=1.5"], "'data.batch_size': expected an integer"),
        (lambda b: None, ["data.batch_size=0"], "'data.batch_size': 0 is below the minimum 1"),
        (lambda b: None, ["precision.amp=fp8"], "'precision.amp': 'fp8' is not one of"),
        (lambda b: None, ["model.arch=resnet99"], "'model.arch': unknown architecture 'resnet99'"),
        (lambda b: None, ["schedule.milestones.0.x=1"], "'schedule.milestones.0.x': "),
        (
            lambda b: b.__setitem__(
                "stages", [{"train": {}}, {"prune": {"method": "l1_filter", "setting": "B"}}]
            ),
            [],
            "'stages.1.prune.setting': no pruning setting 'B' for resnet20",
        ),
        (
            lambda b: b.__setitem__(
                "stages",
                [{"train": {}}, {"prune": {"method": "random_filter", "fraction": [0.5, 0.5]}}],
            ),
            [],
            "'stages.1.prune.fraction': resnet20 needs 3 fractions",
        ),
        (
            lambda b: b.__setitem__(
                "stages", [{"train": {}}, {"prune": {"sparsity": 0.5, "scope": "layer"}}]
            ),
            [],
            "'stages.1.prune.scope': only random pruning takes scope",
        ),
        (lambda b: None, ["schedule.milestones=[3,2]"], "'schedule.milestones'"),
        (lambda b: b.__setitem__("stages", [{"trian": {}}]), [], "did you mean 'train'?"),
        (lambda b: None, ["stages.0.trian={}"], "it has 'train', 'trian' (did you mean 'train'?)"),
        (lambda b: b.__setitem__("stages", []), [], "'stages'"),
        (lambda b: b["data"].__setitem__("root", "${NO_SUCH_VAR_X}"), [], "NO_SUCH_VAR_X"),
        (lambda b: b["data"].__setitem__("root", "/no/such/dir"), [], "/no/such/dir/train"),
        (
            lambda b: b.__setitem__("stages", [{"load": {"checkpoint": "/nope.pt"}}]),
            [],
            "'stages.0.load.checkpoint': file not found",
        ),
    ],
)
def test_bad_recipes_name_the_key(tmp_path, mutate, overrides, fragment):
    body = base(tmp_path, optim={})
    mutate(body)
    path = write(tmp_path, body)
    with pytest.raises(UserError) as e:
        config.load(path, overrides)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_structured_setting_is_checked_before_any_work(tmp_path):
    body = base(tmp_path, name="pfec", run={"dir": str(tmp_path / "run")})
    body["stages"] = [{"train": {}}, {"prune": {"method": "l1_filter", "setting": "B"}}]
    proc = subprocess.run(
        [sys.executable, "-m", "engine.run", str(write(tmp_path, body)), "run.device=cpu"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    (err,) = proc.stderr.strip().splitlines()
    assert err.startswith("error: recipe key 'stages.1.prune.setting': no pruning setting 'B' for")
    assert not (tmp_path / "run").exists()  # stopped before the run folder, let alone training


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {arch: resnet20\nstages: [")
    with pytest.raises(UserError, match="malformed YAML"):
        config.load(path)


def test_cli_exit_code_2_and_one_line(tmp_path):
    body = base(tmp_path)
    body["optim"] = {"lr": "fast"}
    path = write(tmp_path, body)
    proc = subprocess.run(
        [sys.executable, "-m", "engine.run", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: recipe key 'optim.lr': expected a number, got 'fast'"
    ]


def test_cli_unknown_arch_and_missing_data_exit_2(tmp_path):
    path = write(tmp_path, base(tmp_path))
    for override, fragment in [
        ("model.arch=resnet99", "'model.arch': unknown architecture 'resnet99'"),
        ("data.root=/no/such/root", "'data.root': folder not found: /no/such/root/train"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "engine.run", str(path), override, "run.device=cpu"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert proc.returncode == 2, proc.stderr
        assert fragment in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_describe_lists_every_key():
    text = "\n".join(config.describe())
    for key in ("model.arch", "data.steps_per_epoch", "optim.label_smoothing", "run.resume"):
        assert key in text


# --------------------------------------------------------------------------------------------
# YAML 1.2 core schema: `5e-4` is a number and `off` a string, in files, overrides and ${VAR}


def write_text(tmp_path: Path, text: str) -> Path:
    """A recipe file written as a user types it (yaml.safe_dump would normalise the values)."""
    base(tmp_path)  # the data folders
    path = tmp_path / "typed.yaml"
    path.write_text(
        f"model: {{arch: resnet20, num_classes: 10}}\n"
        f"data: {{root: {tmp_path / 'd'}, batch_size: 8}}\n"
        f"schedule: {{kind: step, epochs: 4, milestones: [2]}}\n"
        f"stages: [{{train: {{}}}}]\n{text}"
    )
    return path


@pytest.mark.parametrize(
    "text, value",
    [
        ("5e-4", 5e-4),
        ("1e-2", 0.01),
        ("1E3", 1000.0),
        (".5", 0.5),
        ("-2.5e+3", -2500.0),
        ("1.0e30", 1e30),
        ("1.0e+30", 1e30),
        ("1.", 1.0),
        ("-.inf", float("-inf")),
        ("7", 7),
        ("-3", -3),
        ("010", 10),  # decimal, not YAML 1.1's octal 8
        ("0x1f", "0x1f"),  # no hex or octal
        ("true", True),
        ("True", True),
        ("FALSE", False),
        ("off", "off"),
        ("on", "on"),
        ("yes", "yes"),
        ("No", "No"),
        ("y", "y"),
        ("1_000", "1_000"),
        ("1:30", "1:30"),  # not YAML 1.1's base-60 integer 90
        ("2024-01-01", "2024-01-01"),  # not a date
        ("inf", "inf"),
        ("null", None),
        ("~", None),
        ("[1, 5e-4, off]", [1, 5e-4, "off"]),
    ],
)
def test_yaml_loader_follows_the_1_2_core_schema(text, value):
    got = yaml.load(text, config.YAMLLoader)
    assert got == value and type(got) is type(value)


def test_yaml_loader_leaves_pyyaml_alone():
    assert yaml.safe_load("off") is False and yaml.safe_load("5e-4") == "5e-4"
    assert yaml.load("{a: 1, <<: {b: 2}}", config.YAMLLoader) == {"a": 1, "b": 2}


def test_recipe_file_numbers_and_strings_as_yaml_1_2(tmp_path):
    r = config.load(
        write_text(
            tmp_path,
            "name: 2024\n"
            "optim: {lr: 1e-2, weight_decay: 5e-4, nesterov: True}\n"
            "schedule: {kind: step, epochs: 4, milestones: [2], div_factor: 1E3}\n"
            "precision: {amp: off, compile: false}\n",
        )
    )
    assert (r.optim.lr, r.optim.weight_decay, r.schedule.div_factor) == (0.01, 5e-4, 1000.0)
    assert all(type(x) is float for x in (r.optim.lr, r.optim.weight_decay))
    assert r.precision.amp == "off"
    assert r.optim.nesterov is True and r.precision.compile is False
    assert r.name == "2024"  # a string field takes an integer's digits


def test_overrides_numbers_and_strings_as_yaml_1_2(tmp_path):
    r = config.load(
        write(tmp_path, base(tmp_path)),
        [
            "optim.weight_decay=5e-4",
            "optim.lr=1e-2",
            "schedule.div_factor=1E3",
            "schedule.pct_start=.5",
            "precision.amp=off",
            "optim.nesterov=true",
            "data.augment=False",
            "seed=010",
            "name=2024",
        ],
    )
    assert (r.optim.weight_decay, r.optim.lr, r.schedule.div_factor) == (5e-4, 0.01, 1000.0)
    assert r.schedule.pct_start == 0.5
    assert r.precision.amp == "off"
    assert r.optim.nesterov is True and r.data.augment is False
    assert r.seed == 10 and r.name == "2024"


def test_env_values_as_yaml_1_2(tmp_path, monkeypatch):
    monkeypatch.setenv("AMP", "off")
    monkeypatch.setenv("WD", "5e-4")
    body = base(tmp_path, precision={"amp": "${AMP}"}, optim={"weight_decay": "${WD}"})
    r = config.load(write(tmp_path, body))
    assert r.precision.amp == "off" and r.optim.weight_decay == 5e-4


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.lr=off", "'optim.lr': expected a number, got 'off'"),
        ("optim.weight_decay=5e-4x", "'optim.weight_decay': expected a number, got '5e-4x'"),
        ("optim.lr=true", "'optim.lr': expected a number, got True"),
        ("optim.nesterov=yes", "'optim.nesterov': expected true/false, got 'yes'"),
        ("data.batch_size=1e3", "'data.batch_size': expected an integer, got 1000.0"),
        ("precision.amp=on", "'precision.amp': 'on' is not one of bf16, fp16, off"),
        ("name=[1]", "'name': expected a string, got [1]"),
        ("name=null", "'name': expected a string, got None"),
    ],
)
def test_wrong_types_are_still_errors(tmp_path, override, fragment):
    with pytest.raises(UserError) as e:
        config.load(write(tmp_path, base(tmp_path)), [override])
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)

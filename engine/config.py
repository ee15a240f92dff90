"""The recipe schema: typed dataclasses with help text, YAML loading, `${VAR}` expansion, dotted
command-line overrides, and validation that names the offending key.

Every field carries `help` (and optionally `choices`, `min`, `max`) in its metadata; the same
metadata drives type checking, error messages and `python -m engine.run --help`.

Recipe files, `key=value` overrides and `${VAR}` values are read with `YAMLLoader`: YAML 1.2's
core schema (`5e-4` is a number, `off` a string) rather than PyYAML's YAML 1.1.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

import yaml

from engine.errors import UserError
from engine.models import ARCHS
from engine.prune.structured import check_fraction


def opt(default: Any, help: str, **checks: Any) -> Any:
    """A recipe field: default, help text and optional checks (choices, min, max, gt)."""
    meta = {"help": help, **checks}
    if dataclasses.is_dataclass(default):
        return field(default_factory=type(default), metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    arch: str = opt("resnet50", "architecture, built by name by engine.models")
    num_classes: int = opt(1000, "number of output classes", min=2)
    zero_init_residual: bool = opt(False, "zero-init the last BN gamma of each residual block")


@dataclass
class ProgressiveConfig:
    start: int = opt(0, "train image size up to from_epoch; 0 = progressive resizing off", min=0)
    end: int = opt(0, "train image size from to_epoch on; 0 = data.image_size", min=0)
    from_epoch: int = opt(0, "epoch (within a stage) where the size starts to ramp", min=0)
    to_epoch: int = opt(
        0, "epoch where the ramp ends; sizes in between are rounded to multiples of 32", min=0
    )


@dataclass
class DataConfig:
    backend: str = opt("torch", "input pipeline", choices=("synthetic", "torch", "dali"))
    root: str = opt("", "ImageFolder root holding train/<class>/ and val/<class>/")
    batch_size: int = opt(256, "batch size per process (global batch = this x world size)", min=1)
    val_batch_size: int = opt(0, "validation batch size per process; 0 = batch_size", min=0)
    image_size: int = opt(224, "train crop size and val center-crop size in pixels", min=8)
    val_resize: int = opt(0, "val resize of the shorter side; 0 = image_size * 256 / 224", min=0)
    workers: int = opt(
        8, "DataLoader worker processes (torch) or DALI CPU threads, per process", min=0
    )
    decode: str = opt(
        "auto",
        "torch backend JPEG decoding: cpu (in the workers), gpu (workers read bytes, the "
        "main process decodes, crops and normalises on the device), auto (gpu on CUDA with under 8 "
        "workers, else cpu)",
        choices=("auto", "cpu", "gpu"),
    )
    dali_hw_decoder_load: float = opt(
        0.65, "dali: share of each batch sent to the hardware JPEG decoder", min=0.0, max=1.0
    )
    steps_per_epoch: int = opt(0, "cap an epoch at this many steps; 0 = the full dataset", min=0)
    augment: bool = opt(
        True, "train augmentation (random-resized-crop + flip); false = val transform"
    )
    min_crop_scale: float = opt(
        0.08, "random-resized-crop: smallest crop area as a fraction of the image", gt=0.0, max=1.0
    )
    generate_demo: bool = opt(False, "create the embedded demo dataset at root if it is missing")
    progressive: ProgressiveConfig = opt(
        ProgressiveConfig(),
        "progressive resizing: train images grow from start to end px between two epochs",
    )


@dataclass
class PrecisionConfig:
    amp: str = opt(
        "bf16", "autocast dtype (fp16 adds a grad scaler)", choices=("bf16", "fp16", "off")
    )
    channels_last: bool = opt(True, "NHWC memory format for the model and its inputs")
    compile: bool = opt(False, "torch.compile the model")
    compile_mode: str = opt(
        "default",
        "torch.compile mode",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    )


@dataclass
class DDPConfig:
    bucket_mb: float = opt(
        25.0,
        "gradient all-reduce bucket size in MiB under torchrun (torch's default 25); "
        "benchmarks/ddp.py times the choices on your GPUs",
        gt=0.0,
    )


@dataclass
class OptimConfig:
    lr: float = opt(0.1, "peak learning rate of the original schedule", gt=0.0)
    momentum: float = opt(0.9, "SGD momentum (dampening 0)", min=0.0, max=1.0)
    weight_decay: float = opt(1.0e-4, "L2 weight decay", min=0.0)
    nesterov: bool = opt(False, "Nesterov momentum")
    decay_bn_bias: bool = opt(True, "apply weight decay to BN parameters and biases too")
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy loss", min=0.0, max=1.0)
    fused_masked: bool = opt(
        True, "pruned training on CUDA: the Triton masked-SGD kernel (false: SGD + mask pass)"
    )
    reference_batch: int = opt(
        0, "if > 0, scale lr by global batch / reference_batch (linear scaling rule)", min=0
    )


@dataclass
class ScheduleConfig:
    kind: str = opt(
        "step", "LR schedule shape", choices=("step", "cosine", "linear", "onecycle", "constant")
    )
    epochs: int = opt(90, "length of the ORIGINAL (dense) training schedule in epochs", min=1)
    milestones: list[int] = opt([30, 60], "step: epochs at which the LR is multiplied by gamma")
    gamma: float = opt(0.1, "step: LR factor at each milestone", gt=0.0)
    warmup_epochs: float = opt(0.0, "linear warm-up length in epochs (fractional allowed)", min=0.0)
    warmup_start: float = opt(0.0, "LR at the start of warm-up, as a fraction of lr", min=0.0)
    end_factor: float = opt(0.0, "cosine/linear: final LR as a fraction of lr", min=0.0)
    pct_start: float = opt(0.1, "onecycle: fraction of steps spent rising", gt=0.0, max=1.0)
    div_factor: float = opt(100.0, "onecycle: initial LR = lr / div_factor", gt=0.0)
    final_div_factor: float = opt(100.0, "onecycle: final LR = initial / final_div_factor", gt=0.0)


@dataclass
class EvalConfig:
    every_epochs: int = opt(1, "evaluate every N epochs (and always at the end of a stage)", min=1)


@dataclass
class CheckpointConfig:
    every_epochs: int = opt(1, "write checkpoints/last.pt every N epochs", min=1)
    every_steps: int = opt(
        0, "also write last.pt every N steps within an epoch (0 = only at epoch ends)", min=0
    )


@dataclass
class LogConfig:
    every_steps: int = opt(50, "write a `train` line to metrics.jsonl every N steps", min=1)
    tensorboard: bool = opt(False, "also write TensorBoard events (needs the tensorboard package)")
    progress: bool = opt(True, "show a progress bar per epoch on rank 0")


@dataclass
class RunConfig:
    dir: str = opt("", "output folder; empty = runs/<name>-<UTC timestamp>")
    resume: str = opt(
        "", "'' = fresh run, 'auto' = newest unfinished run of this recipe, or a path"
    )
    device: str = opt("auto", "where to train", choices=("auto", "cpu", "cuda"))
    max_skipped_steps: int = opt(
        20,
        "stop (saving last.pt) after this many steps in a row with a non-finite loss or "
        "gradient; such steps are skipped and counted",
        min=1,
    )
    deterministic: bool = opt(
        False, "bitwise-repeatable runs: deterministic cuDNN/torch kernels on GPU (slower)"
    )
    stop_after_epochs: int = opt(
        0,
        "stop after this many epochs of this process, leaving last.pt to resume; 0 = never",
        min=0,
    )


# Stages: each is a one-key mapping in the recipe (`- train: {}`), parsed into one of these.
@dataclass
class LoadStage:
    kind: ClassVar[str] = "load"
    checkpoint: str = opt("", "engine checkpoint or torchvision-format state dict file")
    strict: bool = opt(True, "require every model key to match")


@dataclass
class TrainStage:
    kind: ClassVar[str] = "train"
    epochs: int = opt(0, "epochs to train; 0 = schedule.epochs", min=0)
    rewind_epochs: list[int] = opt(
        [], "save the weights after these epochs (0 = at init) for `wr` retraining", min=0
    )


PRUNE_METHODS = ("global_magnitude", "layer_magnitude", "random", "l1_filter", "random_filter")


@dataclass
class PruneStage:
    kind: ClassVar[str] = "prune"
    method: str = opt("global_magnitude", "pruning criterion", choices=PRUNE_METHODS)
    sparsity: float | list[float] = opt(
        0.0,
        "unstructured: fraction of all prunable weights pruned; a list prunes to each level in "
        "turn, with the next retrain stage run after every level",
        min=0.0,
        max=0.999,
    )
    scope: str = opt(
        "global",
        "random: one draw over all layers or the same fraction per layer",
        choices=("global", "layer"),
    )
    fraction: float | list[float] = opt(
        0.0,
        "structured: fraction of filters removed; a list gives one per stage (ResNet) or "
        "per conv (VGG)",
        min=0.0,
        max=0.999,
    )
    setting: str = opt("", "structured: a named PFEC setting instead of fraction (e.g. A, B)")
    round_to: int = opt(
        1,
        "structured: round each conv's kept filters to the nearest multiple of this; 8 or 16 "
        "suit GPU tensor cores, 1 keeps the paper's counts",
        min=1,
    )
    include_linear: bool = opt(False, "unstructured: prune the final linear layer too")
    exclude_first: bool = opt(False, "unstructured: leave the first conv dense")
    exclude_downsample: bool = opt(False, "unstructured: leave the ResNet shortcut convs dense")


@dataclass
class RetrainStage:
    kind: ClassVar[str] = "retrain"
    variant: str = opt(
        "lrr",
        "LR schedule derived from the original one (DESIGN.md)",
        choices=("ft", "lrr", "wr", "slr", "clr"),
    )
    epochs: int = opt(1, "retraining epochs E", min=1)
    cycle_momentum: bool = opt(True, "clr: cycle momentum inversely to the LR")
    momentum_range: list[float] = opt(
        [0.85, 0.95], "clr: (lowest, highest) momentum", min=0.0, max=1.0
    )
    rewind_checkpoint: str = opt(
        "",
        "wr: weights to rewind to; default: rewind-epoch<T-E>.pt of this run or of the "
        "checkpoint folder of the load stage",
    )


STAGE_TYPES: dict[str, type] = {
    s.kind: s for s in (LoadStage, TrainStage, PruneStage, RetrainStage)
}
Stage = LoadStage | TrainStage | PruneStage | RetrainStage


@dataclass
class Recipe:
    name: str = opt("run", "recipe name: names the run folder and `run.resume=auto` lookups")
    seed: int = opt(0, "seed for initialisation, data order and augmentation", min=0)
    model: ModelConfig = opt(ModelConfig(), "model")
    data: DataConfig = opt(DataConfig(), "data")
    precision: PrecisionConfig = opt(PrecisionConfig(), "precision and compilation")
    ddp: DDPConfig = opt(DDPConfig(), "data-parallel training over several processes")
    optim: OptimConfig = opt(OptimConfig(), "optimizer and loss")
    schedule: ScheduleConfig = opt(ScheduleConfig(), "the original training schedule")
    eval: EvalConfig = opt(EvalConfig(), "evaluation")
    checkpoint: CheckpointConfig = opt(CheckpointConfig(), "checkpoints")
    log: LogConfig = opt(LogConfig(), "logging")
    run: RunConfig = opt(RunConfig(), "run folder, resume and device")
    stages: list[Stage] = opt([], "stages run in order: load, train (and prune, retrain)")


# --------------------------------------------------------------------------------------------
# YAML: the 1.2 core schema


class YAMLLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader with the implicit types of YAML 1.2's core schema instead of 1.1's:
    booleans are only true/True/TRUE/false/False/FALSE (`on`, `off`, `yes`, `no` are strings);
    floats need no dot and no exponent sign (`5e-4`, `1E3`, `.5`, `.inf`, `.nan`); integers
    are decimal (`010` is 10; no octal, hex, `_` or base 60); `2024-01-01` is a string, not a
    date. Null (`~`, `null`, empty) and merge keys (`<<`) are as before."""

    yaml_implicit_resolvers: ClassVar[dict] = {}


for _tag, _pattern, _first in [
    ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
    ("int", r"[-+]?[0-9]+", "-+0123456789"),
    (
        "float",
        r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
        "-+.0123456789",
    ),
    ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ("merge", r"<<", "<"),
]:
    YAMLLoader.add_implicit_resolver(
        f"tag:yaml.org,2002:{_tag}", re.compile(f"^(?:{_pattern})$"), list(_first)
    )
del _tag, _pattern, _first
# Decimal, as the resolver above allows (PyYAML's 1.1 constructor reads `010` as octal 8).
YAMLLoader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: int(node.value))


# --------------------------------------------------------------------------------------------
# Loading


def read_yaml(path: str | os.PathLike, what: str) -> dict:
    """The mapping in a YAML file (`what`: "recipe", "study"), read by `YAMLLoader`; missing
    files, malformed YAML and non-mappings are user errors naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    try:
        raw = yaml.load(path.read_text(), YAMLLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: malformed YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a {what} must be a mapping of keys, got {type(raw).__name__}")
    return raw


def load(path: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    """Read a recipe file, apply `dotted.key=value` overrides, expand `${VAR}`, validate."""
    return from_raw(expand_env(read_raw(path, overrides), ""))


def read_raw(path: str | os.PathLike, overrides: list[str] = ()) -> dict:
    """A recipe file with its overrides applied, before `${VAR}` expansion and validation."""
    path = Path(path)
    raw = read_yaml(path, "recipe")
    raw.setdefault("name", path.stem)
    for item in overrides:
        apply_override(raw, item)
    return raw


def from_raw(raw: dict) -> Recipe:
    """Build and validate a Recipe from plain data (as loaded from YAML)."""
    recipe = _build(Recipe, raw, "")
    validate(recipe)
    recipe.stages = expand_cycles(recipe.stages)
    return recipe


def expand_cycles(stages: list) -> list:
    """Iterative pruning: `prune` with a sparsity list followed by `retrain` becomes one
    prune -> retrain pair per level, so each cycle is an ordinary stage (logged, checkpointed
    and resumed like any other)."""
    out = []
    i = 0
    while i < len(stages):
        stage = stages[i]
        if isinstance(stage, PruneStage) and isinstance(stage.sparsity, list):
            for level in stage.sparsity:
                out += [dataclasses.replace(stage, sparsity=level), stages[i + 1]]
            i += 2
        else:
            out.append(stage)
            i += 1
    return out


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b.c=value` in the raw recipe; the value is parsed as YAML 1.2 (`x=[1,2]`,
    `y=true`, `z=5e-4`), text that is no valid YAML is taken as it is."""
    key, eq, text = item.partition("=")
    if not eq or not key:
        raise UserError(f"override '{item}': expected dotted.key=value")
    try:
        value = yaml.load(text, YAMLLoader) if text else ""
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_index(node, part, parts[: i + 1])]
        else:
            if not isinstance(node.get(part), (dict, list)):
                node[part] = [] if parts[i + 1].isdigit() else {}
            node = node[part]
        if not isinstance(node, (dict, list)):
            raise UserError(
                f"override key '{key}': '{'.'.join(parts[: i + 1])}' is {_show(node)}, "
                "which has no keys or items"
            )
    last = parts[-1]
    if isinstance(node, list):
        node[_index(node, last, parts)] = value
    else:
        node[last] = value


def _index(node: list, part: str, parts: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise UserError(f"override key '{'.'.join(parts)}': no list item {part} (has {len(node)})")
    return int(part)


# `${VAR}` or `${VAR:-default}` (group 2: the default, None without one)
ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(node: Any, key: str) -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in strings; a value that was only a variable is
    re-read as YAML so numbers stay numbers. A missing variable is a user error."""
    if isinstance(node, dict):
        return {k: expand_env(v, f"{key}.{k}" if key else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [expand_env(v, f"{key}.{i}") for i, v in enumerate(node)]
    if not isinstance(node, str) or "$" not in node:
        return node

    def sub(m: re.Match) -> str:
        value = os.environ.get(m.group(1), m.group(2))
        if value is None:
            raise UserError(f"recipe key '{key}': environment variable {m.group(1)} is not set")
        return value

    out = ENV_VAR.sub(sub, node)
    return yaml.load(out, YAMLLoader) if ENV_VAR.fullmatch(node) and out else out


# --------------------------------------------------------------------------------------------
# Type checking


def _build(cls: type, raw: Any, key: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"recipe key '{key}': expected a mapping, got {_show(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name in raw:
        if name not in fields:
            where = f"{key}.{name}" if key else str(name)
            close = difflib.get_close_matches(str(name), fields, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise UserError(f"unknown recipe key '{where}' ({hint}allowed: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        if name in raw:
            sub = f"{key}.{name}" if key else name
            values[name] = _check(_coerce(raw[name], hints[name], sub), f.metadata, sub)
    return cls(**values)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Stage:
        return _build_stage(value, key)
    if origin in (Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key)
            except UserError:
                continue
        names = " or ".join(_name(a) for a in typing.get_args(tp))
        raise UserError(f"recipe key '{key}': expected {names}, got {_show(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"recipe key '{key}': expected a list, got {_show(value)}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}.{i}") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and type(value) is int:  # `name: 2024`: YAML's integer, the user's text
        return str(value)
    if type(value) is tp:  # exact: a bool is not an int, an int is not a str
        return value
    raise UserError(f"recipe key '{key}': expected {_name(tp)}, got {_show(value)}")


def _build_stage(value: Any, key: str) -> Any:
    kinds = ", ".join(STAGE_TYPES)
    if not isinstance(value, dict) or len(value) != 1:
        has = ""
        if isinstance(value, dict) and value:  # `stages.0.trian={}` adds a key to stage 0
            guesses = [g for k in value if k not in STAGE_TYPES and (g := _closest_kind(k))]
            hint = f" (did you mean '{guesses[0]}'?)" if guesses else ""
            has = f"; it has {', '.join(repr(k) for k in value)}{hint}"
        raise UserError(f"recipe key '{key}': a stage is a one-key mapping, one of: {kinds}{has}")
    ((kind, body),) = value.items()
    if kind not in STAGE_TYPES:
        close = _closest_kind(kind)
        hint = f"did you mean '{close}'? " if close else ""
        raise UserError(f"recipe key '{key}': unknown stage '{kind}' ({hint}allowed: {kinds})")
    return _build(STAGE_TYPES[kind], body, f"{key}.{kind}")


def _closest_kind(kind: Any) -> str | None:
    close = difflib.get_close_matches(str(kind), STAGE_TYPES, n=1)
    return close[0] if close else None


def _check(value: Any, meta: Any, key: str) -> Any:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise UserError(f"recipe key '{key}': {_show(value)} is not one of {', '.join(choices)}")
    for item in value if isinstance(value, list) else [value]:
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            continue
        if "min" in meta and item < meta["min"]:
            raise UserError(f"recipe key '{key}': {item} is below the minimum {meta['min']}")
        if "max" in meta and item > meta["max"]:
            raise UserError(f"recipe key '{key}': {item} is above the maximum {meta['max']}")
        if "gt" in meta and item <= meta["gt"]:
            raise UserError(f"recipe key '{key}': {item} must be greater than {meta['gt']}")
    return value


def _name(tp: Any) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --------------------------------------------------------------------------------------------
# Cross-field validation: what each key allows given the others.


def validate(r: Recipe) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", r.name):
        raise UserError(f"recipe key 'name': {r.name!r} may hold only letters, digits, _ . -")
    if r.model.arch not in ARCHS:
        raise UserError(
            f"recipe key 'model.arch': unknown architecture {r.model.arch!r} "
            f"(allowed: {', '.join(ARCHS)})"
        )
    if r.log.tensorboard and importlib.util.find_spec("tensorboard") is None:  # every rank
        raise UserError(
            "recipe key 'log.tensorboard': the tensorboard package is not installed "
            "(pip install 'engine[tensorboard]')"
        )
    d = r.data
    if d.backend == "synthetic" and d.steps_per_epoch == 0:
        raise UserError("recipe key 'data.steps_per_epoch': the synthetic backend needs it > 0")
    if d.backend != "synthetic":
        if not d.root:
            raise UserError(f"recipe key 'data.root': required by the {d.backend} backend")
        root = Path(d.root)
        if not d.generate_demo:
            for split in ("train", "val"):
                if not (root / split).is_dir():
                    raise UserError(f"recipe key 'data.root': folder not found: {root / split}")
    s = r.schedule
    if s.kind == "step" and (
        list(s.milestones) != sorted(set(s.milestones))
        or any(not 0 < m < s.epochs for m in s.milestones)
    ):
        raise UserError(
            f"recipe key 'schedule.milestones': {s.milestones} must be increasing epochs "
            f"in (0, {s.epochs})"
        )
    if s.warmup_epochs >= s.epochs:
        raise UserError(
            f"recipe key 'schedule.warmup_epochs': {s.warmup_epochs} must be below "
            f"schedule.epochs ({s.epochs})"
        )
    if s.kind == "onecycle" and s.warmup_epochs:
        raise UserError(
            "recipe key 'schedule.warmup_epochs': must be 0 with kind onecycle, which warms up "
            "by itself (schedule.pct_start)"
        )
    if not r.stages:
        raise UserError("recipe key 'stages': at least one stage is required (e.g. - train: {})")
    for i, stage in enumerate(r.stages):
        key = f"stages.{i}.{stage.kind}"
        if isinstance(stage, LoadStage):
            if not stage.checkpoint:
                raise UserError(f"recipe key '{key}.checkpoint': required")
            if not Path(stage.checkpoint).is_file():
                raise UserError(
                    f"recipe key '{key}.checkpoint': file not found: {stage.checkpoint}"
                )
        elif isinstance(stage, TrainStage):
            epochs = stage.epochs or s.epochs
            if any(e > epochs for e in stage.rewind_epochs):
                raise UserError(f"recipe key '{key}.rewind_epochs': epochs must be <= {epochs}")
        elif isinstance(stage, PruneStage):
            _validate_prune(r, stage, i)
        elif isinstance(stage, RetrainStage):
            _validate_retrain(r, stage, i)


def _validate_prune(r: Recipe, stage: PruneStage, i: int) -> None:
    key = f"stages.{i}.prune"
    if not any(isinstance(x, (LoadStage, TrainStage)) for x in r.stages[:i]):
        raise UserError(f"recipe key '{key}': a prune stage needs a train or load stage before it")
    if stage.scope != "global" and stage.method != "random":
        raise UserError(f"recipe key '{key}.scope': only random pruning takes scope")
    structured = stage.method in ("l1_filter", "random_filter")
    if structured:
        if stage.sparsity:
            raise UserError(
                f"recipe key '{key}.sparsity': {stage.method} takes fraction or setting"
            )
        if bool(stage.setting) == bool(stage.fraction):
            raise UserError(f"recipe key '{key}.fraction': give exactly one of fraction, setting")
        if any(isinstance(x, PruneStage) for x in r.stages[:i]):
            raise UserError(f"recipe key '{key}': structured pruning must be the first prune stage")
        try:
            check_fraction(r.model.arch, r.model.num_classes, stage.setting or stage.fraction)
        except ValueError as e:
            which = "setting" if stage.setting else "fraction"
            raise UserError(f"recipe key '{key}.{which}': {e}") from None
        return
    if stage.fraction or stage.setting:
        raise UserError(f"recipe key '{key}.fraction': {stage.method} takes sparsity")
    levels = stage.sparsity if isinstance(stage.sparsity, list) else [stage.sparsity]
    if not levels or levels != sorted(set(levels)):
        raise UserError(f"recipe key '{key}.sparsity': levels must be strictly increasing")
    if isinstance(stage.sparsity, list) and not (
        i + 1 < len(r.stages) and isinstance(r.stages[i + 1], RetrainStage)
    ):
        raise UserError(
            f"recipe key '{key}.sparsity': a list of levels needs a retrain stage right after it "
            "(run after every level)"
        )


def _validate_retrain(r: Recipe, stage: RetrainStage, i: int) -> None:
    key = f"stages.{i}.retrain"
    T, E = r.schedule.epochs, stage.epochs
    if len(stage.momentum_range) != 2 or stage.momentum_range[0] > stage.momentum_range[1]:
        raise UserError(f"recipe key '{key}.momentum_range': expected [low, high] with low <= high")
    if stage.variant in ("lrr", "wr") and E > T:
        raise UserError(
            f"recipe key '{key}.epochs': {stage.variant} replays the original schedule from "
            f"epoch T - E, so E ({E}) must be <= schedule.epochs ({T})"
        )
    if stage.variant == "wr":
        rewind_source(r, stage, i)


def rewind_source(r: Recipe, stage: RetrainStage, i: int) -> Path | int:
    """Where `wr` finds the weights of epoch T - E: a file, or the epoch a train stage of this
    recipe saves (then the file appears in the run's checkpoints folder)."""
    key = f"stages.{i}.retrain"
    epoch = r.schedule.epochs - stage.epochs
    name = f"rewind-epoch{epoch}.pt"
    if any(
        isinstance(x, PruneStage) and x.method in ("l1_filter", "random_filter")
        for x in r.stages[:i]
    ):
        raise UserError(f"recipe key '{key}.variant': wr supports unstructured pruning only")
    if stage.rewind_checkpoint:
        if not Path(stage.rewind_checkpoint).is_file():
            raise UserError(
                f"recipe key '{key}.rewind_checkpoint': file not found: {stage.rewind_checkpoint}"
            )
        return Path(stage.rewind_checkpoint)
    trains = [x for x in r.stages[:i] if isinstance(x, TrainStage)]
    if trains:
        if epoch not in trains[-1].rewind_epochs:
            raise UserError(
                f"recipe key '{key}.variant': wr needs the weights of epoch {epoch} (T - E): "
                f"add rewind_epochs: [{epoch}] to the train stage"
            )
        return epoch
    loads = [x for x in r.stages[:i] if isinstance(x, LoadStage)]
    path = Path(loads[-1].checkpoint).parent / name if loads else Path(name)
    if not path.is_file():
        raise UserError(
            f"recipe key '{key}.variant': wr needs the weights of epoch {epoch} (T - E) and "
            f"{path} does not exist: set rewind_checkpoint, or train with rewind_epochs: [{epoch}]"
        )
    return path


def to_dict(recipe: Recipe) -> dict:
    """Plain data of a recipe, in the shape it is written (stages as one-key mappings)."""
    out = dataclasses.asdict(recipe)
    out["stages"] = [{s.kind: dataclasses.asdict(s)} for s in recipe.stages]
    return out


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b.0.c': value} for nested dicts and lists: to compare two recipes key by key."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list) and node and isinstance(node[0], dict):
        items = enumerate(node)
    else:
        return {prefix: node}
    out = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def describe(cls: type = Recipe, prefix: str = "") -> list[str]:
    """One line per recipe key: name, default and help, for `--help`; a section's own keys
    before its subsections (so that no key reads as part of the subsection above it)."""
    lines = []
    hints = typing.get_type_hints(cls)
    fields = sorted(dataclasses.fields(cls), key=lambda f: dataclasses.is_dataclass(hints[f.name]))
    for f in fields:
        key = prefix + f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{key}:")
            lines += describe(tp, key + ".")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        choices = f.metadata.get("choices")
        extra = f" [{'|'.join(choices)}]" if choices else ""
        lines.append(f"  {key} = {default!r}{extra}  -- {f.metadata.get('help', '')}")
    if cls is Recipe:
        for kind, st in STAGE_TYPES.items():
            lines.append(f"stage '{kind}':")
            lines += describe(st, f"{kind}.")
    return lines

"""Typed dataclass configs: YAML in, dotted overrides, validation with clear errors.

Every config in mmlm is a (nested) dataclass. ``from_dict`` builds one from plain data and
checks it: an unknown key names the key, its section and the closest valid key; a wrong type
names the expected type. ``load_config`` reads a recipe YAML and applies ``a.b=c`` overrides.

Longer than 400 lines on purpose: every run-level section (data, train, eval, ...) is one dataclass here,
so the whole recipe schema and its cross-field checks read in one place (the models' own configs live
beside their models).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names where and what was expected."""


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (dicts to dataclasses)."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        if len(errors) == 1:  # one alternative besides null (an optional section): its own, precise error
            raise ConfigError(errors[0])
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping (section {tp.__name__}), got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items ({_type_name(tp)}), got {value!r}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping ({_type_name(tp)}), got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_convert(k, kt, where): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):  # YAML 1.1 reads "3e-4" as str
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected float, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected int, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected bool (true/false), got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected str, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, validating keys and types recursively."""
    data = dict(data or {})
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    section = where or cls.__name__
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown key '{key}' in section '{section}'{hint}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{where}.{name}" if where else name)
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"section '{section}': {err}") from err
    except Exception as err:  # a __post_init__ check tripping over a value it did not expect (e.g. 0 heads)
        raise ConfigError(f"section '{section}': invalid values {data!r:.200} ({type(err).__name__}: {err})") from err
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as plain JSON/YAML-serialisable data."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003); values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override '{text}': empty key part")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides to a plain dict (validated later by ``from_dict``)."""
    data = copy.deepcopy(data)  # not a JSON round trip: YAML values such as dates must reach validation intact
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"override '{text}': '{part}' is a value, not a section")
            node = node[part]
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file (and line, for syntax errors)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {getattr(err, 'problem', err)}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def save_yaml(data: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


# --------------------------------------------------------------------------------------
# Run-level sections shared by every task. Model sections live next to their models
# (VLMConfig in mmlm.models.vlm, TextToImageConfig in mmlm.models.diffusion).
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class ShapesConfig:
    """The embedded procedural dataset (mmlm.data.shapes)."""

    n_train: int = 20000
    n_val: int = 500
    n_test: int = 1000
    n_compositional: int = 1000
    image_size: int = 64
    min_shapes: int = 1
    max_shapes: int = 3
    language: str = "en"  # "en" or "zh"
    # The canonical caption's words: "a large green circle on the left" (colour_kind), "a large circle in
    # green on the left" (kind_colour), "on the left a large circle in green" (position_kind_colour); Chinese
    # "左边一个绿色的大圆形" (colour_kind) or "左边一个大圆形是绿色的" (kind_colour)
    word_order: str = "colour_kind"
    seed: int = 0


@dataclasses.dataclass
class DataConfig:
    """Where the image-text data comes from and how it is batched."""

    source: str = "shapes"  # "shapes", "digits", or a path: JSONL/CSV/COCO JSON/ImageFolder dir/tar shards
    format: str = "auto"  # auto | jsonl | csv | coco | imagefolder | webdataset | hf
    val_source: str | None = None
    test_source: str | None = None
    val_fraction: float = 0.05  # split off train when no val_source is given
    split_seed: int = 0  # digits: seed of the permutation behind its train/val/test split (80/10/10)
    shapes: ShapesConfig = dataclasses.field(default_factory=ShapesConfig)
    label_field: str = "label"  # which attribute is the class label for classification
    batch_size: int = 32
    eval_batch_size: int = 64
    num_workers: int = 0
    worker_timeout_s: float = 600.0  # a DataLoader worker silent this long is reported with the file it was reading
    on_bad_image: str = "error"  # "error" stops at the first bad file; "skip" skips and counts
    allow_absolute_paths: bool = False
    max_image_pixels: int = 64_000_000
    caption_choice: str = "random"  # "random": one of a record's captions per epoch; "first": always the first
    shuffle_buffer: int = 1000  # streamed (tar shard) training data: samples in the shuffle buffer; 0 = stream order

    def __post_init__(self):
        if self.caption_choice not in ("random", "first"):
            raise ConfigError(f"data.caption_choice: expected 'random' or 'first', got {self.caption_choice!r}")
        if self.on_bad_image not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_image: expected 'error' or 'skip', got {self.on_bad_image!r}")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size: expected >= 1, got {self.batch_size}")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"data.shuffle_buffer: expected >= 0, got {self.shuffle_buffer}")


@dataclasses.dataclass
class DDPConfig:
    """Options passed to torch's DistributedDataParallel (through accelerate) when several processes train."""

    find_unused_parameters: bool = False  # parts that get no gradient in some steps (e.g. a frozen branch)
    static_graph: bool = False
    gradient_as_bucket_view: bool = False
    bucket_cap_mb: int = 25
    broadcast_buffers: bool = True


@dataclasses.dataclass
class FSDPConfig:
    """Fully sharded data parallel (FSDP2, through accelerate); GPUs, or CPU processes with gloo (mmlm.training.distributed)."""

    enabled: bool = False
    sharding_strategy: str = "full_shard"  # full_shard (reshard after forward) | shard_grad_op (keep until backward)
    auto_wrap: list[str] = dataclasses.field(default_factory=list)  # class names; [] = the task's (LM + vision blocks)
    cpu_offload: bool = False
    activation_checkpointing: bool = False

    def __post_init__(self):
        if self.sharding_strategy not in ("full_shard", "shard_grad_op"):
            raise ConfigError(f"train.fsdp.sharding_strategy: expected 'full_shard' or 'shard_grad_op', "
                              f"got {self.sharding_strategy!r}")


@dataclasses.dataclass
class TrainConfig:
    """The optimisation loop (mmlm.training.trainer); cross-field checks in :func:`validate_train_config`."""

    lr: float = 3e-4
    module_lr: dict[str, float] = dataclasses.field(default_factory=dict)  # e.g. {"vision": 2e-3}; 0 freezes
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.1
    max_steps: int | None = None
    epochs: float | None = None
    # Training-time budget: evaluation and checkpoints pause the clock; the LR schedule is fitted to it.
    max_minutes: float | None = None
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "auto"  # auto (bf16 on capable GPUs, fp32 on CPU) | no | bf16 | fp16
    gradient_checkpointing: bool = False
    ema_decay: float | None = None
    eval_every: int | None = None  # steps; None = only at the end
    save_every: int | None = None  # steps; None = only at the end
    keep_last: int = 2
    best_metric: str | None = None  # e.g. "val/exact_match"; higher is better unless it ends in "loss"
    log_every: int = 10
    report_to: list[str] = dataclasses.field(default_factory=list)  # tensorboard / wandb / mlflow (train.trackers)
    seed: int = 0
    # torch.compile of the training forward; on the shapes recipes (2-core CPU) 1.22-1.30x the steps/s after 61-71 s
    # of compilation, so it pays past ~2,000-3,300 steps (benchmarks/results/shapes_diffusion.md)
    compile: bool = False
    fused_adamw: bool = True  # torch's fused AdamW kernel where the parameters allow it (CPU, CUDA)
    # adamw | muon: Muon on the weight matrices and conv kernels, AdamW on the rest, one lr (mmlm/training/muon.py).
    # The shapes generator's (lr 6e-3): the 90% bar in 40k samples on two seeds (AdamW: 48-64k) at 0.71-0.81x the
    # steps/s on CPU (benchmarks/results/shapes_diffusion.md)
    optimizer: str = "adamw"
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5  # Newton-Schulz iterations per Muon update
    num_threads: int | None = None  # torch.set_num_threads on CPU
    ddp: DDPConfig = dataclasses.field(default_factory=DDPConfig)
    fsdp: FSDPConfig = dataclasses.field(default_factory=FSDPConfig)

    def __post_init__(self):
        if self.grad_accum_steps < 1:
            raise ConfigError(f"train.grad_accum_steps: expected >= 1, got {self.grad_accum_steps}")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"train.schedule: expected 'cosine' or 'constant', got {self.schedule!r}")
        if self.optimizer not in ("adamw", "muon"):
            raise ConfigError(f"train.optimizer: expected 'adamw' or 'muon', got {self.optimizer!r}")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ConfigError(f"train.muon_momentum: expected a value in [0, 1), got {self.muon_momentum}")
        if self.muon_ns_steps < 1:
            raise ConfigError(f"train.muon_ns_steps: expected >= 1, got {self.muon_ns_steps}")


MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


def validate_train_config(train: TrainConfig) -> None:
    """Checks that need more than one field, or that the dataclass itself does not make (run by the Trainer)."""
    if train.max_steps is None and train.epochs is None and train.max_minutes is None:
        raise ConfigError("train: set at least one of max_steps, epochs or max_minutes")
    positive = {"max_steps": train.max_steps, "epochs": train.epochs, "max_minutes": train.max_minutes,
                "eval_every": train.eval_every, "save_every": train.save_every, "log_every": train.log_every,
                "keep_last": train.keep_last, "num_threads": train.num_threads}
    for key, value in positive.items():
        if value is not None and value <= 0:
            raise ConfigError(f"train.{key}: expected > 0, got {value}")
    if train.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps: expected >= 0, got {train.warmup_steps}")
    if train.max_grad_norm is not None and train.max_grad_norm <= 0:
        raise ConfigError(f"train.max_grad_norm: expected > 0 or null, got {train.max_grad_norm}")
    if train.ema_decay is not None and not 0.0 < train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay: expected a value in (0, 1) or null, got {train.ema_decay}")
    if train.lr <= 0:
        raise ConfigError(f"train.lr: expected > 0, got {train.lr}")
    if train.mixed_precision not in MIXED_PRECISION:
        raise ConfigError(f"train.mixed_precision: expected 'auto', 'no', 'bf16' or 'fp16', "
                          f"got {train.mixed_precision!r}")


@dataclasses.dataclass
class EvalConfig:
    """What evaluation computes and writes."""

    splits: list[str] = dataclasses.field(default_factory=lambda: ["test"])
    max_samples: int | None = None
    num_examples: int = 16  # qualitative samples written to the run folder
    prompts: list[str] = dataclasses.field(default_factory=list)  # generation prompts for reports
    labels: list[str] = dataclasses.field(default_factory=list)  # candidate labels (classification)
    templates: list[str] = dataclasses.field(default_factory=lambda: ["a photo of a {}"])
    # generation
    samplers: list[str] = dataclasses.field(default_factory=lambda: ["dpm++:20"])  # "name:steps"; first = main
    judge_steps: int = 600  # training steps of the independent shapes judge (prompt fidelity, FID/KID features)
    captioner: str | None = None  # saved captioner for the caption round trip of generated images


@dataclasses.dataclass
class RunConfig:
    """A whole recipe: one YAML file in configs/."""

    task: str = "captioning"  # captioning | classification | vqa | diffusion
    output_dir: str = "runs/default"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: Any = None  # the task's model config dataclass (VLMConfig, TextToImageConfig, ...)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)


# The model section's dataclass for each task, imported lazily so config.py stays light.
MODEL_CONFIGS: dict[str, str] = {
    "captioning": "mmlm.models.vlm:VLMConfig",
    "classification": "mmlm.models.vlm:VLMConfig",
    "vqa": "mmlm.models.vlm:VLMConfig",
    "diffusion": "mmlm.models.diffusion:TextToImageConfig",
}


def model_config_class(task: str) -> type:
    if task not in MODEL_CONFIGS:
        close = difflib.get_close_matches(task, list(MODEL_CONFIGS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown task '{task}' (key 'task'); expected one of {', '.join(MODEL_CONFIGS)}{hint}")
    module_name, cls_name = MODEL_CONFIGS[task].split(":")
    import importlib

    return getattr(importlib.import_module(module_name), cls_name)


def build_run_config(data: dict[str, Any], where: str = "") -> RunConfig:
    """Validate plain data into a RunConfig, typing the model section by the task."""
    data = dict(data)
    model_data = data.pop("model", None) or {}
    cfg = from_dict(RunConfig, data, where)
    cfg.model = from_dict(model_config_class(cfg.task), model_data, "model")
    return cfg


def load_config(source: str | Path | dict[str, Any] | None = None, overrides: list[str] = ()) -> RunConfig:
    """Load a recipe (YAML path or dict), apply ``key=value`` overrides, validate.

    >>> cfg = load_config("configs/shapes_captioner.yaml", ["train.lr=3e-4", "data.batch_size=32"])
    """
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, dict):
        data = source
    else:
        data = read_yaml(source)
    data = apply_overrides(data, list(overrides))
    where = f"{source}" if isinstance(source, (str, Path)) else ""
    try:
        return build_run_config(data)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}" if where else str(err)) from None


def save_run_config(cfg: RunConfig, path: str | Path) -> None:
    save_yaml(to_dict(cfg), path)

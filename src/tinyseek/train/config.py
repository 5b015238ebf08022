"""The training configuration: one dataclass per concern, loaded from YAML or TOML, overridden from the command line,
and checked strictly (an unknown key or a value of the wrong type is a `ConfigError` that names the key)."""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from tinyseek.config import TinySeekConfig
from tinyseek.data.builtin import is_builtin
from tinyseek.distributed import STRATEGIES
from tinyseek.errors import ConfigError, FileError
from tinyseek.generate.sampling import Sampling
from tinyseek.train.budget import parse_duration

# Inside the package (a link to the repository's configs/), so installed copies find the presets too.
PRESET_DIR = Path(__file__).resolve().parents[1] / "configs"
DTYPES = ("auto", "fp32", "bf16", "fp16")
CHECKPOINTING_MODES = ("none", "full", "selective")
SCHEDULES = ("cosine", "wsd", "constant")
OPTIMIZER_IMPLEMENTATIONS = ("auto", "fused", "foreach", "for-loop")
DEFAULT_MODEL_PRESET = "seed"


@dataclass
class DataConfig:
    source: str | None = None
    """A Hub dataset name, a local file or directory of text, or a directory made by `tinyseek prepare`;
    None means the data module's default dataset."""
    tokenizer: str | None = None
    """A tokenizer directory or tokenizer.json; None means the data module's default tokenizer."""
    cache_dir: str = "~/.cache/tinyseek/data"
    """Where raw sources are tokenized to on first use (reused by later runs with the same source and tokenizer)."""
    text_column: str = "text"
    split_by: str | None = None
    """A column (e.g. a book title) that decides the train/val split, so no group sits in both; None splits by
    document."""
    val_fraction: float = 0.01
    val_documents: int | None = None
    mixture: dict[str, float] = field(default_factory=dict)
    """More training sources (a local file, directory or Hub name) and their weights, relative to `weight` of
    `source`. Validation stays `source`'s; the other sources leave out its validation groups (`split_by`)."""
    weight: float = 1.0
    """The share of `source` in a mixture, relative to the weights in `mixture`."""
    seq_len: int = 32
    micro_batch_size: int = 1
    grad_accum: int = 8


@dataclass
class OptimConfig:
    name: str = "adamw"
    """A registered optimizer (``tinyseek.train.optim.OPTIMIZERS``)."""
    lr: float = 5e-5
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    """Learning-rate multiplier per parameter role ("matrix", "head", "embedding", "vector"; 1 if not given), and with
    optim.name muon for the matrices Muon takes ("muon", on top of their role's)."""
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    max_non_finite_steps: int = 5
    """A step whose loss or gradient is NaN or infinite is skipped (no optimizer or bias update, counted and logged);
    this many in a row stop the run without saving."""
    implementation: str = "auto"
    """AdamW kernel: "fused" (one kernel for all tensors, fastest on CPU and CUDA), "foreach", "for-loop", or
    "auto" (fused where the device supports it, else foreach)."""


@dataclass
class ScheduleConfig:
    kind: str = "cosine"
    """"cosine": linear warmup then cosine decay to the floor; "wsd": warmup, stable, then linear decay to the floor
    over the last `decay_fraction` of the steps; "constant": warmup then flat."""
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    """The floor, as a fraction of the peak learning rate."""
    decay_fraction: float = 0.2


@dataclass
class CheckpointConfig:
    every: int = 100
    keep: int = 1


@dataclass
class LoggingConfig:
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 20
    sample_every: int = 100
    tensorboard: bool = False
    progress_bar: bool = True
    peak_flops: float | None = None
    """Peak FLOP/s of the device for the MFU estimate; None measures a matmul once at startup."""


@dataclass
class SampleConfig:
    prompts: list[str] = field(
        default_factory=lambda: ["The history of", "In mathematics, a function is", "Once upon a time"]
    )
    max_new_tokens: int = 40
    do_sample: bool = True
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    min_p: float = 0.0
    repetition_penalty: float = 1.1

    def sampling(self, seed: int | None) -> Sampling:
        """These settings as the generation engine's sampling configuration (``do_sample: false`` is greedy)."""
        return Sampling(
            self.temperature if self.do_sample else 0.0, self.top_k, self.top_p, self.min_p, self.repetition_penalty, seed
        )


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    max_steps: int = 10_000
    """Optimizer steps; each consumes micro_batch_size * grad_accum * world_size windows."""
    time_budget: str | None = None
    """A wall-clock budget ("15m", "90s", "1h30m") that replaces max_steps: the first steps are timed, max_steps is
    fixed once from the measured rate and kept by checkpoints, so a resumed run follows the same schedule."""
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    """"auto": bf16 autocast on CPU and on GPUs that support it, fp16 with a GradScaler on GPUs that don't, fp32
    on MPS; or one of "fp32", "bf16", "fp16"."""
    gradient_checkpointing: str | bool = "none"
    """"none"; "full": recompute each decoder layer's forward in the backward pass; "selective": recompute only its
    cheap element-wise ops and keep matmul and attention outputs (most of full's memory saving at a fraction of its
    recompute). `true`/`false` (older configs) mean "full"/"none"."""
    compile: bool = False
    """torch.compile each decoder layer's training forward (regional compilation: one block compiled once and reused
    by every layer, seconds rather than minutes); falls back to eager with a message where no compiler works."""
    parallel: str = "ddp"
    """Data parallelism under torchrun: "ddp" (DistributedDataParallel) or "fsdp" (FSDP2, parameters sharded per
    decoder layer). A single process ignores it."""
    model: dict[str, Any] = field(default_factory=lambda: {"preset": DEFAULT_MODEL_PRESET})
    """`preset` (a name in tinyseek.PRESETS, default "seed"; null for TinySeekConfig's own defaults) plus any
    TinySeekConfig field, which overrides the preset."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    # Set by load_config, and not config keys (a ClassVar is no field: not in to_dict, not accepted in a file): lines
    # for the run's log, and the keys whose values a preset chose rather than the user.
    notes: ClassVar[tuple[str, ...]] = ()
    preset_keys: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self):
        if isinstance(self.gradient_checkpointing, bool):
            self.gradient_checkpointing = "full" if self.gradient_checkpointing else "none"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def build_model_config(self, **tokenizer_defaults) -> TinySeekConfig:
        """The model's TinySeekConfig: preset, then `tokenizer_defaults` (special-token ids), then explicit fields."""
        fields = dict(self.model)
        preset = fields.pop("preset", None)
        explicit = {**{k: v for k, v in tokenizer_defaults.items() if k not in fields}, **fields}
        try:
            if preset is None:
                return TinySeekConfig(**explicit)
            return TinySeekConfig.from_preset(preset, **explicit)
        except ValueError as error:
            raise ConfigError(f"model.{error}") from None


def resolve_config_path(name_or_path: str) -> Path:
    """A config file path, or the name of a preset under configs/ (`seed`, `cpu-quick`, ...)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    for suffix in (".yaml", ".yml", ".toml"):
        preset = PRESET_DIR / f"{name_or_path}{suffix}"
        if preset.is_file():
            return preset
    known = sorted(p.stem for p in PRESET_DIR.glob("*.y*ml")) if PRESET_DIR.is_dir() else []
    raise FileError(f"config {name_or_path!r}: no such file, and not a preset (presets: {', '.join(known) or 'none'})")


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        if path.suffix == ".toml":
            raw = read_toml(path)
        else:
            raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, ValueError) as error:
        raise ConfigError(f"config {path}: cannot parse it: {error}".replace("\n", " ")) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise ConfigError(f"config {path}: TOML configs need Python 3.11 or newer; use YAML") from None
    return tomllib.loads(path.read_text())  # TOMLDecodeError is a ValueError


def parse_assignment(assignment: str) -> tuple[list[str], Any]:
    """`section.key=value` from `--set`; the value is read as YAML, so `true`, `3`, `[0.9, 0.95]` keep their types."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set optim.lr=3e-4")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip().split("."), value


def set_nested(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {part!r} is a value, not a section")
        node = child
    node[path[-1]] = value


def load_config(
    config: str | None = None, overrides: list[tuple[list[str], Any]] = (), *, look_up_tokenizer: bool = True
) -> TrainConfig:
    """Defaults, then the config file (a path or preset name), then `overrides` (key path, value; the command line)
    in order.

    The command line states what the user wants, where a preset only proposes: its `max_steps` replaces the file's
    `time_budget`, and the preset's keys are recorded in `preset_keys` (a preset's `data.split_by` gives way to data
    without that column). A relative `data.tokenizer` from the file is looked up beside the file as well as in the
    current directory, unless `look_up_tokenizer` is false (a report on the config, which needs no tokenizer).
    """
    path = resolve_config_path(config) if config is not None else None
    tree = read_config_file(path) if path is not None else {}
    given = {".".join(key): value for key, value in overrides}
    notes = []
    if "max_steps" in given:
        if given.get("time_budget") is not None:
            raise ConfigError("--max-steps and --time-budget: give one of them (a time budget sets max_steps from the "
                              "first steps' speed)")
        if tree.get("time_budget") is not None and "time_budget" not in given:
            notes.append(f"max_steps {given['max_steps']} from the command line replaces the config's time_budget "
                         f"{tree['time_budget']}")
            tree["time_budget"] = None
    preset_keys = dotted_keys(tree) - set(given) if path is not None and is_preset(path) else set()
    for key, value in overrides:
        set_nested(tree, key, value)
    if path is not None and look_up_tokenizer and "data.tokenizer" not in given:
        find_relative_tokenizer(tree, path)
    train_config = build_dataclass(TrainConfig, tree, prefix="")
    validate(train_config)
    train_config.notes = tuple(notes)
    train_config.preset_keys = frozenset(preset_keys)
    return train_config


def is_preset(path: Path) -> bool:
    return path.resolve().parent == PRESET_DIR.resolve()


def dotted_keys(tree: dict[str, Any], prefix: str = "") -> set[str]:
    """Every key of a nested mapping, sections included, as `section.key`."""
    keys = set()
    for name, value in tree.items():
        keys.add(f"{prefix}{name}")
        if isinstance(value, dict):
            keys |= dotted_keys(value, f"{prefix}{name}.")
    return keys


def find_relative_tokenizer(tree: dict[str, Any], config_path: Path) -> None:
    """A config file's relative `data.tokenizer` names a path in the current directory or beside the file (a preset
    read from anywhere); the first that exists replaces it. A path written as one (`./`, `../`) that exists in
    neither is an error that says where it looked; anything else may still be a Hub name."""
    data = tree.get("data")
    spec = data.get("tokenizer") if isinstance(data, dict) else None
    if not isinstance(spec, str) or is_builtin(spec) or Path(spec).expanduser().is_absolute():
        return
    places = [Path.cwd() / spec, config_path.resolve().parent / spec]
    found = next((place for place in places if place.exists()), None)
    if found is not None:
        data["tokenizer"] = spec if found == places[0] else str(found)
    elif spec.startswith(("./", "../")):
        raise ConfigError(
            f"data.tokenizer {spec!r} (from {config_path.name}): looked for {places[0]} and {places[1]}, found "
            "neither; create it there or pass --tokenizer PATH"
        )


def build_dataclass(cls, values: dict[str, Any], prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a section (mapping), got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}; {prefix or 'top level'} keys are: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_dataclass(hint, value, prefix=f"{prefix}{name}.")
        elif name == "model" and cls is TrainConfig:
            kwargs[name] = check_model_section(value)
        else:
            kwargs[name] = check_type(f"{prefix}{name}", value, hint)
    return cls(**kwargs)


def check_model_section(values: Any) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise ConfigError(f"model: expected a section (mapping), got {values!r}")
    hints = typing.get_type_hints(TinySeekConfig.__init__)
    fields = {name for name in inspect.signature(TinySeekConfig.__init__).parameters if name in hints}
    checked = {"preset": DEFAULT_MODEL_PRESET}
    for name, value in values.items():
        if name == "preset":
            checked[name] = check_type("model.preset", value, str | None)
        elif name not in fields:
            raise ConfigError(f"unknown config key model.{name}; model keys are `preset` and the TinySeekConfig fields")
        else:
            checked[name] = check_type(f"model.{name}", value, hints[name])
    return checked


def check_type(key: str, value: Any, hint) -> Any:
    """`value` if it has type `hint` (int is accepted for float), else a ConfigError naming `key`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return check_type(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {type_name(hint)}, got {value!r}")
    if hint is type(None):
        if value is None:
            return None
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item_hint,) = typing.get_args(hint)
            return [check_type(f"{key}[{i}]", item, item_hint) for i, item in enumerate(value)]
    elif origin is dict or hint is Any:
        return value
    elif hint is float:
        # PyYAML reads `5e-5` (no dot) as a string, so numbers written that way are accepted here.
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        if number is not None:
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, hint):
        return value
    raise ConfigError(f"{key}: expected {type_name(hint)}, got {value!r}")


def type_name(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(type_name(option) for option in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def validate(config: TrainConfig) -> None:
    def require(condition: bool, message: str):
        if not condition:
            raise ConfigError(message)

    for key in ("max_steps", "data.seq_len", "data.micro_batch_size", "data.grad_accum", "checkpoint.every",
                "checkpoint.keep", "optim.max_non_finite_steps", "logging.log_every", "logging.eval_every", "logging.eval_batches",
                "logging.sample_every", "sample.max_new_tokens"):
        section, _, name = key.rpartition(".")
        value = getattr(getattr(config, section) if section else config, name)
        require(value > 0, f"{key}: must be a positive integer, got {value}")
    if config.time_budget is not None:
        parse_duration(config.time_budget)
    for source, weight in {"data.weight": config.data.weight, **config.data.mixture}.items():
        require(isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight > 0,
                f"data.mixture: the weight of {source} must be a positive number, got {weight!r}")
    require(not config.data.mixture or config.data.split_by is not None,
            "data.mixture: needs data.split_by, so that no validation group is trained on from another source")
    require(config.parallel in STRATEGIES,
            f"parallel: unknown strategy {config.parallel!r}; choose one of {', '.join(STRATEGIES)}")
    require(config.gradient_checkpointing in CHECKPOINTING_MODES,
            f"gradient_checkpointing: unknown mode {config.gradient_checkpointing!r}; choose one of "
            f"{', '.join(CHECKPOINTING_MODES)}")
    require(config.dtype in DTYPES, f"dtype: unknown dtype {config.dtype!r}; choose one of {', '.join(DTYPES)}")
    from tinyseek.train.optim import CONFIG_RULES, MUON_MULTIPLIER, OPTIMIZERS, ROLES  # torch: after the CLI parses

    require(config.optim.name in OPTIMIZERS,
            f"optim.name: unknown optimizer {config.optim.name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if config.optim.name in CONFIG_RULES:
        CONFIG_RULES[config.optim.name](config)
    require(config.optim.lr > 0, f"optim.lr: must be positive, got {config.optim.lr}")
    for role, multiplier in config.optim.lr_multipliers.items():
        require(role in (*ROLES, MUON_MULTIPLIER),
                f"optim.lr_multipliers: unknown parameter role {role!r}; roles are {', '.join(ROLES)}, {MUON_MULTIPLIER}")
        require(role != MUON_MULTIPLIER or config.optim.name == "muon",
                f"optim.lr_multipliers.{MUON_MULTIPLIER}: only with optim.name muon, got {config.optim.name!r}")
        require(isinstance(multiplier, (int, float)) and not isinstance(multiplier, bool) and multiplier > 0,
                f"optim.lr_multipliers.{role}: must be a positive number, got {multiplier!r}")
    require(config.optim.weight_decay >= 0, f"optim.weight_decay: must be non-negative, got {config.optim.weight_decay}")
    require(len(config.optim.betas) == 2 and all(0 <= b < 1 for b in config.optim.betas),
            f"optim.betas: expected two numbers in [0, 1), got {config.optim.betas}")
    require(config.optim.grad_clip >= 0, f"optim.grad_clip: must be non-negative (0 disables), got {config.optim.grad_clip}")
    require(config.optim.implementation in OPTIMIZER_IMPLEMENTATIONS,
            f"optim.implementation: choose one of {', '.join(OPTIMIZER_IMPLEMENTATIONS)}")
    require(config.schedule.kind in SCHEDULES,
            f"schedule.kind: unknown schedule {config.schedule.kind!r}; choose one of {', '.join(SCHEDULES)}")
    require(config.schedule.warmup_steps >= 0, "schedule.warmup_steps: must be non-negative")
    require(0 <= config.schedule.min_lr_ratio <= 1, "schedule.min_lr_ratio: must be in [0, 1]")
    require(0 < config.schedule.decay_fraction <= 1, "schedule.decay_fraction: must be in (0, 1]")
    try:
        config.sample.sampling(config.seed)
    except ValueError as error:
        raise ConfigError(f"sample.{error}") from None
    require(config.logging.peak_flops is None or config.logging.peak_flops > 0,
            f"logging.peak_flops: must be positive (or null to measure it), got {config.logging.peak_flops}")
    positions = config.build_model_config().max_position_embeddings
    if config.data.seq_len > positions:
        raise ConfigError(f"data.seq_len: {config.data.seq_len} is longer than the model's max_position_embeddings="
                          f"{positions}; lower data.seq_len or raise model.max_position_embeddings")

"""The training configuration: one pydantic model per concern, loaded from YAML or TOML, overridden from the command
line, and checked strictly (an unknown key or a value of the wrong type is a `ConfigError` that names the key).

The choices (`Literal` types) are the definitions the command line offers too (tinyseek.train.cli), so this module
imports neither torch nor transformers at load time: `tinyseek train --help` must answer without them.
"""

from __future__ import annotations

import functools
import inspect
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
    field_validator,
)

from tinyseek.data.builtin import builtin_tokenizer
from tinyseek.errors import ConfigError, FileError
from tinyseek.generate.sampling import Sampling
from tinyseek.train.budget import parse_duration

# Inside the package (a link to the repository's configs/), so installed copies find the presets too.
PRESET_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_MODEL_PRESET = "seed"
DType = Literal["auto", "fp32", "bf16", "fp16"]
CheckpointingMode = Literal["none", "full", "selective"]
ParallelStrategy = Literal["ddp", "fsdp"]
Schedule = Literal["cosine", "wsd", "constant"]
OptimizerImplementation = Literal["auto", "fused", "foreach", "for-loop"]


def number_from_yaml(value: Any) -> Any:
    """PyYAML reads `5e-5` (no dot) as a string: such a string is the number it spells."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


# A finite float; an int is one too (strict mode otherwise: `true` is no number, "3" no integer).
Number = Annotated[float, BeforeValidator(number_from_yaml), AllowInfNan(False)]
Positive = Annotated[int, Field(gt=0)]


class Section(BaseModel):
    """A config section: an unknown key, or a value of another type (no coercion: "3" is no integer), is an error."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)


class DataConfig(Section):
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
    val_fraction: Number = 0.01
    val_documents: int | None = None
    mixture: dict[str, Annotated[Number, Field(gt=0)]] = {}
    """More training sources (a local file, directory or Hub name) and their weights, relative to `weight` of
    `source`. Validation stays `source`'s; the other sources leave out its validation groups (`split_by`)."""
    weight: Annotated[Number, Field(gt=0)] = 1.0
    """The share of `source` in a mixture, relative to the weights in `mixture`."""
    seq_len: Positive = 32
    micro_batch_size: Positive = 1
    grad_accum: Positive = 8


class OptimConfig(Section):
    name: str = "adamw"
    """A registered optimizer (``tinyseek.train.optim.OPTIMIZERS``)."""
    lr: Annotated[Number, Field(gt=0)] = 5e-5
    lr_multipliers: dict[str, Annotated[Number, Field(gt=0)]] = {}
    """Learning-rate multiplier per parameter role ("matrix", "head", "embedding", "vector"; 1 if not given), and with
    optim.name muon for the matrices Muon takes ("muon", on top of their role's)."""
    weight_decay: Annotated[Number, Field(ge=0)] = 0.1
    betas: Annotated[list[Annotated[Number, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)] = [0.9, 0.95]
    eps: Number = 1e-8
    grad_clip: Annotated[Number, Field(ge=0)] = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    max_non_finite_steps: Positive = 5
    """A step whose loss or gradient is NaN or infinite is skipped (no optimizer or bias update, counted and logged);
    this many in a row stop the run without saving."""
    implementation: OptimizerImplementation = "auto"
    """AdamW kernel: "fused" (one kernel for all tensors, fastest on CPU and CUDA), "foreach", "for-loop", or
    "auto" (fused where the device supports it, else foreach)."""


class ScheduleConfig(Section):
    kind: Schedule = "cosine"
    """"cosine": linear warmup then cosine decay to the floor; "wsd": warmup, stable, then linear decay to the floor
    over the last `decay_fraction` of the steps; "constant": warmup then flat."""
    warmup_steps: Annotated[int, Field(ge=0)] = 100
    min_lr_ratio: Annotated[Number, Field(ge=0, le=1)] = 0.1
    """The floor, as a fraction of the peak learning rate."""
    decay_fraction: Annotated[Number, Field(gt=0, le=1)] = 0.2


class ChatStageConfig(Section):
    """The chat fine-tuning stage (`stages: [sft]`, `tinyseek train --stage sft`): its conversations, window and
    learning-rate schedule. Optimizer kind, batch shape, logging and checkpoints are the run's own sections."""

    conversations: str = "builtin-chat"
    """Chat data (tinyseek.data.conversations): `builtin-chat`, local .jsonl/.jsonl.gz/.json/.parquet files or a
    folder of them, or a Hub dataset name; OpenAI `messages`, ShareGPT `conversations` or prompt/response rows."""
    seq_len: Positive | None = None
    """The window conversations are packed into (each conversation whole, several per window); None: the model's
    max_position_embeddings."""
    max_steps: Positive = 300
    time_budget: str | None = None
    """As the top-level time_budget, for this stage."""
    lr: Annotated[Number, Field(gt=0)] = 3e-4
    schedule: ScheduleConfig = ScheduleConfig(kind="cosine", warmup_steps=20, min_lr_ratio=0.1)


class CheckpointConfig(Section):
    every: Positive = 100
    keep: Positive = 1


class LoggingConfig(Section):
    log_every: Positive = 10
    eval_every: Positive = 100
    eval_batches: Positive = 20
    sample_every: Positive = 100
    tensorboard: bool = False
    progress_bar: bool = True
    peak_flops: Annotated[Number, Field(gt=0)] | None = None
    """Peak FLOP/s of the device for the MFU estimate; None measures a matmul once at startup."""


class SampleConfig(Section):
    prompts: list[str] = ["The history of", "In mathematics, a function is", "Once upon a time"]
    max_new_tokens: Positive = 40
    do_sample: bool = True
    temperature: Number = 0.8
    top_k: int = 50
    top_p: Number = 0.95
    min_p: Number = 0.0
    repetition_penalty: Number = 1.1

    def sampling(self, seed: int | None) -> Sampling:
        """These settings as the generation engine's sampling configuration (``do_sample: false`` is greedy)."""
        return Sampling(
            self.temperature if self.do_sample else 0.0, self.top_k, self.top_p, self.min_p, self.repetition_penalty, seed
        )


class TrainConfig(Section):
    out_dir: str = "runs/default"
    max_steps: Positive = 10_000
    """Optimizer steps; each consumes micro_batch_size * grad_accum * world_size windows."""
    time_budget: str | None = None
    """A wall-clock budget ("15m", "90s", "1h30m") that replaces max_steps: the first steps are timed, max_steps is
    fixed from the measured rate and moved when the pace changes, and checkpoints keep it, so a resumed run follows
    the same schedule."""
    seed: int = 0
    device: str = "auto"
    dtype: DType = "auto"
    """"auto": bf16 autocast on CPU and on GPUs that support it, fp16 with a GradScaler on GPUs that don't, fp32
    on MPS; or one of "fp32", "bf16", "fp16"."""
    gradient_checkpointing: CheckpointingMode = "none"
    """"none"; "full": recompute each decoder layer's forward in the backward pass; "selective": recompute only its
    cheap element-wise ops and keep matmul and attention outputs (most of full's memory saving at a fraction of its
    recompute). `true`/`false` (older configs) mean "full"/"none"."""
    compile: bool = False
    """torch.compile each decoder layer's training forward (regional compilation: one block compiled once and reused
    by every layer, seconds rather than minutes); falls back to eager with a message where no compiler works."""
    parallel: ParallelStrategy = "ddp"
    """Data parallelism under torchrun: "ddp" (DistributedDataParallel) or "fsdp" (FSDP2, parameters sharded per
    decoder layer). A single process ignores it."""
    stages: Annotated[list[str], Field(min_length=1)] = ["pretrain"]
    """The training stages to run, in order (tinyseek.train.stages.STAGES: "pretrain", "sft"). The last writes to
    out_dir, each earlier one to out_dir/NAME, and each later one starts from the one before."""
    init_from: str | None = None
    """Start the (first) stage from these weights instead of a random initialisation: a run directory (its latest
    checkpoint; its data and tokenizer become this run's defaults), a checkpoint or an exported model. The model's
    architecture is the one saved there. A run directory that has checkpoints of its own resumes from them instead."""
    model: dict[str, Any] = {"preset": DEFAULT_MODEL_PRESET}
    """`preset` (a name in tinyseek.PRESETS, default "seed"; null for TinySeekConfig's own defaults) plus any
    TinySeekConfig field, which overrides the preset."""
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    sample: SampleConfig = SampleConfig()
    sft: ChatStageConfig = ChatStageConfig()
    # Set by load_config, not config keys: lines for the run's log, and the keys a preset chose rather than the user.
    _notes: tuple[str, ...] = PrivateAttr(default=())
    _preset_keys: frozenset[str] = PrivateAttr(default=frozenset())

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def checkpointing_from_boolean(cls, value: Any) -> Any:
        return {True: "full", False: "none"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("model", mode="before")
    @classmethod
    def check_model_section(cls, values: Any) -> Any:
        return {"preset": DEFAULT_MODEL_PRESET, **model_section().model_validate(values).model_dump(exclude_unset=True)}

    @property
    def notes(self) -> tuple[str, ...]:
        return self._notes

    @property
    def preset_keys(self) -> frozenset[str]:
        return self._preset_keys

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def build_model_config(self, **tokenizer_defaults):
        """The model's TinySeekConfig: preset, then `tokenizer_defaults` (special-token ids), then explicit fields."""
        from tinyseek.config import TinySeekConfig  # transformers: only once a model is wanted

        fields = dict(self.model)
        preset = fields.pop("preset", None)
        explicit = {**{k: v for k, v in tokenizer_defaults.items() if k not in fields}, **fields}
        try:
            if preset is None:
                return TinySeekConfig(**explicit)
            return TinySeekConfig.from_preset(preset, **explicit)
        except ValueError as error:
            raise ConfigError(f"model.{error}") from None


@functools.cache
def model_section() -> type[BaseModel]:
    """The `model` section's schema: `preset` and TinySeekConfig's typed keyword arguments, all optional (only the
    given ones are passed on, so the preset's values stand for the rest)."""
    from tinyseek.config import TinySeekConfig  # transformers: only once a config is read

    hints = typing.get_type_hints(TinySeekConfig.__init__)
    fields = {
        name: ({float: Number, float | None: Number | None}.get(hints[name], hints[name]), None)
        for name in inspect.signature(TinySeekConfig.__init__).parameters if name in hints and name != "return"
    }
    return create_model("model", __config__=Section.model_config, preset=(str | None, None), **fields)


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


def read_config_file(path: Path, extended_by: tuple[Path, ...] = ()) -> tuple[dict[str, Any], set[str]]:
    """A config file's settings, and the keys among them that a preset chose. A file may start from another,
    `extends: <preset or path>` (relative to the file): its own settings replace the other's, section by section and
    key by key, and a key a user's file inherits from a preset stays the preset's choice."""
    raw = parse_config_file(path)
    base = raw.pop("extends", None)
    settings, inherited_preset_keys = raw, set()
    if base is not None:
        beside = path.parent / str(base)
        base_path = resolve_config_path(str(beside) if beside.is_file() else str(base))
        if base_path.resolve() in {p.resolve() for p in (path, *extended_by)}:
            raise ConfigError(f"config {path}: `extends: {base}` leads back to itself")
        base_settings, inherited_preset_keys = read_config_file(base_path, (path, *extended_by))
        settings = merged(base_settings, raw)
    return settings, dotted_keys(settings) if is_preset(path) else inherited_preset_keys - dotted_keys(raw)


def merged(base: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` over `base`: mappings merge, any other value replaces."""
    result = dict(base)
    for key, value in settings.items():
        both_mappings = isinstance(value, dict) and isinstance(base.get(key), dict)
        result[key] = merged(base[key], value) if both_mappings else value
    return result


def parse_config_file(path: Path) -> dict[str, Any]:
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


# Where a stage keeps its step count and time budget: the top level (pre-training) and the chat stage's section.
STEP_SECTIONS = ("", "sft")


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
    tree, preset_keys = read_config_file(path) if path is not None else ({}, set())
    given = {".".join(key): value for key, value in overrides}
    notes = []
    for section in STEP_SECTIONS:
        steps_key, budget_key = (f"{section}.{key}" if section else key for key in ("max_steps", "time_budget"))
        if steps_key not in given:
            continue
        if given.get(budget_key) is not None:
            raise ConfigError("--max-steps and --time-budget: give one of them (a time budget sets max_steps from the "
                              "first steps' speed)")
        holder = tree.get(section) if section else tree
        if isinstance(holder, dict) and holder.get("time_budget") is not None and budget_key not in given:
            notes.append(f"{steps_key} {given[steps_key]} from the command line replaces the config's {budget_key} "
                         f"{holder['time_budget']}")
            holder["time_budget"] = None
    preset_keys -= set(given)
    for key, value in overrides:
        set_nested(tree, key, value)
    if path is not None and look_up_tokenizer and "data.tokenizer" not in given:
        find_relative_tokenizer(tree, path)
    try:
        train_config = TrainConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(describe_error(error)) from None
    validate(train_config)
    train_config._notes = tuple(notes)
    train_config._preset_keys = frozenset(preset_keys)
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
    if not isinstance(spec, str) or builtin_tokenizer(spec) or Path(spec).expanduser().is_absolute():
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


def describe_error(error: ValidationError) -> str:
    """The first problem pydantic found, in one line that names the key."""
    problem = error.errors()[0]
    key = ".".join(str(part) for part in problem["loc"])
    kind, value, context = problem["type"], problem.get("input"), problem.get("ctx", {})
    if kind == "extra_forbidden":
        section, _, _ = key.rpartition(".")
        return f"unknown config key {key}; {section or 'top level'} keys are: {', '.join(section_keys(section))}"
    if kind in ("model_type", "dict_type"):
        return f"{key}: expected a section (mapping), got {value!r}"
    if kind == "literal_error":
        return f"{key}: unknown value {value!r}; choose one of {context['expected']}"
    if kind == "finite_number":
        return f"{key}: expected a finite number, got {value!r}"
    if kind.startswith(("int_", "float_", "bool_", "string_", "list_")):
        expected = {"int": "int", "float": "float", "bool": "bool", "string": "str", "list": "list"}[kind.split("_")[0]]
        return f"{key}: expected {expected}, got {value!r}"
    if kind == "greater_than" and context.get("gt") == 0:
        return f"{key}: must be positive, got {value!r}"
    return f"{key}: {problem['msg'].lower()}, got {value!r}"


def section_keys(section: str) -> list[str]:
    if section == "model":
        return ["preset and any TinySeekConfig field"]
    schema = TrainConfig
    for part in filter(None, section.split(".")):
        schema = schema.model_fields[part].annotation
    return sorted(schema.model_fields)


def validate(config: TrainConfig) -> None:
    """The rules between keys (each key's own type and range are the schema's): the registries' names, what the
    chosen optimizer asks of the run, and what the model must hold."""
    from tinyseek.train.optim import CONFIG_RULES, MUON_MULTIPLIER, OPTIMIZERS, ROLES  # torch: after the CLI parses
    from tinyseek.train.stages import STAGES

    def require(condition: bool, message: str):
        if not condition:
            raise ConfigError(message)

    for time_budget in (config.time_budget, config.sft.time_budget):
        if time_budget is not None:
            parse_duration(time_budget)
    for name in config.stages:
        require(name in STAGES, f"stages: unknown stage {name!r}; choose among {', '.join(STAGES)}")
    require(len(set(config.stages)) == len(config.stages), f"stages: a stage is named twice in {config.stages}")
    require(not config.data.mixture or config.data.split_by is not None,
            "data.mixture: needs data.split_by, so that no validation group is trained on from another source")
    require(config.optim.name in OPTIMIZERS,
            f"optim.name: unknown optimizer {config.optim.name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if config.optim.name in CONFIG_RULES:
        CONFIG_RULES[config.optim.name](config)
    for role in config.optim.lr_multipliers:
        require(role in (*ROLES, MUON_MULTIPLIER),
                f"optim.lr_multipliers: unknown parameter role {role!r}; roles are {', '.join(ROLES)}, {MUON_MULTIPLIER}")
        require(role != MUON_MULTIPLIER or config.optim.name == "muon",
                f"optim.lr_multipliers.{MUON_MULTIPLIER}: only with optim.name muon, got {config.optim.name!r}")
    try:
        config.sample.sampling(config.seed)
    except ValueError as error:
        raise ConfigError(f"sample.{error}") from None
    if config.init_from is None:  # else the model is the saved one, whose length the trainer checks
        check_window_fits(config, config.build_model_config().max_position_embeddings)


def check_window_fits(config: TrainConfig, positions: int) -> None:
    """Every window the run's stages train on fits the model's positions."""
    windows = {"data.seq_len": config.data.seq_len}
    if "sft" in config.stages and config.sft.seq_len is not None:
        windows["sft.seq_len"] = config.sft.seq_len
    for key, length in windows.items():
        if length > positions:
            raise ConfigError(f"{key}: {length} is longer than the model's max_position_embeddings={positions}; lower "
                              f"{key} or raise model.max_position_embeddings")

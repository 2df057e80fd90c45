"""Training configuration: small keyword-only dataclasses, loaded from YAML with `--set a.b=value` overrides.

Every check happens here, up front, and names the key to change.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field

from ..errors import SptokError
from ..yamlfile import load_yaml

FAMILIES = {"bert": "mlm", "t5": "span", "llama": "causal"}


@dataclass(kw_only=True)
class ModelConfig:
    family: str = "bert"                 # bert (MLM + MSP) | t5 (span corruption) | llama (causal LM)
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None      # llama: grouped-query attention
    intermediate_size: int = 1024
    max_position_embeddings: int | None = None   # default: the build's seq_len
    dropout: float = 0.0
    attn_implementation: str = "sdpa"    # sdpa | eager | flex_attention (llama; bert with transformers 5)
    extra: dict = field(default_factory=dict)    # passed to the transformers config as is

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise SptokError(f"model.family: {self.family!r} is not one of {', '.join(FAMILIES)}")
        if self.hidden_size % self.num_heads:
            raise SptokError(f"model.hidden_size ({self.hidden_size}) must be a multiple of model.num_heads "
                             f"({self.num_heads})")


@dataclass(kw_only=True)
class DataConfig:
    build: str = ""                      # the build directory (sptok build --out)
    manifest: str | None = None          # if given and `build` is missing, build it first (one command)
    build_args: dict = field(default_factory=dict)   # options for that build (seq_len, msp_prob, ...)
    proportion: dict | None = None       # per-source overrides of the manifest weights
    repeat: dict | None = None
    weights: bool = True                 # use the manifest weights (else natural sizes)
    mlm_prob: float = 0.15
    sp_policy: str = "keep"              # load-time SP policy
    sp_schedule: list = field(default_factory=list)  # [[fraction, policy], ...]: from that fraction of steps on
    expected_fingerprint: str | None = None
    shuffle: bool = True
    num_workers: int = 0

    def __post_init__(self):
        if not self.build:
            raise SptokError("data.build: give the build directory to train on")
        for i, item in enumerate(self.sp_schedule):
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and 0 <= float(item[0]) <= 1):
                raise SptokError(f"data.sp_schedule[{i}]: expected [fraction in 0..1, policy], got {item!r}")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 0
    schedule: str = "linear"             # linear | cosine (decay to min_lr_ratio * lr at the last step)
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0               # 0 = no clipping

    def __post_init__(self):
        if self.schedule not in ("linear", "cosine", "constant"):
            raise SptokError(f"optim.schedule: {self.schedule!r} is not one of linear, cosine, constant")
        if self.lr <= 0:
            raise SptokError(f"optim.lr must be positive, got {self.lr}")
        self.betas = tuple(self.betas)


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 100
    global_batch_size: int = 32          # samples per optimizer step, over all ranks and micro-batches
    micro_batch_size: int = 8            # samples per forward pass on one rank
    precision: str = "auto"              # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    parallel: str = "auto"               # auto (ddp when several processes) | ddp | fsdp | none
    activation_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
    device: str = "auto"                 # auto | cpu | cuda
    stop_at: int | None = None           # end this run after that step (checkpointed), schedule unchanged
    max_minutes: float | None = None     # end this run (checkpointed) once its wall-clock budget is spent
    on_nonfinite: str = "stop"           # a NaN / inf loss or gradient norm: stop (no checkpoint) | skip the update

    def __post_init__(self):
        if self.parallel not in ("auto", "ddp", "fsdp", "none"):
            raise SptokError(f"train.parallel: {self.parallel!r} is not one of auto, ddp, fsdp, none")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise SptokError(f"train.precision: {self.precision!r} is not one of auto, bf16, fp32")
        if self.on_nonfinite not in ("stop", "skip"):
            raise SptokError(f"train.on_nonfinite: {self.on_nonfinite!r} is not one of stop, skip")
        if self.steps < 1 or self.micro_batch_size < 1 or self.global_batch_size < 1:
            raise SptokError("train.steps, train.global_batch_size and train.micro_batch_size must be >= 1")


@dataclass(kw_only=True)
class EvalConfig:
    every: int = 0                       # steps between evaluations on the validation build (0 = none)
    build: str = ""                      # the validation build; "" = the training build's split (--holdout)
    samples: int = 64                    # samples of each source scored (0 = all of them)
    micro_batch_size: int | None = None  # default: train.micro_batch_size
    sp_policy: str = "keep"              # load-time SP policy of the validation samples

    def __post_init__(self):
        if self.every < 0 or self.samples < 0:
            raise SptokError("eval.every and eval.samples must be >= 0 (0: no evaluation / every sample)")


@dataclass(kw_only=True)
class CheckpointConfig:
    dir: str = ""                        # "" = no checkpoints
    every: int = 0                       # steps between checkpoints (0 = only at the end)
    resume: bool = True                  # continue from the newest checkpoint in dir


@dataclass(kw_only=True)
class LogConfig:
    dir: str = "runs/sptok"
    every: int = 10
    tensorboard: bool = True             # when tensorboard is installed


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig,
             "eval": EvalConfig, "checkpoint": CheckpointConfig, "log": LogConfig}


class _Raw(str):
    """A --set value, typed by the field it sets: text for str fields, YAML for the rest."""


def _typed(value, annotation: str):
    if not isinstance(value, _Raw):
        return value
    if annotation.replace(" ", "") in ("str", "str|None"):
        return str(value)
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return str(value)


_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping",
          list: "a list", tuple: "a list"}


def _checked(key: str, value, hint, from_set: bool):
    """``value`` as the field's type (an int where a float goes becomes a float), or one line naming the
    key, the expected type and what was given."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for t in (typing.get_origin(t) or t for t in options if t is not type(None)):
        if t is float and isinstance(value, str):   # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is tuple and isinstance(value, list):
            return tuple(value)
        if isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return value
    want = " or ".join(_KINDS.get(typing.get_origin(t) or t, str(t)) if t is not type(None) else "null"
                       for t in options)
    where = f" (--set {key}={value})" if from_set else ""
    raise SptokError(f"config: {key}: expected {want}, got {value!r}{where}")


def load_config(path: str | None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """YAML file (relative paths in it are relative to the file), then `key.sub=value` overrides."""
    doc: dict = _read_yaml(path) if path else copy.deepcopy(base or {})
    _override(doc, overrides)
    unknown = set(doc) - set(_SECTIONS)
    if unknown:
        raise SptokError(f"config: unknown section {sorted(unknown)[0]!r}; sections are {', '.join(_SECTIONS)}")
    cfg = Config(**{section: _section(section, cls, doc.get(section) or {}) for section, cls in _SECTIONS.items()})
    _resolve_paths(cfg, doc, os.path.dirname(os.path.abspath(path)) if path else os.getcwd())
    return cfg


def _read_yaml(path: str) -> dict:
    import yaml

    if not os.path.exists(path):
        raise SptokError(f"config not found: {path}")
    try:
        with open(path) as f:
            doc = load_yaml(f.read(), f"config {path}") or {}
    except yaml.YAMLError as e:
        raise SptokError(f"config {path}: invalid YAML ({e})") from None
    if not isinstance(doc, dict):
        raise SptokError(f"config {path}: expected a mapping of sections ({', '.join(_SECTIONS)})")
    return doc


def _override(doc: dict, overrides) -> None:
    """``section.key=value`` (``section.key.sub=value`` into a mapping) into ``doc``, values kept raw: they are
    typed by the setting they land in."""
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or "." not in key:
            raise SptokError(f"--set {item!r}: expected section.key=value, e.g. train.steps=100")
        section, _, name = key.partition(".")
        target = doc.setdefault(section, {})
        parts = name.split(".")
        for p in parts[:-1]:
            target = target.setdefault(p, {})
        target[parts[-1]] = _Raw(value)


def _section(section: str, cls, given) -> object:
    """One section's dataclass from its mapping: unknown keys and wrong types named."""
    if not isinstance(given, dict):
        raise SptokError(f"config: {section}: expected a mapping of settings, got {given!r}")
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    values = {k: _typed(v, types.get(k, "")) for k, v in given.items()}
    bad = set(values) - set(types)
    if bad:
        raise SptokError(f"config: {section}.{sorted(bad)[0]} is not a setting; {section} has: "
                         f"{', '.join(sorted(types))}")
    hints = typing.get_type_hints(cls)
    for k, v in values.items():
        values[k] = _checked(f"{section}.{k}", v, hints[k], isinstance(given[k], _Raw))
    try:
        return cls(**values)
    except TypeError as e:
        raise SptokError(f"config: {section}: {e}") from None


def _resolve_paths(cfg: Config, doc: dict, root: str) -> None:
    """Data paths in the file are relative to it (``root``); given with --set, to where the command runs.
    Output directories are relative to where the command runs."""
    for sec, attr in (("data", "build"), ("data", "manifest"), ("eval", "build")):
        obj = getattr(cfg, sec)
        v = getattr(obj, attr)
        base = os.getcwd() if isinstance((doc.get(sec) or {}).get(attr), _Raw) else root
        if v and not os.path.isabs(v) and "://" not in v:
            setattr(obj, attr, os.path.normpath(os.path.join(base, v)))
    for sec, attr in (("checkpoint", "dir"), ("log", "dir")):
        obj = getattr(cfg, sec)
        v = getattr(obj, attr)
        if v and not os.path.isabs(v):
            setattr(obj, attr, os.path.normpath(os.path.join(os.getcwd(), v)))

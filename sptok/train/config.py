"""Training configuration: small keyword-only dataclasses, loaded from YAML with `--set a.b=value` overrides.

Every check happens here, up front, and names the key to change: types and ranges when the config is read,
what needs the device or the build (``check_device``, ``check_against_build``, ``check_build_args``) as soon as
they are known, before any step.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field

from ..errors import SptokError
from ..spec import SHORT_FINGERPRINT
from ..yamlfile import load_yaml

FAMILIES = {"bert": "mlm", "t5": "span", "llama": "causal"}
ATTENTION = ("sdpa", "eager", "flex_attention")


@dataclass(frozen=True)
class Range:
    """The values a numeric setting takes: finite, and between ``low`` and ``high`` (``None``: unbounded),
    each bound included unless ``*_open``."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def admits(self, x) -> bool:
        return (math.isfinite(x) and (self.low is None or (x > self.low if self.low_open else x >= self.low))
                and (self.high is None or (x < self.high if self.high_open else x <= self.high)))

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"{'<' if self.high_open else '<='} {self.high}"


def number(default, low=None, high=None, *, above=None, below=None, words: tuple = ()):
    """A numeric setting's field: its default and its range (``low`` <= x <= ``high``, ``above`` < x <
    ``below``), which ``check_numbers`` enforces when the config is read; ``words`` it takes besides numbers
    (``"auto"``)."""
    rng = Range(low if above is None else above, high if below is None else below, above is not None,
                below is not None)
    return field(default=default, metadata={"range": rng, "words": words})


def check_numbers(section: str, settings) -> None:
    """Every numeric setting of ``settings`` inside its range (NaN and infinities never are), or one of its
    words: one line naming the key."""
    for f in dataclasses.fields(settings):
        rng, v, words = f.metadata.get("range"), getattr(settings, f.name), f.metadata.get("words", ())
        if rng is None or v is None or v in words:
            continue
        if isinstance(v, str):
            raise SptokError(f"config: {section}.{f.name}: must be {' or '.join(words)} or a number {rng}, got {v!r}")
        if not rng.admits(v):
            finite = "" if math.isfinite(v) else "finite and "
            raise SptokError(f"config: {section}.{f.name}: must be {finite}{rng}, got {v!r}")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(kw_only=True)
class ModelConfig:
    family: str = "bert"                 # bert (MLM + MSP) | t5 (span corruption) | llama (causal LM)
    hidden_size: int = number(256, low=1)
    num_layers: int = number(4, low=1)
    num_heads: int = number(4, low=1)
    num_kv_heads: int | None = number(None, low=1)             # llama: grouped-query attention
    intermediate_size: int = number(1024, low=1)
    max_position_embeddings: int | None = number(None, low=1)  # default: the build's seq_len
    dropout: float = number(0.0, low=0, below=1)
    attn_implementation: str = "sdpa"    # sdpa | eager | flex_attention (llama; bert with transformers 5)
    extra: dict = field(default_factory=dict)    # passed to the transformers config as is

    def __post_init__(self):
        check_numbers("model", self)
        if self.family not in FAMILIES:
            raise SptokError(f"model.family: {self.family!r} is not one of {', '.join(FAMILIES)}")
        if self.attn_implementation not in ATTENTION:
            raise SptokError(f"model.attn_implementation: {self.attn_implementation!r} is not one of "
                             f"{', '.join(ATTENTION)}")
        if self.hidden_size % self.num_heads:
            raise SptokError(f"model.hidden_size ({self.hidden_size}) must be a multiple of model.num_heads "
                             f"({self.num_heads})")
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise SptokError(f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads "
                             f"({self.num_kv_heads})")


@dataclass(kw_only=True)
class DataConfig:
    build: str = ""                      # the build directory (sptok build --out)
    manifest: str | None = None          # if given and `build` is missing, build it first (one command)
    build_args: dict = field(default_factory=dict)   # options for that build (seq_len, msp_prob, ...)
    proportion: dict | None = None       # per-source overrides of the manifest weights
    repeat: dict | None = None
    weights: bool = True                 # use the manifest weights (else natural sizes)
    mlm_prob: float = number(0.15, low=0, high=1)
    sp_policy: str = "keep"              # load-time SP policy
    sp_schedule: list = field(default_factory=list)  # [[fraction, policy], ...]: from that fraction of steps on
    phases: list = field(default_factory=list)       # [{until, proportion, sp_policy}, ...]: the mixture by step
    expected_fingerprint: str | None = None          # the build's fingerprint, or its first 12 characters or more
    shuffle: bool = True
    num_workers: int | str = number("auto", low=0, words=("auto",))   # loader processes per rank (auto_workers)

    def __post_init__(self):
        check_numbers("data", self)
        if not self.build:
            raise SptokError("data.build: give the build directory to train on")
        for what in ("proportion", "repeat"):
            for name, v in (getattr(self, what) or {}).items():
                if not _is_number(v) or v < 0:
                    raise SptokError(f"config: data.{what}.{name}: must be a finite number >= 0, got {v!r}")
        for i, item in enumerate(self.sp_schedule):
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and _is_number(item[0]) and 0 <= item[0] <= 1):
                raise SptokError(f"data.sp_schedule[{i}]: expected [fraction in 0..1, policy], got {item!r}")
        # parsed now, not when the schedule reaches them: a bad cooldown policy must not end a run at 90%
        _check_policy("data.sp_policy", self.sp_policy)
        for i, (_, policy) in enumerate(self.sp_schedule):
            _check_policy(f"data.sp_schedule[{i}]", policy)
        self.phases = [_phase(i, p) for i, p in enumerate(self.phases)]
        if self.phases:
            self._check_phases()
        fp = self.expected_fingerprint
        if fp and not (SHORT_FINGERPRINT <= len(fp) <= 64 and all(c in "0123456789abcdef" for c in fp.lower())):
            raise SptokError(f"config: data.expected_fingerprint: give the build's fingerprint or at least its first "
                             f"{SHORT_FINGERPRINT} characters (hexadecimal, as sptok prints it), got {fp!r}")
        unknown = sorted(set(self.build_args) - set(_build_option_types()))
        if unknown:
            raise SptokError(f"config: data.build_args.{unknown[0]} is not a build option; the options are "
                             f"{', '.join(sorted(_build_option_types()))}")

    def _check_phases(self) -> None:
        """Phases end at increasing fractions, the last at 1.0; their mixtures are proportions (a phase is one
        streaming epoch of its own size, which streaming weighs only relatively); a phase's ``sp_policy`` and
        ``sp_schedule`` would both say which policy holds: only one of them may."""
        ends = [p["until"] for p in self.phases]
        for i in range(1, len(ends)):
            if ends[i] <= ends[i - 1]:
                raise SptokError(f"data.phases[{i}].until: phases must end at increasing fractions of train.steps, "
                                 f"got {ends[i]} after {ends[i - 1]}")
        if ends[-1] != 1.0:
            raise SptokError(f"data.phases[{len(ends) - 1}].until: the last phase must end at 1.0 (the end of "
                             f"train.steps), got {ends[-1]}")
        if self.repeat:
            raise SptokError("data.repeat: cannot weigh data.phases (each phase is an epoch of its own size, which "
                             "streaming fills by proportions); give each phase a proportion")
        if self.sp_schedule and any(p.get("sp_policy") for p in self.phases):
            raise SptokError("data.sp_schedule: give the load-time SP policy by data.phases[].sp_policy or by "
                             "data.sp_schedule, not both")


SCHEDULES = ("linear", "cosine", "constant", "wsd")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = number(5e-4, above=0)
    weight_decay: float = number(0.01, low=0)
    betas: tuple = (0.9, 0.98)
    eps: float = number(1e-6, above=0)
    warmup_steps: int = number(0, low=0)
    schedule: str = "linear"             # linear | cosine | constant | wsd (decay to min_lr at the last step)
    min_lr_ratio: float = number(0.0, low=0, high=1)
    min_lr: float | None = number(None, low=0)        # the learning rate the decay ends at (else min_lr_ratio * lr)
    decay_steps: int | None = number(None, low=1)     # wsd: steps of the final linear decay
    grad_clip: float = number(1.0, low=0)   # 0 = no clipping

    def __post_init__(self):
        check_numbers("optim", self)
        if self.schedule not in SCHEDULES:
            raise SptokError(f"optim.schedule: {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.min_lr is not None:
            if self.min_lr_ratio:
                raise SptokError("optim.min_lr: give optim.min_lr or optim.min_lr_ratio, not both")
            if self.min_lr > self.lr:
                raise SptokError(f"optim.min_lr ({self.min_lr}) must not exceed optim.lr ({self.lr})")
            if self.schedule == "constant":
                raise SptokError("optim.min_lr: the constant schedule does not decay; use linear, cosine or wsd")
        if (self.schedule == "wsd") != (self.decay_steps is not None):
            raise SptokError("optim.decay_steps: give it with optim.schedule: wsd (the steps of its final decay)"
                             if self.decay_steps is None else
                             f"optim.decay_steps: only optim.schedule: wsd takes it, not {self.schedule}")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in self.betas):
            raise SptokError(f"config: optim.betas: must be two numbers in [0, 1), got {list(self.betas)}")


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = number(100, low=1)
    global_batch_size: int = number(32, low=1)   # samples per optimizer step, over all ranks and micro-batches
    micro_batch_size: int = number(8, low=1)     # samples per forward pass on one rank
    precision: str = "auto"              # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    parallel: str = "auto"               # auto (ddp when several processes) | ddp | fsdp | none
    activation_checkpointing: bool = False
    compile: bool = False
    seed: int = number(0, low=0, high=2**32 - 1)   # numpy and streaming take 32-bit seeds
    device: str = "auto"                 # auto | cpu | cuda
    stop_at: int | None = number(None, low=1)      # end this run after that step (checkpointed), schedule unchanged
    max_minutes: float | None = number(None, above=0)   # end this run (checkpointed) once its budget is spent
    on_nonfinite: str = "stop"           # a NaN / inf loss or gradient norm: stop (no checkpoint) | skip the update
    init_from: str = ""                  # a checkpoint or `sptok export` directory: its weights start this run

    def __post_init__(self):
        check_numbers("train", self)
        for key, allowed in (("parallel", ("auto", "ddp", "fsdp", "none")), ("precision", ("auto", "bf16", "fp32")),
                             ("device", ("auto", "cpu", "cuda")),
                             ("on_nonfinite", ("stop", "skip"))):
            if getattr(self, key) not in allowed:
                raise SptokError(f"train.{key}: {getattr(self, key)!r} is not one of {', '.join(allowed)}")


@dataclass(kw_only=True)
class EvalConfig:
    every: int = number(0, low=0)        # steps between evaluations on the validation build (0 = none)
    build: str = ""                      # the validation build; "" = the training build's split (--holdout)
    samples: int = number(64, low=0)     # samples of each source scored (0 = all of them)
    micro_batch_size: int | None = number(None, low=1)   # default: train.micro_batch_size
    sp_policy: str = "keep"              # load-time SP policy of the validation samples
    conditions: list | None = None       # policies each scored on the same text tokens, one record each

    def __post_init__(self):
        check_numbers("eval", self)
        _check_policy("eval.sp_policy", self.sp_policy)
        if self.conditions is not None:
            _check_conditions(self.conditions, self.sp_policy)


def _check_policy(key: str, text) -> str:
    """A load-time policy given under ``key``, written back in its one form; one line naming the key if bad."""
    if not isinstance(text, str):
        raise SptokError(f"{key}: {text!r} is not a policy string")
    if text.strip() == "keep":
        return "keep"
    from ..data.policy import SPPolicy   # numpy only, and only for a policy other than keep

    try:
        return str(SPPolicy.parse(text))
    except SptokError as e:
        raise SptokError(f"{key}: {e}") from None


def _check_conditions(conditions, sp_policy: str) -> None:
    """eval.conditions: a non-empty list of distinct load-time policies, instead of eval.sp_policy."""
    if not isinstance(conditions, list) or not conditions:
        raise SptokError(f"eval.conditions: expected a list of load-time policies (e.g. [keep, \"meta=strip\"]), "
                         f"got {conditions!r}")
    if sp_policy != "keep":
        raise SptokError("eval.conditions and eval.sp_policy: give one (the conditions list every policy scored)")
    seen: dict = {}
    for i, c in enumerate(conditions):
        name = _check_policy(f"eval.conditions[{i}]", c)
        if name in seen:
            raise SptokError(f"eval.conditions[{i}]: {c!r} is the same policy as eval.conditions[{seen[name]}]")
        seen[name] = i


@dataclass(kw_only=True)
class CheckpointConfig:
    dir: str = ""                        # "" = no checkpoints
    every: int = number(0, low=0)        # steps between checkpoints (0 = only at the end)
    resume: bool = True                  # continue from the newest checkpoint in dir

    def __post_init__(self):
        check_numbers("checkpoint", self)


@dataclass(kw_only=True)
class LogConfig:
    dir: str = "runs/sptok"
    every: int = number(10, low=1)
    tensorboard: bool = True             # when tensorboard is installed

    def __post_init__(self):
        check_numbers("log", self)


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self):
        if self.train.device == "cpu":
            check_device(self, "cpu")
        o, steps = self.optim, self.train.steps
        if o.schedule == "wsd" and o.warmup_steps + o.decay_steps > steps:
            raise SptokError(f"optim.decay_steps ({o.decay_steps}) + optim.warmup_steps ({o.warmup_steps}) must not "
                             f"exceed train.steps ({steps})")
        ends = phase_ends(self.data.phases, steps)
        for i, (a, b) in enumerate(zip([0] + ends, ends)):
            if b <= a:
                raise SptokError(f"data.phases[{i}]: ends at step {b} of train.steps ({steps}), holding no step; "
                                 f"end it later")
        if self.eval.conditions and self.model.family != "llama":
            raise SptokError(f"eval.conditions: scores the same text tokens under each policy, which needs a "
                             f"decoder (model.family: llama); {self.model.family}'s targets are drawn per position")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def phase_ends(phases: list[dict], steps: int) -> list[int]:
    """The step at which each phase ends (the next begins): ``until`` x ``steps``, rounded to the nearest step
    (0.7 x 10 is 7.000000000000001 in floating point, and must be step 7)."""
    return [round(p["until"] * steps) for p in phases]


PHASE_KEYS = ("until", "proportion", "sp_policy")


def _phase(i: int, p) -> dict:
    """One entry of data.phases, checked: ``until`` a fraction in (0, 1], ``proportion`` a mapping of
    shares (sources left out get none), ``sp_policy`` a policy."""
    where = f"data.phases[{i}]"
    if not isinstance(p, dict) or "until" not in p:
        raise SptokError(f"{where}: expected a mapping with until (and proportion, sp_policy), got {p!r}")
    unknown = sorted(set(p) - set(PHASE_KEYS))
    if unknown:
        raise SptokError(f"{where}.{unknown[0]} is not a phase setting; a phase has: {', '.join(PHASE_KEYS)}")
    if not (_is_number(p["until"]) and 0 < p["until"] <= 1):
        raise SptokError(f"{where}.until: must be a fraction of train.steps in (0, 1], got {p['until']!r}")
    prop = p.get("proportion")
    if prop is not None:
        if not isinstance(prop, dict) or not prop:
            raise SptokError(f"{where}.proportion: expected a mapping of source: share, got {prop!r}")
        for name, v in prop.items():
            if not _is_number(v) or v < 0:
                raise SptokError(f"config: {where}.proportion.{name}: must be a finite number >= 0, got {v!r}")
        if not sum(prop.values()) > 0:
            raise SptokError(f"{where}.proportion: the shares must not all be zero")
    if p.get("sp_policy") is not None:
        _check_policy(f"{where}.sp_policy", str(p["sp_policy"]))
    return {"until": float(p["until"]), "proportion": dict(prop) if prop else None,
            "sp_policy": str(p["sp_policy"]) if p.get("sp_policy") is not None else None}


def check_device(cfg: Config, device_type: str) -> None:
    """Refuse what cannot train on the device, before any data is built or read."""
    if device_type == "cpu" and cfg.model.attn_implementation == "flex_attention":
        raise SptokError(f"model.attn_implementation: flex_attention cannot train on CPU (train.device: "
                         f"{cfg.train.device}): torch has no FlexAttention backward there; use sdpa, or a GPU")


def check_output_dirs(cfg: Config) -> None:
    """checkpoint.dir and log.dir are directories or not there yet: a file in their place would end the run at
    its first save, after the steps before it were spent."""
    for key, path in (("checkpoint.dir", cfg.checkpoint.dir), ("log.dir", cfg.log.dir)):
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise SptokError(f"{key}: {path} is a file, not a directory; give a directory (it is made if missing)")


def check_against_build(cfg: Config, info) -> None:
    """Refuse settings the build makes implausible: a validation split as the training build, a global batch
    larger than the whole build, position embeddings shorter than its samples."""
    if info.raw.get("split"):
        raise SptokError(f"data.build: {info.path} is the {info.raw['split']} split of a build, its held-out "
                         f"documents: train on the build it was held out of ({os.path.dirname(info.path)}), "
                         f"which evaluates on it")
    samples = sum(c["samples"] for c in info.raw.get("counts", {}).values())
    if samples and cfg.train.global_batch_size > samples:
        raise SptokError(f"train.global_batch_size ({cfg.train.global_batch_size:,}) is more than the {samples:,} "
                         f"samples of {info.path}: every step would hold each sample more than once")
    positions = cfg.model.max_position_embeddings
    if positions is not None and cfg.model.family != "t5" and positions < info.seq_len:
        raise SptokError(f"model.max_position_embeddings ({positions}) is less than the build's seq_len "
                         f"({info.seq_len}); leave it unset to use the seq_len")


def check_build_args(cfg: Config) -> None:
    """The build in data.build, made earlier from data.manifest, must have the options that the manifest's
    ``build:`` and data.build_args give now: a changed option is refused, naming it, rather than ignored."""
    from ..build.driver import describe_changes
    from ..layout import MARKER, read_json
    from ..build.manifest import read_document
    from ..build.options import BuildOptions

    built = read_json(os.path.join(cfg.data.build, MARKER)).get("options", {})
    doc = read_document(cfg.data.manifest)
    wanted = BuildOptions.resolve(doc.get("build") or {}, cfg.data.build_args,
                                  {s["name"]: s.get("metadata") for s in doc["sources"]}).identity()
    changes = describe_changes({"options": built}, {"options": wanted})
    if changes:
        raise SptokError(f"data.build_args: {cfg.data.build} was built with other options than {cfg.data.manifest} "
                         f"and data.build_args give ({changes}); set data.build to a new directory to build "
                         f"there, or remove {cfg.data.build} to rebuild it")


def _build_option_types() -> dict[str, str]:
    """data.build_args' keys: the options of `sptok build` (BuildOptions), with their annotations."""
    from ..build.options import BuildOptions

    return {f.name: str(f.type) for f in dataclasses.fields(BuildOptions)}


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig,
             "eval": EvalConfig, "checkpoint": CheckpointConfig, "log": LogConfig}


class _Raw(str):
    """A --set value, typed by the field it sets: text for str fields, YAML for the rest."""


def _typed(value, annotation: str, keys: dict | None = None):
    """``value`` with every --set value in it typed: a mapping's values by ``keys`` (their annotations) where
    known, by YAML otherwise."""
    if isinstance(value, dict):
        return {k: _typed(v, (keys or {}).get(k, "")) for k, v in value.items()}
    if not isinstance(value, _Raw):
        return value
    if annotation.replace(" ", "") in ("str", "str|None"):
        return str(value)
    try:
        return load_yaml(str(value), "--set value")   # sptok's loader: an alias bomb is not expanded here either
    except SptokError:
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
        with open(path, encoding="utf-8") as f:
            doc = load_yaml(f.read(), f"config {path}") or {}
    except yaml.YAMLError as e:
        raise SptokError(f"config {path}: invalid YAML ({e})") from None
    except UnicodeDecodeError as e:
        raise SptokError(f"config {path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
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
    values = {k: _typed(v, types.get(k, ""), _build_option_types() if (section, k) == ("data", "build_args") else None)
              for k, v in given.items()}
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
    """Paths in the file are relative to it (``root``); given with --set, or left at their default, to where
    the command runs."""
    for sec, attr in (("data", "build"), ("data", "manifest"), ("eval", "build"), ("checkpoint", "dir"),
                      ("log", "dir"), ("train", "init_from")):
        obj = getattr(cfg, sec)
        v = getattr(obj, attr)
        given = (doc.get(sec) or {}).get(attr)
        base = root if given is not None and not isinstance(given, _Raw) else os.getcwd()
        if v and not os.path.isabs(v) and "://" not in v:
            setattr(obj, attr, os.path.normpath(os.path.join(base, v)))
    tok = cfg.data.build_args.get("tokenizer")   # the build's --tokenizer: a path too
    given = (doc.get("data") or {}).get("build_args") or {}   # a whole mapping with --set: _Raw
    given = given.get("tokenizer") if isinstance(given, dict) else given
    if tok and given is not None and not isinstance(given, _Raw) and not os.path.isabs(tok) and "://" not in tok:
        cfg.data.build_args["tokenizer"] = os.path.normpath(os.path.join(root, tok))

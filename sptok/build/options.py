"""Build options: defaults, manifest `build:` values, then command-line flags, checked up front."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, fields

from ..errors import SptokError, shown

# The values of every enumerated option, defined here and nowhere else: the modules that implement them import
# them from here, and the CLI lists them at start-up without importing numpy (this module imports none).
# tests/test_cli.py holds the schemas' enums, the CLI's choices and the implementations to them.
FAST_ENCODERS = ("gigatoken", "riptoken", "tiktoken")   # fastest first: encoders.py tries them in this order
ENCODERS = ("auto", "fast", "hf") + FAST_ENCODERS        # --encoder
POLICIES = ("abbreviation", "alphabet", "misplaced", "custom")   # --policy: each a function in sp.POLICIES
POSITIONS = ("prefix", "post", "both")   # --position: where the SP goes (sp_layout.SPLayout)
FORMATS = ("mds", "parquet", "arrow")    # --format: MDSShardWriter, or TableWriter for the other two (writers.py)
TAILS = ("keep", "pad", "drop")          # --tail: the last short sample of a source (finalize._pack_streams)
EXECUTORS = ("local", "ray")             # --executor: runner.WorkerPool, or ray_executor.RayPool
DEFAULT_DELIMITER = "<SPSEP>"            # --delimiter: a special token between the SP and the text
METADATA_FORMS = ("value", "host", "url")   # --metadata FIELD:FORM: how a value is written (metadata.form_value)
METADATA_DEFAULTS = {"form": "value", "template": "{}\n\n", "prob": 1.0, "max_tokens": 64}
MAX_TOKEN_CHARS = 128        # an SP, delimiter or EOS token: the manifest schema's bound too
MAX_SEQ_LEN = 1 << 24
MAX_WORKERS = 1024


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_size(value, flag: str) -> int:
    """`64MB`, `256KiB`, `1048576` -> bytes."""
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*", str(value), re.I)
        if not m:
            raise SptokError(f"{flag}: {shown(value)} is not a size (examples: 1048576, 64MB, 256KiB)")
        unit = (m.group(2) or "").lower().rstrip("b").rstrip("i")
        n = float(m.group(1)) * 1024 ** " kmgt".index(unit or " ")
        n = int(n) if n < 1 << 63 else 1 << 63   # refused below, with the flag (inf has no int)
    if not 0 < n < 1 << 63:
        raise SptokError(f"{flag}: must be a positive size below 8 EiB, got {shown(value)}")
    return n


def parse_fraction(value, flag: str) -> float:
    """`0.5%`, `0.005` -> 0.005: a share strictly between 0 and 1."""
    text = str(value).strip()
    try:
        f = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise SptokError(f"{flag}: {shown(value)} is not a fraction (examples: 0.5%, 0.005)") from None
    if not 0.0 < f < 1.0:
        raise SptokError(f"{flag}: must be a fraction between 0 and 1 (0% and 100%), got {shown(value)}")
    return f


@dataclass(kw_only=True)
class BuildOptions:
    """Every option that shapes the output bytes (``identity()``), plus how to run (workers, ...)."""
    tokenizer: str | None = None
    policy: str = "abbreviation"
    position: str = "prefix"
    delimiter: str = DEFAULT_DELIMITER
    insert_prob: float = 1.0
    msp_prob: float = 0.0
    seq_len: int = 2048
    seed: int = 0
    tail: str = "keep"
    format: str = "mds"
    eos: str | None = None
    unit_size: int | str = 16 << 20
    shard_size: int | str = 1 << 26
    hash_inputs: bool = False      # fingerprint inputs by content (xxh64) instead of size + mtime
    holdout: float | str | None = None   # fraction of each source's documents held out ("0.5%", 0.005)
    holdout_docs: int | None = None      # or: this many documents of each source
    # source name -> {field, form, template, prob, max_tokens} or None; None when no source has metadata
    metadata: dict | None = None
    # how to run; never changes the output
    workers: int = 0
    encoder: str = "auto"
    strict: bool = False
    quiet: bool = False
    executor: str = "local"
    ray_address: str | None = None   # else RAY_ADDRESS, else a local Ray

    RUN_ONLY = ("workers", "encoder", "strict", "quiet", "tokenizer", "executor", "ray_address")

    def __post_init__(self):
        def choice(flag, value, allowed):
            if value not in allowed:
                raise SptokError(f"--{flag}: {shown(value)} is not one of {', '.join(allowed)}")

        choice("policy", self.policy, POLICIES)
        choice("position", self.position, POSITIONS)
        choice("tail", self.tail, TAILS)
        choice("format", self.format, FORMATS)
        choice("encoder", self.encoder, ENCODERS)
        choice("executor", self.executor, EXECUTORS)
        if self.ray_address and self.executor != "ray":
            raise SptokError("--ray-address: names the cluster of --executor ray; add --executor ray")
        for flag in ("delimiter", "eos"):
            v = getattr(self, flag)
            if v is not None and (not isinstance(v, str) or len(v) > MAX_TOKEN_CHARS):
                raise SptokError(f"--{flag}: must be a string of at most {MAX_TOKEN_CHARS} characters, got {shown(v)}")
        if self.eos == "":   # '' means "none" for the delimiter, but every document needs an end
            raise SptokError("--eos: empty; give a token of the tokenizer, or leave --eos out for the tokenizer's own")
        for flag in ("insert_prob", "msp_prob"):
            v = getattr(self, flag)
            if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                raise SptokError(f"--{flag.replace('_', '-')}: must be a probability in [0, 1], got {shown(v)}")
            setattr(self, flag, float(v))
        if not _is_int(self.seq_len) or not 8 <= self.seq_len <= MAX_SEQ_LEN:
            raise SptokError(f"--seq-len: must be an integer from 8 to {MAX_SEQ_LEN:,} (tokens per sample, each "
                             f"sample held in memory whole), got {shown(self.seq_len)}")
        if not _is_int(self.seed) or not 0 <= self.seed < 1 << 64:
            raise SptokError(f"--seed: must be an integer from 0 to 2**64 - 1 (decisions mix it as a uint64), "
                             f"got {shown(self.seed)}")
        if not isinstance(self.hash_inputs, bool):
            raise SptokError(f"hash_inputs: must be true or false, got {self.hash_inputs!r}")
        self.unit_size = parse_size(self.unit_size, "--unit-size")
        self.shard_size = parse_size(self.shard_size, "--shard-size")
        if self.shard_size >= 1 << 32:
            raise SptokError("--shard-size: must be below 4 GiB because MDS sample offsets are uint32")
        self.holdout = parse_fraction(self.holdout, "--holdout") if self.holdout is not None else None
        if self.holdout_docs is not None and (not _is_int(self.holdout_docs) or not 1 <= self.holdout_docs < 1 << 63):
            raise SptokError(f"--holdout-docs: must be a positive number of documents, got {shown(self.holdout_docs)}")
        if self.holdout is not None and self.holdout_docs is not None:
            raise SptokError("--holdout and --holdout-docs: give one of them (a fraction, or documents per source)")
        if self.metadata is not None:
            self.metadata = {name: check_metadata(m, f"metadata of source {name!r}") if m else None
                             for name, m in self.metadata.items()}
            if not any(self.metadata.values()):
                self.metadata = None
        if not _is_int(self.workers) or not 0 <= self.workers <= MAX_WORKERS:
            raise SptokError(f"--workers: must be an integer from 0 (one per CPU) to {MAX_WORKERS}, got "
                             f"{shown(self.workers)}")
        if self.workers == 0:
            self.workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    def identity(self) -> dict:
        """The options that determine the output bytes (recorded in sptok.json, compared on resume); the
        holdout and metadata options only when set, so builds without them keep the identity they always had."""
        return {k: v for k, v in asdict(self).items() if k not in self.RUN_ONLY
                and not (k in ("holdout", "holdout_docs", "metadata") and v is None)}

    @classmethod
    def resolve(cls, manifest_defaults: dict, flags: dict, source_metadata: dict | None = None) -> "BuildOptions":
        """Defaults < manifest `build:` < flags given on the command line (None = not given). Metadata is
        resolved per source (``resolve_metadata``) from ``source_metadata``: name -> the source's `metadata:`."""
        names = {f.name for f in fields(cls)} - {"metadata"}
        merged = {k: v for k, v in manifest_defaults.items() if k in names}
        merged.update({k: v for k, v in flags.items() if v is not None and k in names})
        merged["metadata"] = resolve_metadata(manifest_defaults.get("metadata"), flags, source_metadata or {})
        return cls(**merged)


CLI_METADATA = {"metadata_template": "template", "metadata_prob": "prob", "metadata_max_tokens": "max_tokens"}


def resolve_metadata(build_wide: dict | None, flags: dict, per_source: dict) -> dict | None:
    """Each source's metadata options, key by key: defaults < manifest `build: metadata:` < the source's own
    `metadata:` < the command line (`--metadata FIELD[:FORM]`, `--metadata-template`, ...), which applies
    to every source but those whose `metadata:` is false. None when no source gets metadata."""
    cli = {CLI_METADATA[k]: v for k, v in flags.items() if k in CLI_METADATA and v is not None}
    if "template" in cli:
        cli["template"] = unescape(cli["template"])
    given = flags.get("metadata")
    if isinstance(given, dict):          # data.build_args of a training config: a whole spec
        cli = {**given, **cli}
    elif given is not None:   # '' too: an empty shell variable is a mistake, not "no metadata"
        field, _, form = str(given).partition(":")
        cli.update(field=field, **({"form": form} if form else {}))
    out = {}
    for name, own in per_source.items():
        if own is False:
            out[name] = None
            continue
        spec = {**(build_wide or {}), **(own or {}), **cli}
        out[name] = spec if "field" in spec else None
    if cli and not any(out.values()):
        flag = "--" + next(k for k in ("metadata", *CLI_METADATA) if flags.get(k) is not None).replace("_", "-")
        raise SptokError(f"{flag}: no source has a metadata field; give --metadata FIELD[:FORM] (e.g. url:host) "
                         f"or `metadata: {{field: ...}}` in the manifest")
    return out if any(out.values()) else None


def check_metadata(spec: dict, where: str) -> dict:
    """One source's metadata options, complete (defaults filled in) and checked, each problem in one line."""
    if not isinstance(spec, dict):
        raise SptokError(f"{where}: expected a mapping such as {{field: url, form: host}}, got {shown(spec)}")
    spec = {**METADATA_DEFAULTS, **spec}
    unknown = sorted(set(spec) - {"field", *METADATA_DEFAULTS})
    if unknown:
        raise SptokError(f"{where}: unknown key {unknown[0]!r}; allowed keys: field, {', '.join(METADATA_DEFAULTS)}")
    if not isinstance(spec.get("field"), str) or not spec["field"]:
        raise SptokError(f"{where}: field must be the name of a record field (e.g. url), got "
                         f"{shown(spec.get('field'))}")
    if spec["form"] not in METADATA_FORMS:
        raise SptokError(f"--metadata: form {shown(spec['form'])} ({where}) is not one of {', '.join(METADATA_FORMS)} "
                         f"(value: the string as is; host: a URL's host without www.; url: a URL without its scheme)")
    t = spec["template"]
    if not isinstance(t, str) or t.count("{}") != 1:
        raise SptokError(f"--metadata-template: {shown(t)} ({where}) must hold {{}} exactly once, where the value "
                         f"goes, e.g. 'URL: {{}}\\n\\n'")
    p = spec["prob"]
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
        raise SptokError(f"--metadata-prob: must be a probability in [0, 1] ({where}), got {shown(p)}")
    spec["prob"] = float(p)
    if not _is_int(spec["max_tokens"]) or not 1 <= spec["max_tokens"] <= MAX_SEQ_LEN:
        raise SptokError(f"--metadata-max-tokens: must be a positive number of tokens ({where}), got "
                         f"{shown(spec['max_tokens'])}")
    return {k: spec[k] for k in ("field", *METADATA_DEFAULTS)}


def unescape(template: str) -> str:
    """A template typed on the command line: `\\n` and `\\t` are a newline and a tab, `\\\\` a backslash."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], template)


def partition_of(value: str | None, env) -> tuple[int, int] | None:
    """--partition i/N, else SLURM_ARRAY_TASK_ID/COUNT, else RANK/WORLD_SIZE (from ``env``), else None: the whole
    build."""
    if value:
        try:
            i, n = (int(x) for x in value.split("/"))
        except ValueError:
            raise SptokError(f"--partition: expected i/N such as 0/4, got {shown(value)}") from None
        src = "--partition"
    elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        i, n = _env_int(env, "SLURM_ARRAY_TASK_ID") - _env_int(env, "SLURM_ARRAY_TASK_MIN", 0), \
            _env_int(env, "SLURM_ARRAY_TASK_COUNT")
        src = "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT"
    elif "RANK" in env and "WORLD_SIZE" in env:
        i, n = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
        src = "RANK/WORLD_SIZE"
    else:
        return None
    if not (n >= 1 and 0 <= i < n):
        raise SptokError(f"{src}: partition {i}/{n} is out of range (need 0 <= i < N)")
    return (i, n) if n > 1 else None


def _env_int(env, name: str, default: int | None = None) -> int:
    """An integer environment variable that decides the partition, or one line naming it."""
    value = env.get(name, default)
    try:
        return int(value)
    except ValueError:
        raise SptokError(f"{name}={shown(value)}: expected an integer (it picks this machine's partition); "
                         f"set it right, or pass --partition i/N") from None

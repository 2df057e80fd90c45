"""Phases of one run (``data.phases``): the mixture of sources, and optionally the load-time SP policy, change
at given steps.

Each phase reads its own ``StreamingDataset``, weighted by the phase's proportions, whose epoch is exactly the
phase's samples (steps x global batch): streaming draws each source's share of an epoch without repeating a
sample unless the share is more than the source holds (then every sample comes whole-number times, the rest
a seeded subset), and the counts per source are exact. The loader's position is saved with the phase it
belongs to, so a resume inside a phase continues that phase's epoch, and one at its end starts the next.
Without ``data.phases`` the run is one phase: the build's epoch, repeated as needed (as before phases).
The load-time SP policy at a step is here too (``sp_policy_at``): a phase's own, or ``data.sp_schedule``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SptokError
from .config import Config, phase_ends


@dataclass(frozen=True)
class Phase:
    index: int
    start: int                 # its first step
    end: int                   # the step after its last
    proportion: dict | None    # source -> share (sources left out: none); None: data.proportion / weights
    sp_policy: str | None      # None: data.sp_policy / data.sp_schedule


def plan_phases(cfg: Config) -> list[Phase]:
    """The run's phases (one covering every step when data.phases is empty)."""
    if not cfg.data.phases:
        return [Phase(0, 0, cfg.train.steps, None, None)]
    ends = phase_ends(cfg.data.phases, cfg.train.steps)
    return [Phase(i, start, end, p["proportion"], p["sp_policy"])
            for i, (start, end, p) in enumerate(zip([0] + ends, ends, cfg.data.phases))]


def phase_at(phases: list[Phase], step: int) -> int:
    """The index of the phase that ``step`` (0-based) belongs to."""
    return next((p.index for p in phases if step < p.end), phases[-1].index)


def phase_weights(cfg: Config, phase: Phase, sources: list[str]) -> tuple[dict | None, bool]:
    """``open_dataset``'s (proportion, weights) for a phase: its own proportions, every source named (those
    left out at 0), or the run's."""
    if phase.proportion is None:
        return cfg.data.proportion, cfg.data.weights
    unknown = sorted(set(phase.proportion) - set(sources))
    if unknown:
        raise SptokError(f"data.phases[{phase.index}].proportion: no source {unknown[0]!r} in {cfg.data.build} "
                         f"(sources: {', '.join(sources)})")
    return {n: float(phase.proportion.get(n, 0.0)) for n in sources}, False


def open_phase(cfg: Config, phase: Phase, sources: list[str] | None = None):
    """The dataset a phase reads. ``sources``: the build's, when known (else read here, if the phase needs
    them to name its shares)."""
    from ..data import open_dataset

    kwargs = {}
    if cfg.data.phases:
        kwargs["epoch_size"] = (phase.end - phase.start) * cfg.train.global_batch_size
    if sources is None and phase.proportion is not None:
        from ..build_info import BuildInfo

        sources = BuildInfo.load(cfg.data.build).sources
    proportion, weights = phase_weights(cfg, phase, sources)
    return open_dataset(cfg.data.build, batch_size=cfg.train.micro_batch_size, shuffle=cfg.data.shuffle,
                        shuffle_seed=cfg.train.seed, proportion=proportion, repeat=cfg.data.repeat, weights=weights,
                        expected_fingerprint=cfg.data.expected_fingerprint, **kwargs)


def sp_policy_at(cfg: Config, step: int) -> str:
    """The load-time SP policy in force at ``step``: its phase's, when that phase sets one (config.py refuses
    a phase's policy together with a schedule), else the schedule's last entry that has begun."""
    if cfg.data.phases:
        phases = plan_phases(cfg)
        own = phases[phase_at(phases, step)].sp_policy
        if own:
            return own
    policy = cfg.data.sp_policy
    for frac, p in sorted(cfg.data.sp_schedule, key=lambda x: float(x[0])):
        if step >= float(frac) * cfg.train.steps:
            policy = p
    return policy


def enter_phase(run, index: int) -> None:
    """Read phase ``index`` from now on: its own dataset (the last one's is closed first, on every rank, so
    streaming's shared memory is free for it) and a loader over it."""
    from ..data import Loader

    run.loader.dataset.close()
    ds = open_phase(run.cfg, run.phases[index], run.info.sources)
    run.loader = Loader(ds, run.collator, batch_size=run.cfg.train.micro_batch_size,
                        num_workers=run.cfg.data.num_workers)
    run.phase = run.meter.phase = index
    p = run.phases[index]
    run.say(f"phase {index}: steps {p.start + 1}-{p.end}, proportion {p.proportion or 'as data'}, "
            f"sp_policy {sp_policy_at(run.cfg, p.start)}")


def phase_summary(run, phase) -> dict:
    """run.json's record of a phase: its steps, the shares it asked for, its load-time SP policy."""
    from ..data import source_weights

    proportion, weights = phase_weights(run.cfg, phase, run.info.sources)
    return {"phase": phase.index, "start_step": phase.start, "end_step": phase.end,
            "requested": source_weights(run.info, proportion, run.cfg.data.repeat, weights),
            "sp_policy": sp_policy_at(run.cfg, phase.start)}

"""Phases of one run (``data.phases``): the mixture of sources, and optionally the load-time SP policy, change
at given steps.

Each phase reads its own ``StreamingDataset``, weighted by the phase's proportions, whose epoch is exactly the
phase's samples (steps x global batch): streaming draws each source's share of an epoch without repeating a
sample unless the share is more than the source holds (then every sample comes whole-number times, the rest
a seeded subset), and the counts per source are exact. The loader's position is saved with the phase it
belongs to, so a resume inside a phase continues that phase's epoch, and one at its end starts the next.
Without ``data.phases`` the run is one phase: the build's epoch, repeated as needed (as before phases).
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
    """The dataset a phase reads. ``sources``: the build's, when known (the first phase learns them here)."""
    from ..data import open_dataset

    kwargs = {}
    if cfg.data.phases:
        kwargs["epoch_size"] = (phase.end - phase.start) * cfg.train.global_batch_size
    if sources is None:
        from ..build_info import BuildInfo

        sources = BuildInfo.load(cfg.data.build).sources
    proportion, weights = phase_weights(cfg, phase, sources)
    return open_dataset(cfg.data.build, batch_size=cfg.train.micro_batch_size, shuffle=cfg.data.shuffle,
                        shuffle_seed=cfg.train.seed, proportion=proportion, repeat=cfg.data.repeat, weights=weights,
                        expected_fingerprint=cfg.data.expected_fingerprint, **kwargs)

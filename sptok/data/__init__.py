"""Reading sptok builds: datasets, collators, the load-time SP policy, and document masks where attention runs.

    from sptok.data import open_dataset, MLMCollator
    ds = open_dataset("out/demo", batch_size=32, shuffle=True)
    loader = Loader(ds, MLMCollator(ds.build, sp_policy="msp=0.15"), batch_size=32, num_workers=2)
"""

from .build_info import BuildInfo
from .collate import IGNORE, CausalLMCollator, MLMCollator, SpanCorruptionCollator
from .dataset import open_dataset, source_weights
from .loader import Loader
from .policy import SPPolicy, apply_policy, as_arrays

__all__ = ["BuildInfo", "open_dataset", "source_weights", "Loader", "MLMCollator", "CausalLMCollator",
           "SpanCorruptionCollator", "SPPolicy", "apply_policy", "as_arrays", "IGNORE", "apply_document_attention"]


def __getattr__(name: str):
    if name == "apply_document_attention":   # imports torch: only when asked for
        from .attention import apply_document_attention

        return apply_document_attention
    raise AttributeError(f"module 'sptok.data' has no attribute {name!r}")

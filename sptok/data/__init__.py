"""Reading sptok builds for training: datasets, collators, the load-time SP policy, and document masks
where attention runs (the `train` extra).

    from sptok.data import open_dataset, MLMCollator
    ds = open_dataset("out/demo", batch_size=32, shuffle=True)
    loader = Loader(ds, MLMCollator(ds.build, sp_policy="msp=0.15"), batch_size=32)   # num_workers="auto"
"""

from ..extras import require

require("train", "sptok.data")

from ..build_info import BuildInfo  # noqa: E402 - after the check, which names the extra to install
from ..shards import as_arrays  # noqa: E402
from .collate import IGNORE, CausalLMCollator, MLMCollator, SpanCorruptionCollator  # noqa: E402
from .dataset import open_dataset, source_weights  # noqa: E402
from .loader import Loader, auto_workers  # noqa: E402
from .policy import SPPolicy, apply_policy  # noqa: E402

__all__ = ["BuildInfo", "open_dataset", "source_weights", "Loader", "auto_workers", "MLMCollator",
           "CausalLMCollator", "SpanCorruptionCollator", "SPPolicy", "apply_policy", "as_arrays", "IGNORE",
           "apply_document_attention"]


def __getattr__(name: str):
    if name == "apply_document_attention":   # imports torch: only when asked for
        from .attention import apply_document_attention

        return apply_document_attention
    raise AttributeError(f"module 'sptok.data' has no attribute {name!r}")

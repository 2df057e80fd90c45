"""Reading sptok builds for training: datasets, collators and the load-time SP policy.

    from sptok.data import open_dataset, MLMCollator
    ds = open_dataset("out/demo", batch_size=32, shuffle=True)
    loader = Loader(ds, MLMCollator(ds.build, sp_policy="msp=0.15"), batch_size=32, num_workers=2)
"""

from ..build_info import BuildInfo
from ..shards import as_arrays
from .collate import IGNORE, CausalLMCollator, MLMCollator, SpanCorruptionCollator
from .dataset import open_dataset, source_weights
from .loader import Loader
from .policy import SPPolicy, apply_policy

__all__ = ["BuildInfo", "open_dataset", "source_weights", "Loader", "MLMCollator", "CausalLMCollator",
           "SpanCorruptionCollator", "SPPolicy", "apply_policy", "as_arrays", "IGNORE"]

"""`sptok pretrain` and `sptok export`: a thin trainer over sptok builds (the `train` extra).

Modules: ``config`` (dataclasses from YAML), ``model`` (transformers configs), ``losses``, ``parallelize``
(DDP / FSDP2), ``checkpoint`` (DCP), ``stop`` (signals, time budget), ``loop`` (the training loop), ``export``
(a save_pretrained directory).
"""

from ..extras import require

require("train", "sptok.train")

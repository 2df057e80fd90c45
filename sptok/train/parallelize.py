"""Apply activation checkpointing, compilation and data parallelism, in that order (torchtitan's recipe).

FSDP2: ``fully_shard`` each transformer block, then the root, with a bf16 MixedPrecisionPolicy (fp32
gradient reduction) on CUDA; fp32 on CPU, where gloo runs the same code for the tests.
"""

from __future__ import annotations

import torch
from torch import nn

from .model import blocks


def apply_activation_checkpointing(model) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def apply_compile(model) -> None:
    """Compile each block in place (before sharding): one graph per block type, reused across layers."""
    for block in blocks(model):
        block.compile()


def apply_fsdp(loss_model: nn.Module, bf16: bool) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in blocks(loss_model.model):
        fully_shard(block, mp_policy=mp)
    fully_shard(loss_model, mp_policy=mp)
    return loss_model


def apply_ddp(loss_model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(loss_model, device_ids=ids)


def parallelize(loss_model: nn.Module, parallel: str, device: torch.device, bf16: bool, ac: bool, compile_: bool):
    if ac:
        apply_activation_checkpointing(loss_model.model)
    if compile_:
        apply_compile(loss_model.model)
    if parallel == "fsdp":
        return apply_fsdp(loss_model, bf16)
    if parallel == "ddp":
        return apply_ddp(loss_model, device)
    return loss_model


def set_grad_sync(model: nn.Module, enabled: bool) -> None:
    """Skip gradient communication on all micro-batches of a step but the last."""
    if hasattr(model, "set_requires_gradient_sync"):      # FSDP2
        model.set_requires_gradient_sync(enabled)
    elif hasattr(model, "require_backward_grad_sync"):    # DDP
        model.require_backward_grad_sync = enabled

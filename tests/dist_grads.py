"""Run under torchrun (or alone): one step's gradients on a fixed global batch, saved by rank 0.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_grads.py BUILD OUT.pt {none|ddp|fsdp} FAMILY MICRO

Used by tests/test_train.py to show that 1 process, 2-process DDP and 2-process FSDP give the same gradients.
"""

import os
import sys

import torch
import torch.distributed as dist


def main():
    build, out, parallel, family, micro_size = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    from sptok.data import open_dataset
    from sptok.train.config import ModelConfig
    from sptok.train.loop import forward_backward, init_distributed
    from sptok.train.losses import LossModel
    from sptok.train.model import build_model
    from sptok.train.parallelize import parallelize
    from sptok.train.config import Config, DataConfig
    from sptok.train.loop import make_collator

    rank, world, device = init_distributed("cpu")
    ds = open_dataset(build, weights=False)
    info = ds.build
    global_batch = [ds[i] for i in range(8)]               # the same 8 samples, whatever the split
    cfg = Config(model=ModelConfig(family=family, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
                 data=DataConfig(build=build))
    collate = make_collator(cfg, info)
    mine = global_batch[rank::world]                        # this rank's share ...
    micro = [collate(mine[i:i + micro_size]) for i in range(0, len(mine), micro_size)]   # ... in micro-batches
    torch.manual_seed(0)
    model = LossModel(build_model(cfg.model, info), family, info.sp_ids.tolist())
    trained = parallelize(model, parallel, device, bf16=False, ac=False, compile_=False)
    forward_backward(trained, micro, world, device)
    grads = {}
    for name, p in trained.named_parameters():
        g = p.grad
        if hasattr(g, "full_tensor"):
            g = g.full_tensor()
        grads[name.replace("module.", "")] = g.detach().clone()
    if rank == 0:
        torch.save(grads, out)
    if dist.is_initialized():
        dist.barrier()                 # rank 0 has saved; no rank leaves while another still uses the group
        # Skip the interpreter's teardown: gloo's threads there aborted a rank about once in a few hundred runs
        # ("terminate called without an active exception"), after the gradients were saved.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()

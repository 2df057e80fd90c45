"""A loader that reads samples in worker processes and collates where the batches are consumed.

Why not ``DataLoader(collate_fn=collator)``: measured here, a collator running inside a streaming
worker is slowed several-fold by the dataset's own prefetch threads competing for the GIL, and
handing torch tensors back through shared memory costs more than the collation itself. Raw samples
travel cheaply (small numpy arrays and bytes), and collation in the consuming process keeps MLM + MSP at
0.6-0.9x raw iteration (``benchmarks/RESULTS.md``), overlapping the GPU's asynchronous work.
Resumption is exact: ``state_dict()`` is streaming's, and collation is a pure function of the samples.
"""

from __future__ import annotations


def _samples(samples: list) -> dict:
    """The workers' "collation": the samples as they are, in a dict so StreamingDataLoader counts them right."""
    return {"samples": samples}


class Loader:
    def __init__(self, dataset, collator, batch_size: int, num_workers: int = 0, **kwargs):
        self.dataset = dataset
        self.collator = collator
        if hasattr(dataset, "state_dict"):            # a StreamingDataset: resumable mid-epoch
            from streaming import StreamingDataLoader

            self.loader = StreamingDataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                              collate_fn=_samples, **kwargs)
        else:                                         # an Arrow build through `datasets`
            from torch.utils.data import DataLoader

            self.loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_samples,
                                     **kwargs)

    def __iter__(self):
        for batch in self.loader:
            yield self.collator(batch["samples"])

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state) -> None:
        self.loader.load_state_dict(state)

"""A rank of the two-rank FD/KD check (tests/core/test_generator_metrics.py), started by torchrun:
``python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.core.two_rank_distances IN OUT``.
Each rank takes its half of the real and generated features from IN; rank 0 writes the result to OUT."""

import sys

import torch
import torch.distributed as dist

from core.generator_metrics import distances


def main() -> None:
    source, target = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    features = torch.load(source, weights_only=True)
    real, fake = features["real"], features["fake"]
    torch.manual_seed(0)  # KD's subsets: the same draw on every rank, as on one
    share = lambda x: x[rank * len(x) // world:(rank + 1) * len(x) // world]  # noqa: E731
    got = distances(share(real), share(fake), kid_subsets=4, kid_subset_size=100, sync=True)
    if rank == 0:
        torch.save(got, target)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

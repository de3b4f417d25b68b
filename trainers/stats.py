"""Statistics that stay on the device until the tick (STYLE 15): each phase's loss and whatever scalars a
method reports, summed on the device as they come, reduced across ranks once per tick; and the
non-finite watch, a device flag per phase set at the first NaN/inf loss and read at ticks and before
checkpoints. Nothing here synchronises the host with the device per micro-step."""

from __future__ import annotations

import torch


class TickStats:
    """Per-name running sums and counts of reported values (tensors on the device): a scalar's mean, or a
    vector's elementwise mean (``vectors=True``: a method's running statistics such as w's mean)."""

    def __init__(self, device: torch.device, vectors: bool = False):
        self.device, self.vectors = device, vectors
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        value = value.flatten() if self.vectors and value.numel() > 1 else value.mean()
        if name not in self.sums:
            self.sums[name] = torch.zeros(value.shape, dtype=torch.float64, device=self.device)
            self.counts[name] = torch.zeros((), dtype=torch.float64, device=self.device)
        self.sums[name] += value
        self.counts[name] += 1

    def reduce(self, world_size: int) -> dict:
        """Means over the tick and all ranks, in one collective: floats, and CPU tensors for vectors. Every
        rank reports the same names and shapes, since the phases and methods run the same code on each."""
        names = sorted(self.sums)
        if not names:
            return {}
        table = torch.cat([*(self.sums[n].reshape(-1) for n in names), torch.stack([self.counts[n] for n in names])])
        if world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(table)
        table = table.cpu()
        counts = table[-len(names):].tolist()
        out, start = {}, 0
        for name, count in zip(names, counts):
            size = self.sums[name].numel()
            mean = table[start:start + size] / max(count, 1)
            start += size
            if count:
                out[name] = mean.reshape(self.sums[name].shape).float() if self.sums[name].ndim else float(mean)
        return out

    def clear(self) -> None:
        self.sums.clear()
        self.counts.clear()

    def state_dict(self) -> dict:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "counts": {k: v.cpu() for k, v in self.counts.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.sums = {k: v.to(self.device) for k, v in state["sums"].items()}
        self.counts = {k: v.to(self.device) for k, v in state["counts"].items()}


class NonFiniteWatch:
    """The first step at which each phase's loss was NaN/inf (-1: never), kept on the device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.first: dict[str, torch.Tensor] = {}

    def watch(self, phase: str, loss: torch.Tensor, step: int) -> None:
        if phase not in self.first:
            self.first[phase] = torch.full((), -1, dtype=torch.int64, device=self.device)
        first = self.first[phase]
        first.masked_fill_(~torch.isfinite(loss.detach()).all() & (first < 0), step)

    def check(self, world_size: int) -> tuple[str, int] | None:
        """(phase, step) of the earliest non-finite loss on any rank, or None; one collective."""
        if not self.first:
            return None
        names = sorted(self.first)
        never = torch.iinfo(torch.int64).max
        steps = torch.stack([torch.where(self.first[n] < 0, torch.full_like(self.first[n], never), self.first[n])
                             for n in names])
        if world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(steps, op=dist.ReduceOp.MIN)
        values = steps.cpu().tolist()
        earliest = min(values)
        return None if earliest == never else (names[values.index(earliest)], earliest)

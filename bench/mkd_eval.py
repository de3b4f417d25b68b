"""MKD's scoring cost with and without ``localise_top``: the input-gradient map costs a backward pass
per tile, so mapping only each batch's top share saves most of it (the image scores are identical).

    python bench/mkd_eval.py [--passes 5] [--tile 128] [--batch 32] [--share 0.1]

Both settings score the same batch alternately in one process (EfficientNet-Lite0 source, the offline
weights; the slide recipes' layers), CPU and wall time per batch, median and spread over the passes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # ahead of bench/, whose tune.py would hide the tune package


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--share", type=float, default=0.1)
    args = parser.parse_args()
    import torch

    from core.methods import create_method

    print(f"load average {os.getloadavg()}; torch threads {torch.get_num_threads()}")
    options = {"net": "efficientnet_lite0", "weights": "imagenet", "layers": ["reduction2", "reduction3", "reduction4"],
               "cloner_base": 16, "lambda_dir": 1.0}
    full = create_method("mkd", options).eval()
    cheap = create_method("mkd", {**options, "localise_top": args.share}).eval()
    cheap.load_state_dict(full.state_dict())
    images = torch.rand(args.batch, 3, args.tile, args.tile, generator=torch.Generator().manual_seed(0))
    times = {"localise all": ([], []), f"localise_top={args.share:g}": ([], [])}
    for _ in range(args.passes):
        for (name, (cpu, wall)), method in zip(times.items(), (full, cheap)):
            started_cpu, started = time.process_time(), time.perf_counter()
            scores, _ = method.score({"image": images})
            cpu.append(time.process_time() - started_cpu)
            wall.append(time.perf_counter() - started)
    torch.testing.assert_close(full.score({"image": images})[0], cheap.score({"image": images})[0])
    for name, (cpu, wall) in times.items():
        print(f"{name:>20}: CPU {statistics.median(cpu):.3f} s (spread {max(cpu) - min(cpu):.3f}), wall "
              f"{statistics.median(wall):.3f} s (spread {max(wall) - min(wall):.3f}) per {args.batch} tiles of "
              f"{args.tile} px")
    (full_cpu, _), (cheap_cpu, _) = times.values()
    print(f"CPU time ratio: {statistics.median(full_cpu) / statistics.median(cheap_cpu):.2f}x; image scores identical")


if __name__ == "__main__":
    main()

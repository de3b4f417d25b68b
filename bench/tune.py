"""Ray Tune's overhead in tessera's setting: M short trials on a local runtime of C CPUs (one CPU per
trial), wall time of the whole search against the sum of the trials' own run times / C, with trial
processes reused (``tune.reuse_actors: true``, tessera's default) and, side by side in the same run,
with a fresh process per trial (Ray's default for function trainables).

    python bench/tune.py [--trials 16] [--seconds 10] [--cpus 2]

Each trial imports torch (as a tessera trial does; in a reused process that costs nothing the second
time), then does ``--seconds`` of CPU work (numpy) in 10 reports, like a short training trial reporting
per epoch; its own time is measured inside the trial from after the import. Overhead = wall / (sum of
own times / C) - 1 (Ray's docs report ~14% at 16 CPUs with 1-second trials). Peak memory of the
driver is printed too.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time


def busy_trial(config: dict) -> None:
    import numpy as np
    import torch  # noqa: F401  a tessera trial's first import; overhead, not the trial's own time
    from ray import tune

    started = time.perf_counter()
    a = np.random.default_rng(0).random((64, 64))
    for report in range(10):
        until = started + config["seconds"] * (report + 1) / 10
        while time.perf_counter() < until:
            a = a @ a / (np.abs(a).max() + 1.0)
        tune.report({"own_seconds": time.perf_counter() - started, "step": report + 1, "score": float(a.mean())})


def search(trials: int, seconds: float, reuse: bool) -> tuple[float, float]:
    """(wall seconds of the search, sum of the trials' own seconds)."""
    from ray import tune

    storage = tempfile.mkdtemp(prefix="bench-tune-")
    tuner = tune.Tuner(tune.with_resources(busy_trial, {"cpu": 1}),
                       param_space={"seconds": seconds, "i": tune.grid_search(list(range(trials)))},
                       tune_config=tune.TuneConfig(metric="score", mode="max", reuse_actors=reuse),
                       run_config=tune.RunConfig(storage_path=storage, name="bench", verbose=0))
    started = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - started
    return wall, sum(result.metrics["own_seconds"] for result in grid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import ray

    init_started = time.perf_counter()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             _temp_dir=os.environ.get("RAY_TMPDIR"))
    init_seconds = time.perf_counter() - init_started
    print(f"{args.trials} trials x {args.seconds:g} s of work (10 reports each) on {args.cpus} CPUs; "
          f"ray.init {init_seconds:.1f} s (once per search, not counted below)")
    overheads = {}
    for reuse in (True, False):
        wall, own = search(args.trials, args.seconds, reuse)
        ideal = own / args.cpus
        overheads[reuse] = wall / ideal - 1
        print(f"  reuse_actors={str(reuse):5}  wall {wall:6.1f} s; own {own:6.1f} s / {args.cpus} CPUs = "
              f"{ideal:6.1f} s; overhead {overheads[reuse]:6.1%}")
    print(f"  fresh processes cost {(1 + overheads[False]) / (1 + overheads[True]):.2f}x the wall time of reused ones")
    print(f"  driver peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    ray.shutdown()


if __name__ == "__main__":
    main()

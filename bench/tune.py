"""Ray Tune's overhead in tessera's setting: M short trials on a local runtime of C CPUs (one CPU per
trial), wall time of the whole search against the sum of the trials' own run times / C.

    python bench/tune.py [--trials 16] [--seconds 1.0] [--cpus 2]

Each trial does ``--seconds`` of CPU work (numpy) in 10 reports, like a short training trial reporting
per epoch; its own time is measured inside the trial. Overhead = wall / (sum of own times / C) - 1
(Ray's docs report ~14% at 16 CPUs with 1-second trials). Peak memory of the driver is printed too.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time


def busy_trial(config: dict) -> None:
    import numpy as np
    from ray import tune

    started = time.perf_counter()
    a = np.random.default_rng(0).random((64, 64))
    for report in range(10):
        until = started + config["seconds"] * (report + 1) / 10
        while time.perf_counter() < until:
            a = a @ a / (np.abs(a).max() + 1.0)
        tune.report({"own_seconds": time.perf_counter() - started, "step": report + 1, "score": float(a.mean())})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--reuse-actors", action=argparse.BooleanOptionalAction, default=False,
                        help="reuse trial processes (Ray's default for functions, and tessera tune's for now, is not to)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import ray
    from ray import tune

    init_started = time.perf_counter()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             _temp_dir=os.environ.get("RAY_TMPDIR"))
    init_seconds = time.perf_counter() - init_started
    storage = tempfile.mkdtemp(prefix="bench-tune-")
    tuner = tune.Tuner(tune.with_resources(busy_trial, {"cpu": 1}),
                       param_space={"seconds": args.seconds, "i": tune.grid_search(list(range(args.trials)))},
                       tune_config=tune.TuneConfig(metric="score", mode="max", reuse_actors=args.reuse_actors),
                       run_config=tune.RunConfig(storage_path=storage, name="bench", verbose=0))
    started = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - started
    own = sum(result.metrics["own_seconds"] for result in grid)
    ideal = own / args.cpus
    print(f"{args.trials} trials x {args.seconds:g} s of work (10 reports each) on {args.cpus} CPUs, "
          f"reuse_actors={args.reuse_actors}:")
    print(f"  ray.init {init_seconds:.1f} s (once per search, not counted below)")
    print(f"  search wall {wall:.1f} s; sum of trials' own times {own:.1f} s, / {args.cpus} CPUs = {ideal:.1f} s")
    print(f"  overhead = wall / ideal - 1 = {wall / ideal - 1:.1%}")
    print(f"  driver peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    ray.shutdown()


if __name__ == "__main__":
    main()

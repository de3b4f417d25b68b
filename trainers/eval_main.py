"""Worker entry point of a distributed evaluation: ``python -m trainers.eval_main RUN_DIR [--store S]
[--split SPLIT] [--group G …]`` under torchrun; each rank scores its share of the items, the main
rank writes the outputs."""

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--store")
    parser.add_argument("--split", default="test")
    parser.add_argument("--group", action="append", dest="groups")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--score-smoothing", type=float)
    parser.add_argument("--normal-baseline")
    parser.add_argument("--options", help="JSON: method options for scoring")
    parser.add_argument("--out")
    parser.add_argument("--slide-top-fraction", type=float, default=0.05)
    args = parser.parse_args()
    import json

    from trainers.dist import DistEnv
    from trainers.evaluate import evaluate

    env = DistEnv.from_env()
    device = env.init()
    evaluate(args.run_dir, args.store, args.split, args.groups, workers=args.workers, env=env, device=device,
             show_progress=env.is_main, score_smoothing=args.score_smoothing,
             normal_baseline=args.normal_baseline, options=json.loads(args.options) if args.options else None,
             out=args.out, slide_top_fraction=args.slide_top_fraction)


if __name__ == "__main__":
    main()

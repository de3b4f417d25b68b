"""Worker entry point: ``python -m trainers.main RUN_DIR [--resume] [--until STEP]`` under torchrun or the
DeepSpeed launcher."""

import argparse
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--until", type=int, default=None, help="stop at this step, with a checkpoint")
    args = parser.parse_args()
    from trainers.dist import die_with_launcher

    die_with_launcher()  # a killed launcher takes its ranks with it: no orphan keeps training
    from trainers.files import UnsafeFileError
    from trainers.loop import TrainingDiverged, run
    from trainers.run_dir import RunLocked

    try:
        run(args.run_dir, args.resume, args.until)
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(3)
    except (RunLocked, UnsafeFileError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""Kept for job scripts written before the training entry point moved: ``python -m tessera.worker`` runs
:mod:`trainers.worker`."""

from trainers.worker import load_latest, main, run

__all__ = ["load_latest", "main", "run"]

if __name__ == "__main__":
    main()

"""Commands of generator runs: synthesize tiles into a store, or project real tiles (--project)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tessera.app import SET_HELP, ConfigArg, _fail, _load, _method_options, _WritingTo, app  # noqa: F401


@app.command()
def synthesize(run_dir: Path = typer.Argument(..., help="A finished generator run (stylegan2, stylegan2_encoder)."),
               count: Optional[int] = typer.Option(None, min=1, help="Tiles to make: tile i from seed SEED0 + i."),
               store: str = typer.Option(..., help="Store to write into (created if missing)."),
               name: Optional[str] = typer.Option(None, help="Name of the synthetic set; default the run's name."),
               seed0: int = typer.Option(0, help="Seed of tile 0."),
               truncation: Optional[float] = typer.Option(None, help="ψ; default the run's truncation_psi."),
               batch: Optional[int] = typer.Option(None, min=1, help="Tiles per generator pass (the set's block; "
                                                                    "default 1 on CPU, 32 on GPU)."),
               split: Optional[str] = typer.Option(None, help="Split recorded in the tiles' rows (default train); "
                                                              "with --project, the split inverted (default test)."),
               project: bool = typer.Option(False, "--project", help="Invert the store's real tiles of --split "
                                                                     "instead: reconstructions, distances, heatmaps."),
               option: Optional[list[str]] = typer.Option(None, "--option", help="KEY=VALUE method option for "
                                                          "--project (projector_steps=100, refine_steps=20)."),
               noise: str = typer.Option("const", help="const (learned noise maps) or none."),
               nproc: int = typer.Option(1, min=1, help="Local processes (torchrun), each making its share."),
               nnodes: int = typer.Option(1, min=1, help="Nodes, each running this same command (with --nproc and "
                                                         "--rdzv-endpoint); ranks make shares, no other traffic."),
               rdzv_endpoint: Optional[str] = typer.Option(None, help="HOST:PORT of the torchrun rendezvous (nodes > 1)."),
               resume: bool = typer.Option(False, help="Complete an existing set (tiles already written are kept)."),
               rank: Optional[int] = typer.Option(None, min=0, help="This process's share, when a scheduler "
                                                             "starts the ranks (default from torchrun/Slurm)."),
               world: Optional[int] = typer.Option(None, min=1, help="Number of shares (with --rank).")) -> None:
    """Generate tiles into a store's synthetic set: deterministic by seed, sharded by rank, resumable; the set
    streams like ingested tiles (data.stream.synthetic) once complete. With --project: invert real tiles the
    same way, storing reconstructions and distances, stitched into slide heatmaps."""
    import os
    import subprocess
    import sys
    import uuid

    from data_plane.synthetic import SyntheticError, SyntheticSet
    from trainers.synthesize import default_batch, load_generator, set_spec, synthesize as run_synthesize

    import torch

    options = _method_options(option)
    if project:
        _project_command(run_dir, store, split or "test", name, batch, options, nproc, resume)
        return
    if count is None:
        _fail("--count is required (how many tiles to make), unless --project")
    if nnodes > 1 and not rdzv_endpoint:
        _fail("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the first node), the same on every node")
    split = split or "train"
    try:
        if nproc > 1 or nnodes > 1:
            # The parent creates and locks the set for the job; its torchrun ranks (on every node: the job id
            # comes from the rendezvous they share) carry on under it.
            job = f"synthesize-{rdzv_endpoint}" if nnodes > 1 else f"synthesize-{uuid.uuid4().hex[:12]}"
            os.environ["TESSERA_JOB_ID"] = os.environ.get("TESSERA_JOB_ID") or job
            os.environ["TESSERA_JOB_PID"] = str(os.getpid())
            method, saved = load_generator(run_dir)
            device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
            batch = batch or default_batch(device)
            spec = set_spec(run_dir, method, saved, count, seed0, truncation, batch, split, noise)
            with _WritingTo(store):
                synthetic = SyntheticSet.open(store, name or run_dir.name, spec, resume=resume)
                synthetic.lock()
            launch = ["--standalone"] if nnodes == 1 else [f"--nnodes={nnodes}", "--rdzv-backend=c10d",
                                                          f"--rdzv-endpoint={rdzv_endpoint}"]
            command = [sys.executable, "-m", "torch.distributed.run", *launch, f"--nproc_per_node={nproc}",
                       "-m", "trainers.synthesize", str(run_dir), "--store", str(store), "--count", str(count),
                       "--name", synthetic.name, "--seed0", str(seed0), "--batch", str(batch), "--split", split,
                       "--noise", noise, "--resume"] + (["--truncation", str(truncation)] if truncation is not None else [])
            code = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
                                  ).returncode
            if code:
                _fail(f"synthesis failed (exit {code}); rerun with --resume to complete the set", code=code)
            if not SyntheticSet(store, synthetic.name).complete():
                _fail("the ranks finished but the set is not complete; rerun with --resume", code=1)
            synthetic.unlock()
        else:
            with _WritingTo(store):
                result = run_synthesize(run_dir, store, count, name, seed0, truncation, batch, split, noise, resume,
                                        rank, world, log=lambda line: typer.echo(line))
            if not result["complete"]:
                typer.echo(f"rank {result['rank']}/{result['world']} done; the set completes when every rank has "
                           f"written its share")
    except (SyntheticError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


def _project_command(run_dir: Path, store: str, split: str, name: Optional[str], batch: Optional[int], options: dict,
                     nproc: int, resume: bool) -> None:
    import json
    import os
    import subprocess
    import sys
    import uuid

    import torch

    from data_plane.synthetic import SyntheticError, SyntheticSet
    from trainers.export import load_method
    from trainers.synthesize import default_batch, project, project_spec, projection_source

    try:
        if nproc == 1:
            with _WritingTo(store):
                result = project(run_dir, store, split, name, batch, options, resume, log=lambda line: typer.echo(line))
            if not result["complete"]:
                typer.echo("this share is done; the set completes when every rank has written its share")
            return
        os.environ["TESSERA_JOB_ID"] = os.environ.get("TESSERA_JOB_ID") or f"project-{uuid.uuid4().hex[:12]}"
        os.environ["TESSERA_JOB_PID"] = str(os.getpid())
        method, _ = load_method(run_dir, options)
        batch = batch or default_batch(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        rows, _, _ = projection_source(run_dir, store, split, method.config.resolution)
        name = name or f"{run_dir.name}-project-{split}"
        with _WritingTo(store):
            synthetic = SyntheticSet.open(store, name, project_spec(run_dir, method, split, len(rows), batch, options),
                                          resume=resume, source=rows)
            synthetic.lock()
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "trainers.synthesize", str(run_dir), "--store", str(store), "--project", "--split", split,
                   "--name", name, "--batch", str(batch), "--options", json.dumps(options), "--resume"]
        code = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
                              ).returncode
        if code:
            _fail(f"projection failed (exit {code}); rerun with --resume to complete it", code=code)
        if not SyntheticSet(store, name).complete():
            _fail("the ranks finished but the projection is not complete; rerun with --resume", code=1)
        synthetic.unlock()
    except (SyntheticError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))

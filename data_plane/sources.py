"""What ingest is given: sources (slides and volumes) from paths, globs, folders and manifest CSVs, the
errors that speak about them, and the file hash that identifies a source. Below both slide ingest
(data_plane.ingest) and volume ingest (data_plane.volumes), which import it and not each other's
internals.
"""

from __future__ import annotations

import csv
import glob
import hashlib
from dataclasses import dataclass
from pathlib import Path

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
MANIFEST_COLUMNS = ("path", "id", "slide_id", "volume_id", "label", "split", "annotation", "mask", "group")
LABELS = ("normal", "anomalous")
SPLITS = ("train", "val", "test")
VOLUME_SUFFIXES = (".nii", ".nii.gz")


class IngestError(RuntimeError):
    """A slide that cannot be ingested; the message says why and is recorded in manifest.json."""


class SourceError(ValueError):
    """The list of sources itself is wrong (bad manifest CSV): nothing is ingested."""


@dataclass
class Source:
    """One item to ingest: a slide (any OpenSlide format) or a volume (NIfTI file, DICOM folder)."""

    path: Path
    item_id: str
    label: str = "normal"
    split: str = "train"
    annotation: Path | None = None     # slides: ASAP XML / GeoJSON regions; volumes: a voxel mask volume
    group: str = ""
    kind: str = "slide"                # "slide" or "volume"


def source_for(path: Path, label: str = "normal", split: str = "train", annotation: Path | None = None,
               group: str = "", item_id: str | None = None) -> Source:
    if is_volume_path(path):
        return Source(path, item_id or volume_id_of(path), label, split, annotation, group, "volume")
    return Source(path, item_id or slide_id_of(path), label, split, annotation, group, "slide")


def slide_id_of(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", *SLIDE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_manifest_csv(path: Path) -> list[Source]:
    """Rows ``path,label,split,annotation|mask,group`` (``id`` optional); paths relative to the CSV."""
    if not path.is_file():
        raise SourceError(f"manifest CSV '{path}' does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        unknown = sorted(set(columns) - set(MANIFEST_COLUMNS))
        if "path" not in columns or unknown:
            raise SourceError(f"manifest CSV '{path}': columns must be among {', '.join(MANIFEST_COLUMNS)} "
                              f"with 'path' required; got {', '.join(columns) or 'none'}")
        sources, problems = [], []
        for line, row in enumerate(reader, start=2):
            if None in row:  # more cells than columns
                problems.append(f"line {line}: {len(row[None])} cell(s) more than the {len(columns)} columns")
                continue
            row = {k.strip(): (v or "").strip() for k, v in row.items()}
            label, split = row.get("label") or "normal", row.get("split") or "train"
            bad = [f"line {line}, column {column}: {value!r} is not one of {', '.join(allowed)}"
                   for column, value, allowed in (("label", label, LABELS), ("split", split, SPLITS))
                   if value not in allowed]
            if not row.get("path"):
                bad.append(f"line {line}, column path: empty")
            if bad:
                problems += bad
                continue
            slide = (path.parent / row["path"]).resolve()
            extra = row.get("annotation") or row.get("mask")
            annotation = (path.parent / extra).resolve() if extra else None
            item_id = row.get("id") or row.get("slide_id") or row.get("volume_id") or None
            sources.append(source_for(slide, label, split, annotation, row.get("group", ""), item_id))
    if problems:  # every bad row at once, so the CSV is fixed in one go; nothing is ingested
        raise SourceError(f"manifest CSV '{path}' has {len(problems)} problem(s); nothing was ingested:\n  "
                          + "\n  ".join(problems))
    return sources


def resolve_sources(paths: list[str], manifest_csv: Path | None = None, label: str = "normal",
                    split: str = "train", group: str = "") -> list[Source]:
    """Paths, globs and folders (their slide and NIfTI files; a folder of .dcm files is one DICOM
    series), plus the rows of a manifest CSV."""
    sources = read_manifest_csv(Path(manifest_csv)) if manifest_csv else []
    for text in paths:
        if Path(text).is_dir() and not is_volume_path(Path(text)):
            matches = sorted(str(p) for p in Path(text).iterdir()
                             if p.name.lower().endswith(SLIDE_SUFFIXES + VOLUME_SUFFIXES) or is_volume_path(p))
        else:
            matches = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
        # A missing path stays in the list: it fails with its reason while the others are ingested.
        sources += [source_for(Path(m).resolve(), label, split, None, group) for m in matches]
    return sources


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def is_volume_path(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(VOLUME_SUFFIXES):
        return True
    return path.is_dir() and any(p.suffix.lower() == ".dcm" for p in path.iterdir())


def volume_id_of(path: Path) -> str:
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name

"""Volumes (NIfTI files, DICOM series folders) into the store, and scores written back out.

Stored as the NGFF image ``volumes/<id>``, array ``0``: float32 (z, y, x) after reorientation to RAS,
so that ``0[k, j, i]`` is voxel (i, j, k) of the RAS image whose affine is ``attrs["tessera"]["affine"]``;
mm scales and the origin in the NGFF metadata (data_plane/ngff.py); intensities clipped to
percentiles and scaled to [0, 1] (the values used are recorded). An optional voxel mask is its NGFF
label ``labels/mask`` (uint8); score volumes are images ``scores/<run>`` in the same space. The input's own affine and shape are kept so that
scores can be written back in the input's grid (MOOD's contract).
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np

from data_plane.config import DataConfig

ARRAYS = {"image": "0", "mask": "labels/mask/0"}  # the volume's arrays, by role, inside its group


def volume_array(store, volume_id: str, name: str = "image"):
    """One of a stored volume's arrays: ``image``, ``mask`` or ``scores/<run>``, opened read-only."""
    import zarr

    from data_plane.store import store_path

    path = ARRAYS.get(name, f"{name}/0")
    return zarr.open_array(str(store_path(store) / "volumes" / volume_id / path), mode="r")


def check_dicom_series(folder: Path) -> None:
    """Refuse a DICOM folder that is not one whole, evenly spaced series: MONAI reads what it can and only
    warns, so a truncated file would silently drop a slice and change the z spacing. Checks every file's
    pixel data, one series, one size and orientation, consecutive instance numbers and even slice spacing;
    the error names the files."""
    import pydicom

    from data_plane.sources import IngestError

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".dcm")
    problems, slices = [], []
    for path in files:
        try:
            ds = pydicom.dcmread(path)
            expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * \
                int(ds.BitsAllocated) // 8 * int(ds.get("NumberOfFrames", 1) or 1)
            compressed = ds.file_meta.TransferSyntaxUID.is_compressed
            if "PixelData" not in ds or (not compressed and len(ds.PixelData) < expected):
                raise ValueError(f"{len(ds.get('PixelData', b''))} of {expected} pixel bytes")
            orientation = np.asarray(ds.ImageOrientationPatient, float)
            position = np.asarray(ds.ImagePositionPatient, float)
        except Exception as exc:  # pydicom raises many kinds on a cut or corrupt file
            problems.append(f"'{path.name}' is truncated or corrupt ({type(exc).__name__}: {exc})")
            continue
        slices.append({"file": path.name, "series": ds.get("SeriesInstanceUID"), "size": (ds.Rows, ds.Columns),
                       "orientation": orientation, "position": position, "instance": ds.get("InstanceNumber")})
    if problems:
        raise IngestError(f"DICOM series '{folder.name}': " + "; ".join(problems[:5])
                          + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
                          + ": replace the file(s) or remove them and their slices knowingly")
    if not slices:
        raise IngestError(f"DICOM series '{folder.name}' holds no readable .dcm file")

    def differing(key, what, same):
        first = slices[0][key]
        odd = [s["file"] for s in slices if not same(s[key], first)]
        if odd:
            raise IngestError(f"DICOM series '{folder.name}' mixes {what}: {', '.join(odd[:5])} differ from "
                              f"'{slices[0]['file']}' ({first}); keep one whole series per folder")

    differing("series", "series (SeriesInstanceUID)", lambda a, b: a == b)
    differing("size", "image sizes", lambda a, b: a == b)
    differing("orientation", "orientations", lambda a, b: np.allclose(a, b, atol=1e-4))
    instances = sorted(int(s["instance"]) for s in slices if s["instance"] is not None)
    if len(instances) == len(slices):
        missing = sorted(set(range(instances[0], instances[-1] + 1)) - set(instances))
        if missing:
            raise IngestError(f"DICOM series '{folder.name}' misses instance number(s) {missing[:10]} of "
                              f"{instances[0]}–{instances[-1]}: a slice file is missing")
    normal = np.cross(slices[0]["orientation"][:3], slices[0]["orientation"][3:])
    ordered = sorted(slices, key=lambda s: float(s["position"] @ normal))
    gaps = np.diff([float(s["position"] @ normal) for s in ordered])
    if len(gaps) and (np.abs(gaps - np.median(gaps)) > max(1e-3, 0.01 * abs(np.median(gaps)))).any():
        at = int(np.argmax(np.abs(gaps - np.median(gaps))))
        raise IngestError(f"DICOM series '{folder.name}' is not evenly spaced: {gaps[at]:.3g} mm between "
                          f"'{ordered[at]['file']}' and '{ordered[at + 1]['file']}' against {np.median(gaps):.3g} mm "
                          f"elsewhere (a missing or duplicated slice?)")


def _count_nonfinite(voxels: np.ndarray, name: str, policy: str) -> int:
    """NaN/inf voxels would turn the percentile clip, hence the whole stored volume, into NaN: raise under
    policy 'error', else return how many there are (the caller zeroes them)."""
    from data_plane.sources import IngestError

    bad = ~np.isfinite(voxels)
    count = int(bad.sum())
    if count and policy == "error":
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise IngestError(f"volume '{name}' has {count} non-finite voxel(s) (NaN or inf), the first at voxel "
                          f"{first} (i, j, k of the file): fix the file, or set data.volumes.nonfinite: zero "
                          f"to store them as 0")
    return count


def _load(path: Path, what: str, nonfinite: str = "error"):
    """A (1, i, j, k) MetaTensor in RAS via MONAI, with the count of non-finite voxels set to 0 (policy
    ``nonfinite``); errors say what was wrong with which file."""
    from monai.transforms import LoadImage, Orientation

    from data_plane.sources import IngestError

    if not path.exists():
        raise IngestError(f"{what} '{path}' does not exist")
    if path.is_dir():
        check_dicom_series(path)
    reader = "PydicomReader" if path.is_dir() else "NibabelReader"
    # MONAI announces, at every load, that the optional GPU DICOM decoder (nvImageCodec) is absent and
    # that it falls back to pydicom's decoders: the normal case, not something a user should act on
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*nvImageCodec.*", category=UserWarning)
            image = LoadImage(image_only=True, ensure_channel_first=False, reader=reader)(str(path))
    except Exception as exc:
        hint = "corrupt or truncated gzip?" if path.name.endswith(".gz") else "corrupt or not a volume?"
        raise IngestError(f"{what} '{path.name}' could not be read ({hint}): {type(exc).__name__}: {exc}") from exc
    shape = tuple(image.shape)
    if len(shape) == 4 and shape[-1] == 1:
        image = image[..., 0]
    if image.ndim != 3:
        raise IngestError(f"{what} '{path.name}' has shape {shape}: a 3D volume was expected "
                          f"({'4D series' if image.ndim == 4 else f'{image.ndim}D image'}); split it first")
    original_affine = np.asarray(image.affine, np.float64)
    nonfinite_count = _count_nonfinite(np.asarray(image), path.name, nonfinite)
    if nonfinite_count:
        import torch

        image = torch.nan_to_num(image, nan=0.0, posinf=0.0, neginf=0.0)  # a MetaTensor: the affine stays
    image = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(image[None])
    return image, original_affine, shape, nonfinite_count


def _normalise(voxels: np.ndarray, config) -> tuple[np.ndarray, dict]:
    values = voxels[voxels != 0] if config.nonzero_only and (voxels != 0).any() else voxels.ravel()
    low, high = np.percentile(values, config.percentiles)
    scale = float(high - low) if high > low else 1.0
    out = ((np.clip(voxels, low, high) - low) / scale).astype(np.float32)
    if config.nonzero_only:
        out[voxels == 0] = 0.0  # background stays exactly 0
    return out, {"clip_low": float(low), "clip_high": float(high), "percentiles": list(config.percentiles)}


def ingest_volume(source, store: str, config: DataConfig, progress=None) -> dict:
    """Ingest one volume (and its mask); returns its manifest entry. Raises IngestError on failure."""
    import shutil

    import zarr
    from monai.transforms import Spacing
    from zarr.codecs import BloscCodec, BloscShuffle

    from data_plane.sources import IngestError, sha256_of
    from data_plane.ngff import LABEL_COLOURS, NGFF_VERSION, multiscales, volume_axes, volume_ome, volume_transform
    from data_plane.store import atomic_write_parquet, ensure_group, own

    started = time.time()
    root = Path(store)
    image, original_affine, original_shape, nonfinite = _load(source.path, "volume", config.volumes.nonfinite)
    stat_size = sum(p.stat().st_size for p in source.path.iterdir()) if source.path.is_dir() else source.path.stat().st_size
    mask = None
    if source.annotation is not None:
        mask, _, mask_shape, _ = _load(source.annotation, "mask", "zero")
        if mask_shape[:3] != original_shape[:3]:
            raise IngestError(f"mask '{source.annotation.name}' has shape {mask_shape[:3]} but volume "
                              f"'{source.path.name}' has {original_shape[:3]}: they must share one voxel grid")
    spacing = config.volumes.spacing
    if spacing is not None:
        image = Spacing(pixdim=spacing, mode="bilinear")(image)
        if mask is not None:
            mask = Spacing(pixdim=spacing, mode="nearest")(mask)
    affine = np.asarray(image.affine, np.float64)
    voxels = np.asarray(image[0], np.float32).transpose(2, 1, 0)  # (i, j, k) -> (z, y, x)
    normalised, record = _normalise(voxels, config.volumes)

    partial = own(root, "partial", source.item_id)
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(str(partial), mode="w")
    chunk = config.volumes.chunk
    compressor = BloscCodec(cname="zstd", clevel=config.ingest.compression_level, shuffle=BloscShuffle.shuffle)
    chunks = tuple(min(chunk, s) for s in normalised.shape)
    group.create_array("0", data=normalised, chunks=chunks, compressors=compressor,
                       dimension_names=["z", "y", "x"])
    if mask is not None:
        label = group.create_group("labels").create_group("mask")
        label.create_array("0", data=(np.asarray(mask[0]).transpose(2, 1, 0) > 0.5).astype(np.uint8),
                           chunks=chunks, compressors=compressor, dimension_names=["z", "y", "x"])
        step, offset = volume_transform(affine)
        label.attrs["ome"] = {"version": NGFF_VERSION,
                              "multiscales": [multiscales("mask", volume_axes(), [step], [offset])],
                              "image-label": {"version": NGFF_VERSION, "source": {"image": "../../"},
                                              "colors": [{"label-value": 1, "rgba": LABEL_COLOURS["mask"]}]}}
        group["labels"].attrs["ome"] = {"version": NGFF_VERSION, "labels": ["mask"]}
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))  # voxel size along i, j, k in mm
    sha256 = sha256_of(source.path) if source.path.is_file() else None
    group.attrs["ome"] = volume_ome(source.item_id, affine)
    group.attrs["tessera"] = {
        "source": str(source.path), "sha256": sha256, "kind": "volume", "label": source.label,
        "split": source.split, "group": source.group, "orientation": "RAS", "axes": "zyx",
        "affine": affine.tolist(), "spacing_xyz": zooms.tolist(), "shape_zyx": list(normalised.shape),
        "original_affine": original_affine.tolist(), "original_shape": list(original_shape[:3]),
        "normalisation": record, "has_mask": mask is not None, "nonfinite_voxels_zeroed": nonfinite,
        # Non-zero fraction of every slice along z, y and x: slice streams skip empty ones without reading.
        "slice_foreground": [np.round((normalised > 0).mean(axis=axes), 4).tolist()
                             for axes in ((1, 2), (0, 2), (0, 1))],
    }
    final = root / "volumes" / source.item_id
    final.parent.mkdir(exist_ok=True)
    ensure_group(final.parent)
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    import pyarrow as pa

    row = pa.table({"volume_id": [source.item_id], "shape_z": [normalised.shape[0]],
                    "shape_y": [normalised.shape[1]], "shape_x": [normalised.shape[2]],
                    "label": [source.label], "split": [source.split], "group": [source.group],
                    "has_mask": [mask is not None],
                    # voxel size in mm, so spacing can be checked across a store without opening volumes
                    "spacing_z": [float(zooms[2])], "spacing_y": [float(zooms[1])], "spacing_x": [float(zooms[0])]})
    own(root, "volume_index").mkdir(exist_ok=True)
    atomic_write_parquet(row, own(root, "volume_index", f"{source.item_id}.parquet"))
    if progress:
        progress(source.item_id, 1, 1)
    return {"status": "done", "kind": "volume", "source": str(source.path), "size": stat_size,
            "mtime_ns": source.path.stat().st_mtime_ns, "sha256": sha256, "shape_zyx": list(normalised.shape),
            "seconds": round(time.time() - started, 2)}


def write_volume_scores(store, volume_id: str, run: str, scores_zyx: np.ndarray, sample_score: float,
                        out_dir: str | Path | None = None) -> dict:
    """Store a voxel score volume (in the store's grid) and, with ``out_dir``, MOOD's outputs.

    ``out_dir/pixel/<case>.nii.gz`` holds the scores resampled to the input's own shape and affine;
    ``out_dir/sample/<case>.txt`` holds the sample score.
    """
    import nibabel
    import zarr
    from nibabel.processing import resample_from_to

    from data_plane.ngff import float_image_ome, volume_axes, volume_transform
    from data_plane.store import store_path

    group = zarr.open_group(str(store_path(store) / "volumes" / volume_id), mode="a")
    info = group.attrs["tessera"]
    scores_zyx = np.asarray(scores_zyx, np.float32)
    if list(scores_zyx.shape) != info["shape_zyx"]:
        raise ValueError(f"scores of shape {scores_zyx.shape} do not match volume '{volume_id}' "
                         f"({tuple(info['shape_zyx'])})")
    image = group.require_group("scores").create_group(run, overwrite=True)
    array = image.create_array("0", shape=scores_zyx.shape, dtype="float32", chunks=group["0"].chunks,
                               dimension_names=["z", "y", "x"])
    array[:] = scores_zyx
    step, offset = volume_transform(np.asarray(info["affine"]))
    image.attrs.update({"ome": float_image_ome(f"{volume_id} {run}", volume_axes(), step, offset),
                        "tessera": {"sample_score": float(sample_score), "run": run, "kind": "scores"}})
    written = {"zarr": f"volumes/{volume_id}/scores/{run}"}
    if out_dir is not None:
        out_dir = Path(out_dir)
        (out_dir / "pixel").mkdir(parents=True, exist_ok=True)
        (out_dir / "sample").mkdir(parents=True, exist_ok=True)
        ras = nibabel.Nifti1Image(scores_zyx.transpose(2, 1, 0), np.asarray(info["affine"]))
        target = (tuple(info["original_shape"]), np.asarray(info["original_affine"]))
        back = resample_from_to(ras, target, order=1)
        case = Path(info["source"]).name
        case = case if case.endswith((".nii.gz", ".nii")) else case + ".nii.gz"
        nifti = nibabel.Nifti1Image(np.asarray(back.dataobj, np.float32), target[1])
        nifti.to_filename(str(out_dir / "pixel" / case))
        (out_dir / "sample" / f"{case}.txt").write_text(f"{float(sample_score):.6f}\n")
        written.update({"nifti": str(out_dir / "pixel" / case), "txt": str(out_dir / "sample" / f"{case}.txt")})
    return written


def volume_index(store):
    """The store's volume index (one row per volume) as a pandas DataFrame."""
    import pandas as pd

    from data_plane.store import check_store, own

    path = own(check_store(store), "volumes.parquet")
    if not path.is_file():
        raise FileNotFoundError(f"store '{store}' has no volumes.parquet: ingest volumes into it first")
    return pd.read_parquet(path)

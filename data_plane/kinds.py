"""What a run reads, decided in one place from ``train.data``: tiles of slides, or slices (and slice
pairs) of volumes. Training, evaluation, tune's folds and `tessera features stats` all ask here."""

from __future__ import annotations

VOLUME_KINDS = ("slices", "slice_pairs")


def reads_volumes(train_data: str) -> bool:
    """True when the run trains on volumes (its items are volumes), False for tiles of slides."""
    return train_data in VOLUME_KINDS


def training_stream(data, train_data: str, rank: int = 0, world_size: int = 1):
    """The unbatched training stream ``train.data`` names over ``data`` (a DataConfig)."""
    if train_data == "slice_pairs":
        from data_plane.volume_stream import PairedSliceStream

        return PairedSliceStream(data.store, data.volume_stream, rank=rank, world_size=world_size)
    if train_data == "slices":
        from data_plane.volume_stream import SliceStream

        return SliceStream(data.store, data.volume_stream, rank=rank, world_size=world_size)
    if train_data != "tiles":
        raise ValueError(f"train.data '{train_data}': tessera reads 'tiles', 'slices' or 'slice_pairs'")
    from data_plane.stream import TileStream

    return TileStream(data.store, data.stream, stain=data.stain, rank=rank, world_size=world_size)

"""Sidecar teacher shards: per-frame 3D teacher outputs stored next to the data shards.

A teacher cache directory mirrors a data directory: for every data shard
`<dataset>-<split>-NNNNNN.tar` it holds a shard of the same name whose samples have the same keys,
each with three per-frame arrays of the whole video:

- `<key>.teacher_pointmap.npy`: (T, h, w, 3) float16 world points (the video's first camera);
- `<key>.teacher_confidence.npy`: (T, h, w) float16 confidence (saturated at float16's maximum);
- `<key>.teacher_camera_to_world.npy`: (T, 4, 4) float32 camera-to-world poses.

(h, w) is the stored resolution: the full frame (not a crop) at the video's aspect ratio, so any
crop of the frames maps onto it geometrically. Beside each sidecar shard, `<shard>.json` records
the data shard it was made from (size and a hash of its first and last MiB) and its videos; it is
written after the shard, so a shard without it is unfinished. `teacher-cache.json` records the
settings that made the whole cache (teacher checkpoint, preset, resolutions, ...).

Writing streams frame by frame through temporary files (constant memory, whatever the video's
length); a shard appears under its final name only when complete (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from post3r_data.shards import member_file, write_json_atomic
from post3r_io import fsync_directory

CACHE_INFO = "teacher-cache.json"
FORMAT_VERSION = 1
# field -> (stored dtype, per-frame shape after (h, w); None: no pixel axes)
TEACHER_FIELDS: dict[str, tuple[np.dtype, tuple[int, ...] | None]] = {
    "teacher_pointmap": (np.dtype("<f2"), (3,)),
    "teacher_confidence": (np.dtype("<f2"), ()),
    "teacher_camera_to_world": (np.dtype("<f4"), None),
}
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_FINGERPRINT_BYTES = 1 << 20


@dataclass(frozen=True)
class TeacherCacheSpec:
    """How a loader delivers cached teacher maps: the cache `directory` and the (height, width)
    every clip's maps are resampled to (nearest, after the clip's crop)."""

    directory: Path
    resolution: tuple[int, int]


def sidecar_path(cache_dir: str | os.PathLike, data_shard: str | os.PathLike) -> Path:
    """The sidecar shard of a data shard: the same file name inside `cache_dir`."""
    return Path(cache_dir) / Path(data_shard).name


def record_path(sidecar: str | os.PathLike) -> Path:
    """`<sidecar>.json`, the record that marks a sidecar shard finished."""
    sidecar = Path(sidecar)
    return sidecar.with_name(sidecar.name + ".json")


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Identity of a (possibly large) file without reading it all: its size and the SHA-256 of
    its first and last MiB."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        digest.update(file.read(_FINGERPRINT_BYTES))
        if size > _FINGERPRINT_BYTES:
            file.seek(max(_FINGERPRINT_BYTES, size - _FINGERPRINT_BYTES))
            digest.update(file.read())
    return {"size": size, "sha256_head_tail": digest.hexdigest()}


def stored_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(h, w) with the frame's aspect ratio and `short_side` pixels on the short side."""
    if height <= width:
        return short_side, max(1, round(width * short_side / height))
    return max(1, round(height * short_side / width)), short_side


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    stream = _Bytes()
    np.lib.format.write_array_header_1_0(stream, header)
    return stream.data


class _Bytes:
    """A minimal writable sink for numpy's header writer."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


class _VideoSpool:
    """One video's three arrays, appended frame by frame to temporary `.npy` files."""

    def __init__(self, directory: Path, num_frames: int, size: tuple[int, int]) -> None:
        self.num_frames, self.size, self.written = num_frames, size, 0
        self.files: dict[str, BinaryIO] = {}
        for name, (dtype, tail) in TEACHER_FIELDS.items():
            shape = (num_frames, 4, 4) if tail is None else (num_frames, *size, *tail)
            file = tempfile.TemporaryFile(dir=directory, prefix=".spool-")  # noqa: SIM115
            file.write(_npy_header(shape, dtype))
            self.files[name] = file

    def add(
        self, pointmap: np.ndarray, confidence: np.ndarray, camera_to_world: np.ndarray
    ) -> None:
        if self.written >= self.num_frames:
            raise ValueError(f"the video was declared with {self.num_frames} frames; got more")
        h, w = self.size
        arrays = {
            "teacher_pointmap": (pointmap, (h, w, 3)),
            "teacher_confidence": (np.clip(confidence, -_FLOAT16_MAX, _FLOAT16_MAX), (h, w)),
            "teacher_camera_to_world": (camera_to_world, (4, 4)),
        }
        for name, (array, shape) in arrays.items():
            if tuple(array.shape) != shape:
                raise ValueError(f"{name} of a frame must be {shape}, got {tuple(array.shape)}")
            dtype = TEACHER_FIELDS[name][0]
            self.files[name].write(np.ascontiguousarray(array, dtype=dtype).tobytes())
        self.written += 1

    def close(self) -> None:
        for file in self.files.values():
            file.close()


class SidecarShardWriter:
    """Writes one sidecar shard atomically; videos go in one at a time, frame by frame.

        with SidecarShardWriter(path) as shard:
            video = shard.begin_video(key, num_frames, (h, w))
            for ...: video.add(pointmap, confidence, camera_to_world)
            shard.end_video()

    The shard is written to `<path>.tmp`, fsync'ed, renamed into place and its folder fsync'ed
    on a clean exit; on an exception, or with a video left unfinished, nothing is left at
    `path`. The temporary name is fixed (not post3r_io's unique one) so that a build killed
    mid-shard leaves a file its resumed build overwrites, not an orphan. Tar headers carry fixed
    times and owners, so the same outputs give the same bytes.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._file = open(self.tmp, "wb")  # noqa: SIM115 -- closed in __exit__
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self._video: _VideoSpool | None = None
        self._key = ""
        self.videos: list[tuple[str, int]] = []

    def __enter__(self) -> SidecarShardWriter:
        return self

    def begin_video(self, key: str, num_frames: int, size: tuple[int, int]) -> _VideoSpool:
        if self._video is not None:
            raise RuntimeError("end_video() the previous video first")
        if "." in key or not key:
            raise ValueError(f"sample key {key!r} must be non-empty and contain no dot")
        self._key, self._video = key, _VideoSpool(self.tmp.parent, num_frames, (size[0], size[1]))
        return self._video

    def end_video(self) -> None:
        video = self._video
        if video is None:
            raise RuntimeError("begin_video() first")
        if video.written != video.num_frames:
            raise ValueError(
                f"video {self._key!r}: {video.written} frames written, {video.num_frames} declared"
            )
        for name, file in video.files.items():
            info = tarfile.TarInfo(f"{self._key}.{name}.npy")
            info.size, info.mtime, info.mode = file.tell(), 0, 0o444
            info.uname = info.gname = "post3r"
            file.seek(0)
            self._tar.addfile(info, file)
        video.close()
        self.videos.append((self._key, video.num_frames))
        self._video = None

    def __exit__(self, kind, error, traceback) -> None:
        if self._video is not None:
            self._video.close()
        try:
            self._tar.close()
            if kind is None:
                self._file.flush()
                os.fsync(self._file.fileno())
        finally:
            self._file.close()
        if kind is None and self._video is None:
            os.replace(self.tmp, self.path)
            fsync_directory(self.path.parent)  # the rename itself survives a crash
        else:
            self.tmp.unlink(missing_ok=True)


def write_record(sidecar: str | os.PathLike, record: dict[str, Any]) -> None:
    """Mark a sidecar shard finished: its record, written atomically after the shard."""
    write_json_atomic(record_path(sidecar), record)


def read_record(sidecar: str | os.PathLike) -> dict[str, Any] | None:
    """The record of a finished sidecar shard, or None when there is none (unfinished)."""
    try:
        return json.loads(record_path(sidecar).read_text())
    except (OSError, ValueError):
        return None


def shard_keys(path: str | os.PathLike) -> list[str]:
    """The sample keys of a shard in order, from tar headers alone."""
    keys: list[str] = []
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            key = member.name.split("/")[-1].split(".", 1)[0]
            if member.isreg() and (not keys or keys[-1] != key):
                keys.append(key)
    return keys


def crop_indices(
    box: tuple[int, int, int, int],
    frame_hw: tuple[int, int],
    stored_hw: tuple[int, int],
    out_hw: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the stored maps that the nearest-neighbour resampling of the frame
    crop `box` = (top, left, height, width) to `out_hw` reads: each output pixel centre is
    mapped through frame pixels into the stored maps (which cover the whole frame)."""
    top, left, height, width = box
    indices = []
    for offset, extent, frame, stored, out in (
        (top, height, frame_hw[0], stored_hw[0], out_hw[0]),
        (left, width, frame_hw[1], stored_hw[1], out_hw[1]),
    ):
        centres = offset + (np.arange(out) + 0.5) * (extent / out)  # in frame pixels
        indices.append(np.clip((centres * (stored / frame)).astype(np.int64), 0, stored - 1))
    return indices[0], indices[1]


def read_sidecar(path: str | os.PathLike) -> Iterator[dict[str, np.ndarray]]:
    """Every video of a sidecar shard as whole arrays (for tests and inspection)."""
    from post3r_data.shards import decode_npy

    with tarfile.open(path, "r:") as tar:
        sample: dict[str, Any] = {}
        for member in tar:
            key, _, field = member.name.partition(".")
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            sample["__key__"] = key
            data = member_file(tar, member).read()
            sample[field.removesuffix(".npy")] = decode_npy(data)
        if sample:
            yield sample

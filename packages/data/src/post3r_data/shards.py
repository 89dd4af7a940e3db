"""Shard files: naming, discovery, atomic and parallel writing, safe `.npy` coding, summaries.

A dataset directory holds `<dataset>-<split>-NNNNNN.tar` files (SlotContrast's naming), each a
WebDataset tar whose samples are `<key>.video.npy`, `<key>.segmentations.npy`, ... plus an
optional small `<key>.meta.json`, and one `<dataset>-info.json` describing how it was made.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import tarfile
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple, TypeVar

import numpy as np
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from post3r_io import atomic_write, atomic_write_text

SPLITS = ("train", "validation")
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "training": "train"}
_CREATE_COMMANDS = {
    "ytvis": "uv run apps/prepare-ytvis --input <YouTube-VIS 2021 download> --output {dir}",
    "synthetic": "uv run apps/synth --output {dir} --videos 1000",
}
T = TypeVar("T")
# Tar member times are fixed so that the same content gives the same bytes.
_TAR_MTIME = 0.0


def interrupted_write_message(error: OSError) -> str:
    """One line for a shard writer stopped by the OS (read-only or full output): what failed and
    that a rerun finishes the job, since finished shards are atomic and kept."""
    where = f"{error.filename}: " if error.filename else ""
    what = error.strerror or str(error)
    return (
        f"{where}{what}; the shards finished so far are kept and a rerun with the same "
        "arguments writes only the missing ones (free space or fix the permissions first)"
    )


def canonical_split(split: str) -> str:
    """Map `val`/`valid` to `validation`; reject unknown split names."""
    split = _SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS} (or 'val')")
    return split


def shard_name(dataset: str, split: str, index: int) -> str:
    """`ytvis-train-000003.tar` for ("ytvis", "train", 3)."""
    return f"{dataset}-{canonical_split(split)}-{index:06d}.tar"


def _create_hint(dataset: str, data_dir: Path) -> str:
    command = _CREATE_COMMANDS.get(dataset)
    if command is None:
        return f"write shards named {shard_name(dataset, 'train', 0)} (and so on) into {data_dir}"
    return f"create them with `{command.format(dir=data_dir)}`"


def find_shards(data_dir: str | os.PathLike, dataset: str, split: str) -> list[str]:
    """Sorted paths of `<data_dir>/<dataset>-<split>-NNNNNN.tar`.

    Raises FileNotFoundError naming the directory and the command that creates the shards when
    the directory or the shards are missing. Unfinished shards (hidden `.*.tmp`) are never listed.
    """
    data_dir = Path(data_dir).expanduser()
    split = canonical_split(split)
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"data directory {data_dir} does not exist; {_create_hint(dataset, data_dir)}"
        )
    pattern = re.compile(rf"^{re.escape(dataset)}-{split}-\d{{6}}\.tar$")
    shards = sorted(str(p) for p in data_dir.iterdir() if pattern.match(p.name))
    if not shards:
        raise FileNotFoundError(
            f"no {dataset}-{split}-NNNNNN.tar shards in {data_dir}; "
            f"{_create_hint(dataset, data_dir)}"
        )
    return shards


def encode_npy(array: np.ndarray) -> bytes:
    """`.npy` bytes of an array (never pickled)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _npy_header(stream: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from a stream at the start of `.npy` data; object
    (pickled) arrays are refused."""
    version = np.lib.format.read_magic(stream)
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise ValueError(f"unsupported .npy format version {version}")
    length_size = 2 if version == (1, 0) else 4
    length_bytes = stream.read(length_size)
    header = stream.read(int.from_bytes(length_bytes, "little")) if length_bytes else b""
    shape, fortran_order, dtype = _parsed_header(version, length_bytes + header)
    if dtype.hasobject:
        raise ValueError("refusing to load an object (pickled) .npy array")
    return shape, fortran_order, dtype


@functools.lru_cache(maxsize=256)
def _parsed_header(version: tuple[int, int], raw: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """numpy's own parsing of a header (its length field and text), once per distinct header:
    it evaluates the text with `ast.literal_eval` (about 0.3 ms), which made header parsing most
    of a training step's data loading, and a dataset's samples share a few headers."""
    stream = io.BytesIO(raw)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    return np.lib.format.read_array_header_2_0(stream)


def _check_payload(available: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if available < int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f".npy payload is truncated: {available} bytes for shape {shape} {dtype}")


def decode_npy(data: bytes) -> np.ndarray:
    """Read-only view of `.npy` bytes without copying the payload; object arrays are refused.

    A view lets a loader copy only the frames it needs out of a whole video.
    """
    stream = io.BytesIO(data)
    shape, fortran_order, dtype = _npy_header(stream)
    offset = stream.tell()
    _check_payload(len(data) - offset, shape, dtype)
    array = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=offset)
    return array.reshape(shape, order="F" if fortran_order else "C")


class TarMember(NamedTuple):
    """Where a member's bytes lie in an open local shard."""

    fd: int
    offset: int
    size: int


class NpyMember:
    """A `.npy` tar member read lazily: its header at once, and then only the leading-axis
    range that is indexed (`member[a:b]`), e.g. four frames of a whole video. A
    Fortran-ordered array, whose frames are not contiguous, is read whole.

    Reads use `os.pread`, so they do not disturb the tar reader's file position.
    """

    def __init__(self, member: TarMember) -> None:
        stream = io.BytesIO(os.pread(member.fd, min(member.size, 65536), member.offset))
        self.shape, self._fortran, self.dtype = _npy_header(stream)
        self._fd, self._start = member.fd, member.offset + stream.tell()
        _check_payload(member.size - stream.tell(), self.shape, self.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _read(self, offset: int, size: int) -> np.ndarray:
        data = os.pread(self._fd, size, self._start + offset)
        if len(data) != size:
            raise ValueError(".npy payload is truncated (the shard file ends early)")
        return np.frombuffer(data, self.dtype)

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("NpyMember supports contiguous leading-axis slices only")
        row = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        if self._fortran:
            whole = self._read(0, self.shape[0] * row)
            return whole.reshape(self.shape, order="F")[index]
        start, stop, _ = index.indices(self.shape[0])
        count = max(0, stop - start)
        return self._read(start * row, count * row).reshape(count, *self.shape[1:])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self[:]
        return array if dtype is None else array.astype(dtype)


def member_file(tar: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    """The contents of a regular file in a tar, with an error naming it otherwise."""
    file = tar.extractfile(member)
    if file is None:
        raise ValueError(f"{member.name} in {tar.name!r} is not a regular file")
    return file


def read_local_shard(
    path: str, wanted: Callable[[str], bool]
) -> Generator[dict[str, Any], None, None]:
    """Samples of a local tar shard, grouped like webdataset's, but seeking instead of streaming.

    Fields that `wanted` rejects are skipped without being read. `.npy` fields come as
    `TarMember`s (valid until the next sample is requested; open them with `NpyMember`), others
    as bytes.
    """
    with open(path, "rb") as file, tarfile.open(fileobj=file, mode="r:") as tar:
        sample: dict[str, Any] | None = None
        for member in tar:
            key, field = base_plus_ext(member.name)
            if not member.isreg() or key is None:
                continue
            if sample is None or key != sample["__key__"]:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": path}
            field = field.lower()
            if not wanted(field):
                continue
            if field.endswith(".npy"):
                sample[field] = TarMember(file.fileno(), member.offset_data, member.size)
            else:
                sample[field] = member_file(tar, member).read()
        if sample is not None:
            yield sample


def write_shard(path: str | os.PathLike, samples: Iterable[Mapping[str, Any]]) -> int:
    """Write samples to one tar atomically (post3r_io's rule: temporary file, fsync, rename);
    return its size.

    Each sample maps `__key__` to a key without dots and field names (`video.npy`, ...) to
    bytes. If the iterable raises, the temporary file is removed and nothing is left at `path`.
    """
    path = Path(path)

    def write(stream: Any) -> None:
        writer = wds.TarWriter(stream, encoder=False, mtime=_TAR_MTIME)
        try:
            for sample in samples:
                if "." in sample["__key__"]:
                    raise ValueError(f"sample key {sample['__key__']!r} must not contain a dot")
                writer.write(dict(sample))
        finally:
            writer.close()

    atomic_write(path, write)
    return path.stat().st_size


def write_json_atomic(path: str | os.PathLike, content: Any) -> None:
    """Write JSON atomically (post3r_io's rule)."""
    atomic_write_text(path, json.dumps(content, indent=2, sort_keys=True) + "\n")


def ordered_map(function: Callable, items: Iterable, workers: int) -> Iterator:
    """map() over `workers` processes (in this process if <= 1), in order, with a bounded
    number of items in flight."""
    if workers <= 1:
        yield from map(function, items)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def plan_shards(
    out_dir: Path, dataset: str, split: str, items: Sequence[T], per_shard: int
) -> list[tuple[Path, Sequence[T]]]:
    """(path, items) of every shard of a split: shard k always holds items [k n, (k + 1) n),
    so an interrupted writer can keep the shards it finished."""
    return [
        (out_dir / shard_name(dataset, split, shard), items[first : first + per_shard])
        for shard, first in enumerate(range(0, len(items), per_shard))
    ]


def prepare_output_dir(out_dir: Path, dataset: str, settings: dict, overwrite: bool) -> dict:
    """Make `out_dir` ready for `<dataset>` shards written with `settings`; return the
    previous `<dataset>-info.json` content (empty if none or after `overwrite`).

    Existing shards made with other settings are refused (they would mix with new ones)
    unless `overwrite`, which deletes them first. The info file is marked incomplete until the
    writer finishes.
    """
    info_path = out_dir / f"{dataset}-info.json"
    existing = sorted(out_dir.glob(f"{dataset}-*.tar")) if out_dir.exists() else []
    try:
        previous = json.loads(info_path.read_text()) if info_path.exists() else {}
    except ValueError as error:
        if existing and not overwrite:
            raise ValueError(
                f"{info_path} is unreadable ({error}), so the shards beside it cannot be "
                "checked against these settings; use another output directory or overwrite "
                "them (--overwrite)"
            ) from None
        previous = {}
    if overwrite:
        for path in existing:
            path.unlink()
        info_path.unlink(missing_ok=True)
        previous = {}
    elif existing and previous.get("settings") != settings:
        raise ValueError(
            f"{out_dir} already holds {dataset} shards made with other settings "
            f"({previous.get('settings')} instead of {settings}); use another output "
            "directory or overwrite them (--overwrite)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {**previous, "dataset": dataset, "settings": settings, "complete": False}
    write_json_atomic(info_path, info)
    return previous


@dataclass
class ShardSummary:
    """Totals over shards: videos, frames, annotated objects (from meta.json) and bytes."""

    shards: int = 0
    videos: int = 0
    frames: int = 0
    objects: int = 0
    bytes: int = 0

    def __add__(self, other: ShardSummary) -> ShardSummary:
        return ShardSummary(**{k: v + getattr(other, k) for k, v in asdict(self).items()})

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def describe(self) -> str:
        """'3 videos, 24 frames, 9 objects, 1 shards, 4.2 MB' for a command's summary."""
        size = f"{self.bytes / 1e9:.2f} GB" if self.bytes >= 1e9 else f"{self.bytes / 1e6:.1f} MB"
        return (
            f"{self.videos} videos, {self.frames} frames, {self.objects} objects, "
            f"{self.shards} shards, {size}"
        )


def summarize_shards(paths: Iterable[str | os.PathLike]) -> ShardSummary:
    """Count videos, frames and objects by reading only tar headers, npy headers and meta.json.

    Objects are counted from `meta.json` (`num_objects`), which our writers add; shards without
    it (SlotContrast's) count 0 objects.
    """
    total = ShardSummary()
    for path in paths:
        total.shards += 1
        total.bytes += os.path.getsize(path)
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.name.endswith(".video.npy"):
                    total.videos += 1
                    total.frames += _npy_header(member_file(tar, member))[0][0]
                elif member.name.endswith(".meta.json"):
                    meta = json.load(member_file(tar, member))
                    total.objects += int(meta.get("num_objects", 0))
    return total

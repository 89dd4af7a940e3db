"""Streaming loaders over WebDataset shards, the same for YouTube-VIS and synthetic video.

Training (`make_train_loader`): every DataLoader worker of every rank reads its own endless
stream of shards drawn with replacement (`resampled`) from its share of the shard list, cuts
random clips, shuffles them in a buffer and batches them. An epoch is `steps_per_epoch`
batches per rank. Everything random is seeded from (seed, epoch, rank, worker), so the stream
is reproducible, and `start_step` resumes it exactly (see `make_train_loader`).

Validation (`make_val_loader`): shards are split by rank and then by worker, read once in order
without resampling; every video is seen exactly once over all ranks. Ranks may get different
numbers of videos, or none.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from post3r_data.clips import (
    OPTIONAL_FIELDS,
    central_clips,
    collate,
    decode_video,
    finish_clip,
    random_clip,
)
from post3r_data.errors import CorruptSampleError, CorruptShardError
from post3r_data.shards import read_local_shard
from post3r_data.teacher_cache import TEACHER_FIELDS, TeacherCacheSpec, sidecar_path

OnError = Literal["warn", "raise"]
# A worker that goes this many samples in a row without producing a clip gives up.
_MAX_CONSECUTIVE_FAILURES = 200


def _expand(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(shards, (str, os.PathLike)):
        urls = wds.shardlists.expand_urls(str(shards))
    else:
        urls = [str(s) for s in shards]
    if not urls:
        raise ValueError("no shards given; use find_shards(data_dir, dataset, split) to list them")
    for url in urls:
        if url.startswith("pipe:"):
            raise ValueError(f"refusing shell-command shard URL {url!r}; pass file paths")
        if os.path.isdir(url):
            raise ValueError(
                f"{url} is a directory; pass its shards: find_shards({url!r}, dataset, split)"
            )
    return urls


def _resolution(resolution: int | Sequence[int]) -> tuple[int, int]:
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"resolution must be an int or (height, width), got {resolution!r}")
    return int(size[0]), int(size[1])


def _frames_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype != torch.uint8 and not dtype.is_floating_point:
        raise ValueError(f"frames_dtype must be torch.uint8 or a floating dtype, got {dtype}")
    return dtype


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else the initialised process group, else RANK/WORLD_SIZE, else (0, 1)."""
    if rank is None or world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank = int(os.environ.get("RANK", 0))
            world_size = int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def consumer_share(shards: list[str], consumer: int, consumers: int) -> tuple[list[str], bool]:
    """The shards one of `consumers` readers reads and whether it must also split by sample.

    With at least as many shards as readers, reader c takes shards c, c + n, ... (disjoint, and
    together all). With fewer, every reader reads every shard and keeps samples c, c + n, ...
    """
    if len(shards) >= consumers:
        return shards[consumer::consumers], False
    return shards, True


def probe_fields(shard: str) -> tuple[str, ...]:
    """Optional fields present in the first sample of a shard."""
    try:
        sample = next(read_samples(iter([{"url": shard}]), ErrorPolicy("raise"), fields=None))
    except StopIteration:
        raise ValueError(f"shard {shard} holds no samples") from None
    except Exception as error:
        raise ValueError(f"cannot read shard {shard}: {error}") from error
    if "video.npy" not in sample:
        raise ValueError(
            f"shard {shard} is not a video shard: its first sample has {sorted(sample)} "
            "but no video.npy"
        )
    return tuple(f for f in OPTIONAL_FIELDS if f"{f}.npy" in sample)


def _fields(shards: list[str], fields: Sequence[str] | None) -> tuple[str, ...]:
    if fields is None:
        return _probe_first_readable(shards)
    unknown = set(fields) - set(OPTIONAL_FIELDS)
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}; choose from {OPTIONAL_FIELDS}")
    return tuple(f for f in OPTIONAL_FIELDS if f in fields)


def _check_counts(**counts: object) -> None:
    """Each count must be an int >= 1; the error names the argument and its value."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")


def _probe_first_readable(shards: list[str]) -> tuple[str, ...]:
    """The fields of the first shard that can be read: a corrupt shard is skipped (and counted
    when the stream reaches it) wherever it sorts, first included."""
    errors = []
    for shard in shards:
        try:
            return probe_fields(shard)
        except ValueError as error:
            errors.append(str(error))
    raise ValueError(f"none of the {len(shards)} shards can be read; the first: {errors[0]}")


class ErrorPolicy:
    """Skip-and-count (with a warning) or raise, for unreadable shards and corrupt samples.

    The count lives in shared memory, so it covers all DataLoader workers of this process.
    """

    def __init__(self, on_error: OnError) -> None:
        if on_error not in ("warn", "raise"):
            raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
        self.on_error = on_error
        self._count = multiprocessing.Value("q", 0)
        self._consecutive = 0

    @property
    def skipped(self) -> int:
        return int(self._count.value)

    def handle(self, error: BaseException) -> bool:
        """Count and warn, or re-raise; also usable as a webdataset `handler`."""
        if self.on_error == "raise":
            raise error
        with self._count.get_lock():
            self._count.value += 1
        warnings.warn(f"skipping unreadable data: {error}", stacklevel=2)
        self.failed()
        return True

    def failed(self) -> None:
        """A sample gave no clip; give up if that keeps happening."""
        self._consecutive += 1
        if self._consecutive >= _MAX_CONSECUTIVE_FAILURES:
            raise RuntimeError(
                f"{self._consecutive} samples in a row gave no clip (corrupt, or shorter than "
                "chunk_size); check the shards and chunk_size"
            )

    def succeeded(self) -> None:
        self._consecutive = 0


@dataclass(frozen=True)
class _ClipSpec:
    """What every clip looks like."""

    resolution: tuple[int, int]
    chunk_size: int | None
    fields: tuple[str, ...]
    frames_dtype: torch.dtype
    teacher: TeacherCacheSpec | None = None


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("file:")


def read_samples(
    sources: Iterator[dict],
    errors: ErrorPolicy,
    fields: tuple[str, ...] | None,
    teacher_cache: os.PathLike | str | None = None,
) -> Iterator[dict]:
    """Raw samples of a stream of `{"url": ...}`, keeping `video` and `fields` (None: all).

    Local files are read by seeking (`read_local_shard`), so unwanted fields and the frames a
    clip does not take are never read; URLs stream through webdataset. With `teacher_cache`,
    each sample also gets the `teacher_*` arrays of its sidecar shard (same key, read in step).
    """
    names = None if fields is None else {f"{name}.npy" for name in ("video", *fields)}

    def wanted(field: str) -> bool:
        return names is None or field in names

    def wanted_file(fname: str) -> bool:
        return wanted(fname.rsplit("/", 1)[-1].split(".", 1)[-1])

    for source in sources:
        url = source["url"]
        if not _is_local(url):
            if teacher_cache is not None:
                raise ValueError(f"a teacher cache needs local shards, got the URL {url}")
            stream = wds.tarfile_to_samples(handler=errors.handle, select_files=wanted_file)
            yield from stream([source])
            continue
        try:
            if teacher_cache is None:
                yield from read_local_shard(url, wanted)
            else:
                yield from _with_teacher(url, wanted, sidecar_path(teacher_cache, url))
        except Exception as error:  # unreadable or truncated shard: skip the rest of it
            errors.handle(CorruptShardError(f"shard {url}: {error}"))


def _with_teacher(url: str, wanted: Callable[[str], bool], sidecar: os.PathLike) -> Iterator[dict]:
    """A data shard's samples with its sidecar shard's arrays merged in; both are read in step
    (the cache writes a shard's videos in the data shard's order)."""
    names = {f"{name}.npy" for name in TEACHER_FIELDS}
    cached = read_local_shard(str(sidecar), names.__contains__)
    for sample in read_local_shard(url, wanted):
        entry = next(cached, None)
        if entry is None or entry["__key__"] != sample["__key__"]:
            found = "nothing" if entry is None else f"video {entry['__key__']!r}"
            raise CorruptSampleError(
                f"video {sample['__key__']!r} of {url} has no teacher cache entry ({sidecar} "
                f"has {found} in its place); rebuild the cache with `uv run apps/cache-teacher`"
            )
        yield {**sample, **{k: v for k, v in entry.items() if not k.startswith("__")}}


def _clips(
    samples: Iterator[dict],
    make: Callable,
    spec: _ClipSpec,
    errors: ErrorPolicy,
) -> Iterator:
    """Decode raw samples and cut clips with `make(video)`; failures go to the error policy."""
    for sample in samples:
        try:
            clips = make(decode_video(sample, spec.fields))
        except CorruptSampleError as error:
            errors.handle(error)
            continue
        except Exception as error:  # e.g. a read that ends early: name the sample
            key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
            errors.handle(CorruptSampleError(f"sample {key!r} in {url}: {error}"))
            continue
        if not clips:
            errors.failed()
            continue
        errors.succeeded()
        yield from clips


def _collate_clips(clips: list, spec: _ClipSpec) -> dict:
    teacher_hw = None if spec.teacher is None else spec.teacher.resolution
    finished = [finish_clip(clip, spec.resolution, spec.frames_dtype, teacher_hw) for clip in clips]
    return collate(finished, frames_dtype=spec.frames_dtype)


def _batches(spec: _ClipSpec, batch_size: int, keep_partial: bool) -> Callable:
    """Pipeline stage: resize clips and stack them into batches of `batch_size`."""
    return wds.batched(
        batch_size, collation_fn=partial(_collate_clips, spec=spec), partial=keep_partial
    )


def _rng_seeds(*entropy: int) -> tuple[int, int, int]:
    """Three independent 64-bit seeds (shards, clips, shuffle) from the stream's identity."""
    shards, clips, shuffle = np.random.SeedSequence(list(entropy)).generate_state(3, np.uint64)
    return int(shards), int(clips), int(shuffle)


@dataclass
class _TrainStream(IterableDataset):
    """One rank's training batches; each DataLoader worker builds its own pipeline."""

    shards: list[str]
    spec: _ClipSpec
    errors: ErrorPolicy
    batch_size: int
    seed: int
    rank: int
    world_size: int
    shuffle_buffer: int
    crop_scale: tuple[float, float]
    clips_per_video: int
    epoch: int = 0
    skip_batches: int = 0  # batches of this epoch (over all workers) already consumed

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        # The DataLoader takes batch i from worker i % workers. When resuming after
        # `skip_batches`, physical worker 0 must deliver global batch `skip_batches`, so the
        # logical roles rotate.
        logical = (worker + self.skip_batches) % workers
        own_skipped = max(0, (self.skip_batches - logical + workers - 1) // workers)
        consumer, consumers = self.rank * workers + logical, self.world_size * workers
        shard_seed, clip_seed, shuffle_seed = _rng_seeds(self.seed, self.epoch, consumer, consumers)
        share, _ = consumer_share(self.shards, consumer, consumers)
        shard_rng, clip_rng = random.Random(shard_seed), np.random.default_rng(clip_seed)

        def urls() -> Iterator[dict]:
            while True:
                yield {"url": share[shard_rng.randrange(len(share))]}

        def make(video):
            if video.num_frames < self.spec.chunk_size:
                return []
            return [
                random_clip(
                    video, clip_rng, self.spec.chunk_size, self.spec.resolution, self.crop_scale
                )
                for _ in range(self.clips_per_video)
            ]

        pipeline = wds.DataPipeline(
            urls,
            partial(
                read_samples,
                errors=self.errors,
                fields=self.spec.fields,
                teacher_cache=_dir(self.spec),
            ),
            partial(_clips, make=make, spec=self.spec, errors=self.errors),
            wds.shuffle(
                self.shuffle_buffer,
                initial=min(self.shuffle_buffer, 16),
                rng=random.Random(shuffle_seed),
            ),
            lambda clips: islice(clips, own_skipped * self.batch_size, None),
            _batches(self.spec, self.batch_size, keep_partial=False),
        )
        return iter(pipeline)


@dataclass
class _ValStream(IterableDataset):
    """One rank's validation batches: its share of the videos, each exactly once."""

    shards: list[str]
    spec: _ClipSpec
    errors: ErrorPolicy
    batch_size: int
    rank: int
    world_size: int

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        consumer, consumers = self.rank * workers + worker, self.world_size * workers
        share, by_sample = consumer_share(self.shards, consumer, consumers)

        def mine(samples: Iterator[dict]) -> Iterator[dict]:
            for index, sample in enumerate(samples):
                if not by_sample or index % consumers == consumer:
                    yield sample

        def make(video):
            return central_clips(video, self.spec.chunk_size, self.spec.resolution)

        pipeline = wds.DataPipeline(
            lambda: ({"url": url} for url in share),
            partial(
                read_samples,
                errors=self.errors,
                fields=self.spec.fields,
                teacher_cache=_dir(self.spec),
            ),
            mine,
            partial(_clips, make=make, spec=self.spec, errors=self.errors),
            _batches(self.spec, self.batch_size, keep_partial=True),
        )
        return iter(pipeline)


def _dir(spec: _ClipSpec) -> Path | None:
    return None if spec.teacher is None else spec.teacher.directory


def _data_loader(stream: IterableDataset, num_workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if num_workers > 0 else None,
        worker_init_fn=_ignore_interrupts if num_workers > 0 else None,
    )


def _ignore_interrupts(worker_id: int) -> None:
    """Ctrl+C reaches the whole process group; the main process decides how to stop (the
    trainer checkpoints first), so a worker must not die of it mid-epoch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TrainLoader:
    """Iterable over training batches; one pass over it is one epoch of `len(self)` batches.

    Each pass continues where the previous one stopped: the first pass after `start_step` yields
    the rest of that epoch, later passes whole epochs; a pass abandoned early is continued by the
    next. `epoch` is the epoch being read and `step` the number of batches yielded so far.
    """

    def __init__(
        self,
        stream: _TrainStream,
        steps_per_epoch: int,
        start_step: int,
        num_workers: int,
        pin_memory: bool,
    ) -> None:
        self._stream = stream
        self.steps_per_epoch = steps_per_epoch
        self.epoch, self._offset = divmod(start_step, steps_per_epoch)
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def num_skipped(self) -> int:
        """Unreadable shards and corrupt samples skipped so far (with on_error='warn')."""
        return self._stream.errors.skipped

    @property
    def step(self) -> int:
        """Batches yielded so far, counted from step 0 (so it starts at `start_step`)."""
        return self.epoch * self.steps_per_epoch + self._offset

    def __iter__(self) -> Iterator[dict]:
        self._stream.epoch, self._stream.skip_batches = self.epoch, self._offset
        batches = iter(_data_loader(self._stream, self.num_workers, self.pin_memory))
        while self._offset < self.steps_per_epoch:
            batch = next(batches, None)
            if batch is None:
                raise RuntimeError("the training stream ended, which resampling should prevent")
            self._offset += 1
            yield batch
        self.epoch, self._offset = self.epoch + 1, 0


class ValLoader:
    """Iterable over this rank's validation batches (whole videos or fixed chunks)."""

    def __init__(self, stream: _ValStream, num_workers: int, pin_memory: bool) -> None:
        self._stream = stream
        self.num_workers, self.pin_memory = num_workers, pin_memory

    @property
    def num_skipped(self) -> int:
        """Unreadable shards and corrupt samples skipped so far (with on_error='warn')."""
        return self._stream.errors.skipped

    def __iter__(self) -> Iterator[dict]:
        return iter(_data_loader(self._stream, self.num_workers, self.pin_memory))


def make_train_loader(
    shards: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    batch_size: int,
    chunk_size: int,
    resolution: int | tuple[int, int],
    num_workers: int = 0,
    seed: int = 0,
    start_step: int = 0,
    steps_per_epoch: int = 1000,
    rank: int | None = None,
    world_size: int | None = None,
    fields: Sequence[str] | None = None,
    crop_scale: tuple[float, float] = (1.0, 1.0),
    clips_per_video: int = 1,
    shuffle_buffer: int = 64,
    frames_dtype: torch.dtype = torch.float32,
    on_error: OnError = "warn",
    pin_memory: bool = False,
    teacher_cache: TeacherCacheSpec | None = None,
) -> TrainLoader:
    """Endless, reproducible training clips from shards (a list, or a brace pattern).

    Each visit to a video yields `clips_per_video` clips of `chunk_size` consecutive frames at
    random starts; each clip gets one random crop (`crop_scale` times the largest window with the
    output's aspect ratio; (1, 1) is SlotContrast's short-side random crop) resized to
    `resolution`. Videos shorter than `chunk_size` are passed over. `fields` picks optional
    arrays (default: all in the first sample). `rank`/`world_size` default to the initialised
    process group or RANK/WORLD_SIZE.

    Reproducibility: the stream is a function of (shards, seed, rank, world_size, num_workers,
    batch_size, chunk_size, resolution, crop_scale, clips_per_video, shuffle_buffer, fields).
    `teacher_cache` adds the cached teacher maps of each clip (`teacher_pointmap`,
    `teacher_confidence`, `teacher_camera_to_world`), same frames and crop, resampled to its
    resolution (see post3r_data.teacher_cache).

    `start_step=s` yields exactly the batches an uninterrupted loader yields from step s on. It
    starts epoch s // steps_per_epoch directly (free when s is a multiple of steps_per_epoch,
    e.g. when the checkpoint interval is one epoch); within an epoch it reads and discards the
    clips already consumed (no resizing, but the shards are read again). Samples skipped as
    corrupt are the one exception: they shift later batches in both runs alike only if they
    are corrupt in both.
    """
    urls = _expand(shards)
    _check_counts(
        batch_size=batch_size,
        chunk_size=chunk_size,
        steps_per_epoch=steps_per_epoch,
        clips_per_video=clips_per_video,
    )
    if start_step < 0 or seed < 0:
        raise ValueError(f"start_step and seed must be >= 0, got {start_step}, {seed}")
    if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}")
    rank, world_size = _rank_and_world(rank, world_size)
    spec = _ClipSpec(
        _resolution(resolution),
        chunk_size,
        _fields(urls, fields),
        _frames_dtype(frames_dtype),
        teacher_cache,
    )
    stream = _TrainStream(
        urls,
        spec,
        ErrorPolicy(on_error),
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        shuffle_buffer=max(1, shuffle_buffer),
        crop_scale=(float(crop_scale[0]), float(crop_scale[1])),
        clips_per_video=clips_per_video,
    )
    return TrainLoader(stream, steps_per_epoch, start_step, num_workers, pin_memory)


def make_val_loader(
    shards: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    resolution: int | tuple[int, int],
    batch_size: int = 1,
    chunk_size: int | None = None,
    num_workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    fields: Sequence[str] | None = None,
    frames_dtype: torch.dtype = torch.float32,
    on_error: OnError = "warn",
    pin_memory: bool = False,
    teacher_cache: TeacherCacheSpec | None = None,
) -> ValLoader:
    """Every validation video exactly once across ranks, centre-cropped and resized.

    `chunk_size=None` yields whole videos (batch them only if all have the same length, as the
    synthetic ones do); an int yields every consecutive chunk of that many frames, dropping the
    remainder. `teacher_cache` adds the cached teacher maps, as in `make_train_loader`. The last
    batch of each worker may be smaller. Ranks may receive different
    numbers of batches, or none: evaluate without collectives inside the loop.
    """
    urls = _expand(shards)
    _check_counts(
        batch_size=batch_size, **({} if chunk_size is None else {"chunk_size": chunk_size})
    )
    rank, world_size = _rank_and_world(rank, world_size)
    spec = _ClipSpec(
        _resolution(resolution),
        chunk_size,
        _fields(urls, fields),
        _frames_dtype(frames_dtype),
        teacher_cache,
    )
    stream = _ValStream(urls, spec, ErrorPolicy(on_error), batch_size, rank, world_size)
    return ValLoader(stream, num_workers, pin_memory)

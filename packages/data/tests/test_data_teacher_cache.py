"""Sidecar teacher shards: writing, reading, and the loader's cropping of cached maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from post3r_data import make_train_loader, make_val_loader
from post3r_data.shards import encode_npy, shard_name, write_shard
from post3r_data.teacher_cache import (
    SidecarShardWriter,
    TeacherCacheSpec,
    crop_indices,
    read_sidecar,
    sidecar_path,
    stored_size,
)

H, W = 12, 20  # frames: not square, so crops really cut


def maps(index: int, frames: int, size: tuple[int, int]):
    """Per-frame maps whose values say where they come from: x = column, y = row, z = frame +
    video index / 10 (exact in float16)."""
    t, y, x = np.meshgrid(np.arange(frames), np.arange(size[0]), np.arange(size[1]), indexing="ij")
    points = np.stack([x, y, t + index / 8], axis=-1).astype(np.float32)
    confidence = (1 + x + 100 * y).astype(np.float32)
    poses = np.tile(np.eye(4, dtype=np.float32), (frames, 1, 1))
    poses[:, 0, 3] = np.arange(frames) + index
    return points, confidence, poses


def write_data_and_cache(root: Path, lengths: list[int], stored: tuple[int, int]) -> Path:
    data, cache = root / "data", root / "cache"
    data.mkdir(parents=True)
    cache.mkdir()
    for shard, first in enumerate(range(0, len(lengths), 2)):
        indices = range(first, min(first + 2, len(lengths)))
        samples = []
        for i in indices:
            video = np.full((lengths[i], H, W, 3), 10 * i, np.uint8)
            samples.append({"__key__": f"vid{i}", "video.npy": encode_npy(video)})
        path = data / shard_name("toy", "train", shard)
        write_shard(path, samples)
        with SidecarShardWriter(sidecar_path(cache, path)) as writer:
            for i in indices:
                spool = writer.begin_video(f"vid{i}", lengths[i], stored)
                for frame in zip(*maps(i, lengths[i], stored), strict=True):
                    spool.add(*frame)
                writer.end_video()
    return data


def test_sidecar_round_trip_is_deterministic_and_saturates_confidence(tmp_path):
    points, confidence, poses = maps(3, 4, (5, 7))
    confidence[0, 0, 0] = 1e9  # beyond float16
    outputs = []
    for name in ("a.tar", "b.tar"):
        with SidecarShardWriter(tmp_path / name) as writer:
            spool = writer.begin_video("vid3", 4, (5, 7))
            for frame in zip(points, confidence, poses, strict=True):
                spool.add(*frame)
            writer.end_video()
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]
    (sample,) = read_sidecar(tmp_path / "a.tar")
    assert sample["__key__"] == "vid3"
    assert sample["teacher_pointmap"].dtype == np.float16
    np.testing.assert_array_equal(sample["teacher_pointmap"], points)
    np.testing.assert_array_equal(sample["teacher_camera_to_world"], poses)
    assert sample["teacher_confidence"][0, 0, 0] == np.finfo(np.float16).max
    assert not list(tmp_path.glob("*.tmp"))


def test_a_failed_shard_leaves_nothing(tmp_path):
    with (
        pytest.raises(ValueError, match="2 frames written, 3 declared"),
        SidecarShardWriter(tmp_path / "s.tar") as writer,
    ):
        spool = writer.begin_video("v", 3, (2, 2))
        for frame in zip(*maps(0, 2, (2, 2)), strict=True):
            spool.add(*frame)
        writer.end_video()
    assert list(tmp_path.iterdir()) == []


def test_a_shard_left_with_an_unfinished_video_is_not_published(tmp_path):
    with SidecarShardWriter(tmp_path / "s.tar") as writer:
        writer.begin_video("v", 3, (2, 2))
    assert list(tmp_path.iterdir()) == []


def test_crop_indices_are_an_exact_crop_at_the_same_resolution():
    rows, cols = crop_indices((2, 5, 8, 8), (12, 20), (12, 20), (8, 8))
    np.testing.assert_array_equal(rows, np.arange(2, 10))
    np.testing.assert_array_equal(cols, np.arange(5, 13))
    # Stored at half the frame resolution: each stored pixel covers 2x2 frame pixels.
    rows, cols = crop_indices((2, 4, 8, 8), (12, 20), (6, 10), (4, 4))
    np.testing.assert_array_equal(rows, [1, 2, 3, 4])
    np.testing.assert_array_equal(cols, [2, 3, 4, 5])


def test_stored_size_keeps_the_aspect_ratio():
    assert stored_size(720, 1280, 128) == (128, 228)
    assert stored_size(1280, 720, 128) == (228, 128)


def test_val_loader_delivers_the_same_crop_of_the_cached_maps(tmp_path):
    data = write_data_and_cache(tmp_path, [4, 5, 3], stored=(H, W))
    spec = TeacherCacheSpec(tmp_path / "cache", (H, H))  # the central HxH crop, unscaled
    loader = make_val_loader(
        sorted(str(p) for p in data.glob("*.tar")), resolution=H, teacher_cache=spec
    )
    seen = []
    for batch in loader:
        (key,) = batch["key"]
        index = int(key.removeprefix("vid"))
        points, confidence, poses = maps(index, batch["frames"].shape[1], (H, W))
        left = (W - H) // 2
        np.testing.assert_array_equal(
            batch["teacher_pointmap"][0].numpy(), points[:, :, left : left + H]
        )
        np.testing.assert_array_equal(
            batch["teacher_confidence"][0].numpy(), confidence[:, :, left : left + H]
        )
        np.testing.assert_array_equal(batch["teacher_camera_to_world"][0].numpy(), poses)
        seen.append(key)
    assert sorted(seen) == ["vid0", "vid1", "vid2"]


def test_train_loader_maps_random_crops_onto_a_coarser_cache(tmp_path):
    """Frames 12x20, cache stored at 6x10: a crop's maps come from the stored pixels under the
    crop's output pixel centres, for the clip's own frames."""
    data = write_data_and_cache(tmp_path, [6, 7], stored=(H // 2, W // 2))
    spec = TeacherCacheSpec(tmp_path / "cache", (3, 3))
    loader = make_train_loader(
        str(data / "toy-train-000000.tar"),
        batch_size=4,
        chunk_size=3,
        resolution=6,
        crop_scale=(0.5, 1.0),
        steps_per_epoch=2,
        teacher_cache=spec,
    )
    for batch in loader:
        for b, key in enumerate(batch["key"]):
            points = batch["teacher_pointmap"][b].numpy()  # (3, 3, 3, 3)
            index = int(key.removeprefix("vid"))
            frames = batch["frame_index"][b].numpy()
            np.testing.assert_array_equal(points[:, 0, 0, 2], frames + index / 8)
            # Columns and rows step evenly through the stored grid, inside it.
            xs, ys = points[0, 0, :, 0], points[0, :, 0, 1]
            assert np.all(np.diff(xs) >= 0) and np.all(np.diff(ys) >= 0)
            assert xs.max() <= W // 2 - 1 and ys.max() <= H // 2 - 1


def test_a_video_without_a_cache_entry_is_named(tmp_path):
    data = write_data_and_cache(tmp_path, [4, 4], stored=(H, W))
    shard = data / "toy-train-000000.tar"
    extra = {"__key__": "vid9", "video.npy": encode_npy(np.zeros((4, H, W, 3), np.uint8))}
    samples = [extra]
    for i in (0, 1):
        video = np.full((4, H, W, 3), 10 * i, np.uint8)
        samples.append({"__key__": f"vid{i}", "video.npy": encode_npy(video)})
    write_shard(shard, samples)
    spec = TeacherCacheSpec(tmp_path / "cache", (H, H))
    loader = make_val_loader(str(shard), resolution=H, teacher_cache=spec, on_error="raise")
    with pytest.raises(Exception, match=r"'vid9'.*no teacher cache entry"):
        list(loader)


def test_writing_a_long_video_takes_no_more_memory_than_a_short_one(tmp_path):
    """Peak Python/NumPy allocations while writing 10 vs 400 frames (64x96 maps)."""
    import tracemalloc

    frame = maps(0, 1, (64, 96))
    peaks = []
    for length in (10, 400):
        tracemalloc.start()
        with SidecarShardWriter(tmp_path / f"{length}.tar") as writer:
            spool = writer.begin_video("v", length, (64, 96))
            for _ in range(length):
                spool.add(frame[0][0], frame[1][0], frame[2][0])
            writer.end_video()
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    one_frame = 64 * 96 * 4 * 4  # the float32 inputs of one frame
    assert peaks[1] < peaks[0] + one_frame  # 390 more frames would be 390 x 49 KiB if held
    assert (tmp_path / "400.tar").stat().st_size > 400 * 64 * 96 * 8

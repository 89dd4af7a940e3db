"""The streaming loader on small hand-made shards whose pixels encode where they came from."""

from __future__ import annotations

import io
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from post3r_data import (
    CorruptSampleError,
    find_shards,
    instance_ids,
    make_train_loader,
    make_val_loader,
)
from post3r_data.shards import encode_npy, shard_name, write_shard

H, W = 12, 16


def toy_video(index: int, frames: int) -> dict[str, np.ndarray]:
    """Red = 20 t + video index, green = row, blue = column; ids = column // 4 (0..3)."""
    t, y, x = np.meshgrid(np.arange(frames), np.arange(H), np.arange(W), indexing="ij")
    video = np.stack([20 * t + index, y, x], axis=-1).astype(np.uint8)
    return {"video": video, "segmentations": (x // 4)[..., None].astype(np.uint8)}


def write_toy_shards(
    directory: Path, lengths: list[int], per_shard: int, split: str = "train"
) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, first in enumerate(range(0, len(lengths), per_shard)):
        samples = []
        for index in range(first, min(first + per_shard, len(lengths))):
            arrays = toy_video(index, lengths[index])
            samples.append(
                {
                    "__key__": f"vid{index:03d}",
                    **{f"{k}.npy": encode_npy(v) for k, v in arrays.items()},
                }
            )
        path = directory / shard_name("toy", split, shard)
        write_shard(path, samples)
        paths.append(str(path))
    return paths


@pytest.fixture
def shards(tmp_path: Path) -> list[str]:
    return write_toy_shards(tmp_path / "toy", [6, 7, 8, 5, 6, 9], per_shard=2)


def check_clip_content(batch: dict, frames_scale: float = 255.0) -> None:
    """Each clip shows consecutive frames of its own video and one contiguous crop window."""
    pixels = (batch["frames"].double() * frames_scale).round().long()  # (B, T, 3, h, w)
    for b, key in enumerate(batch["key"]):
        index = int(key[3:])
        frame_index = batch["frame_index"][b]
        assert torch.equal(frame_index, frame_index[0] + torch.arange(len(frame_index)))
        red = pixels[b, :, 0, 0, 0]
        assert torch.equal(red, 20 * frame_index + index)
        rows, cols = pixels[b, 0, 1, :, 0], pixels[b, 0, 2, 0, :]
        assert torch.equal(rows, rows[0] + torch.arange(len(rows)))
        assert torch.equal(cols, cols[0] + torch.arange(len(cols)))
        assert torch.equal(batch["segmentations"][b, 0, 0], cols // 4)


def test_train_batches_have_the_contract_layout(shards):
    loader = make_train_loader(shards, batch_size=3, chunk_size=4, resolution=H, steps_per_epoch=5)
    batches = list(loader)
    assert len(batches) == len(loader) == 5 and loader.epoch == 1 and loader.step == 5
    for batch in batches:
        assert set(batch) == {"frames", "segmentations", "frame_index", "key"}
        assert batch["frames"].shape == (3, 4, 3, H, H) and batch["frames"].dtype == torch.float32
        assert batch["frames"].min() >= 0.0 and batch["frames"].max() <= 1.0
        assert (
            batch["segmentations"].shape == (3, 4, H, H)
            and batch["segmentations"].dtype == torch.int64
        )
        assert batch["frame_index"].shape == (3, 4) and len(batch["key"]) == 3
        check_clip_content(batch)
    assert len({k for b in batches for k in b["key"]}) > 1


def test_train_resize_and_uint8_frames(shards):
    loader = make_train_loader(
        shards,
        batch_size=2,
        chunk_size=3,
        resolution=(6, 8),
        steps_per_epoch=2,
        frames_dtype=torch.uint8,
    )
    for batch in loader:
        assert batch["frames"].shape == (2, 3, 3, 6, 8) and batch["frames"].dtype == torch.uint8
        # A 12x16 crop halved: nearest sampling picks source rows/columns 1, 3, 5, ...
        assert torch.equal(batch["segmentations"][0, 0, 0], torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
        # Bilinear with antialiasing averages column pairs: blue = 0.5, 2.5, ... rounds to even.
        blue = batch["frames"][0, 0, 2, 0].long()
        assert torch.all((blue - torch.arange(8) * 2).abs() <= 1)


def _signature(batches: list[dict]) -> list[tuple]:
    return [(b["key"], b["frame_index"].tolist(), b["frames"].sum().item()) for b in batches]


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_is_reproducible_and_resumes_exactly(shards, workers):
    def run(start_step: int, passes: int, seed: int = 7) -> list[dict]:
        loader = make_train_loader(
            shards,
            batch_size=2,
            chunk_size=3,
            resolution=8,
            num_workers=workers,
            seed=seed,
            steps_per_epoch=4,
            start_step=start_step,
            crop_scale=(0.5, 1.0),
            shuffle_buffer=4,
        )
        return [batch for _ in range(passes) for batch in loader]

    full = run(0, 3)
    assert len(full) == 12
    assert _signature(run(0, 1)) == _signature(full[:4])
    assert _signature(run(6, 1)) == _signature(full[6:8])  # mid-epoch resume: epoch 1, batch 2
    assert _signature(run(5, 1)) == _signature(full[5:8])  # an odd offset rotates the workers
    assert _signature(run(8, 1)) == _signature(full[8:])  # resume at an epoch boundary
    assert _signature(run(0, 1, seed=8)) != _signature(full[:4])
    assert _signature(full[:4]) != _signature(full[4:8])  # epochs differ


def test_ranks_draw_from_disjoint_shard_shares(shards):
    def keys(rank: int, world_size: int) -> list[str]:
        loader = make_train_loader(
            shards,
            batch_size=2,
            chunk_size=3,
            resolution=8,
            steps_per_epoch=6,
            rank=rank,
            world_size=world_size,
        )
        return [k for batch in loader for k in batch["key"]]

    # Three shards of two videos, two ranks: rank 0 reads shards 0 and 2, rank 1 shard 1.
    first, second = keys(0, 2), keys(1, 2)
    assert set(first) <= {"vid000", "vid001", "vid004", "vid005"} and len(set(first)) > 2
    assert set(second) == {"vid002", "vid003"}
    # Fewer shards than ranks: every rank draws from all of them, each with its own seed.
    assert keys(0, 4) != keys(3, 4)


def _val_keys(shards, world_size: int, workers: int = 0) -> list[list[str]]:
    per_rank = []
    for rank in range(world_size):
        loader = make_val_loader(
            shards, resolution=8, rank=rank, world_size=world_size, num_workers=workers
        )
        per_rank.append([k for batch in loader for k in batch["key"]])
    return per_rank


@pytest.mark.parametrize(("world_size", "workers"), [(2, 0), (2, 2), (3, 0), (4, 1), (8, 0)])
def test_validation_covers_every_video_once_across_ranks(shards, world_size, workers):
    per_rank = _val_keys(shards, world_size, workers)
    everything = [k for keys in per_rank for k in keys]
    assert sorted(everything) == [f"vid{i:03d}" for i in range(6)]  # all, no duplicates
    if world_size == 8:
        assert sum(1 for keys in per_rank if not keys) == 2  # ranks without videos yield nothing


def test_validation_whole_videos_and_chunks(shards):
    batches = list(make_val_loader(shards, resolution=(12, 12)))
    assert [b["frames"].shape[1] for b in batches] == [6, 7, 8, 5, 6, 9]
    for batch in batches:
        check_clip_content(batch)
        # The centre crop of a 12x16 frame starts at column 2.
        assert batch["frames"][0, 0, 2, 0, 0].item() * 255 == pytest.approx(2)
    chunks = list(make_val_loader(shards, resolution=12, chunk_size=3, batch_size=2))
    clips = [
        (k, f[0].item()) for b in chunks for k, f in zip(b["key"], b["frame_index"], strict=True)
    ]
    assert len(clips) == 2 + 2 + 2 + 1 + 2 + 3  # whole chunks only, remainders dropped
    assert ("vid005", 6) in clips and ("vid002", 6) not in clips
    with pytest.raises(ValueError, match="use batch_size=1 or a chunk_size"):
        list(make_val_loader(shards, resolution=12, batch_size=2))


def _corrupt_shards(directory: Path) -> list[str]:
    paths = write_toy_shards(directory, [5, 5, 5], per_shard=3)
    good = toy_video(9, 5)
    bad = {
        "__key__": "broken",
        "video.npy": b"\x93NUMPY garbage",
        "segmentations.npy": encode_npy(good["segmentations"]),
    }
    path = directory / shard_name("toy", "train", 1)
    write_shard(
        path, [bad, {"__key__": "vid009", **{f"{k}.npy": encode_npy(v) for k, v in good.items()}}]
    )
    truncated = directory / shard_name("toy", "train", 2)
    with tarfile.open(paths[0]) as tar:  # cut inside vid001's video data
        cut = next(m for m in tar if m.name == "vid001.video.npy").offset_data + 100
    truncated.write_bytes(Path(paths[0]).read_bytes()[:cut])
    return [*paths, str(path), str(truncated)]


def test_corrupt_samples_and_shards_are_skipped_and_counted(tmp_path):
    shards = _corrupt_shards(tmp_path)
    loader = make_val_loader(shards, resolution=8, on_error="warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = [k for batch in loader for k in batch["key"]]
    # Shard 0 whole; shard 1 without "broken"; the truncated copy of shard 0 up to the cut.
    assert keys == ["vid000", "vid001", "vid002", "vid009", "vid000"]
    assert loader.num_skipped == 2  # the broken sample and the rest of the truncated shard
    messages = [str(w.message) for w in caught]
    assert any("'broken'" in m for m in messages)
    assert any("toy-train-000002.tar: unexpected end of data" in m for m in messages)
    with pytest.raises(CorruptSampleError, match=r"'broken' in .*toy-train-000001.tar: video.npy"):
        list(make_val_loader(shards, resolution=8, on_error="raise"))
    train = make_train_loader(shards, batch_size=2, chunk_size=3, resolution=8, steps_per_epoch=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(list(train)) == 20 and train.num_skipped > 0


def test_a_corrupt_first_shard_is_skipped_like_any_other(tmp_path):
    paths = write_toy_shards(tmp_path, [5, 5, 5], per_shard=2)
    first = Path(paths[0])
    first.write_bytes(first.read_bytes()[:100])  # cut inside its first sample's header
    loader = make_val_loader(paths, resolution=8, on_error="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keys = [k for batch in loader for k in batch["key"]]
        assert "segmentations" in next(iter(loader))  # the layout came from the readable shard
    assert keys == ["vid002"] and loader.num_skipped >= 1
    first.write_bytes(b"")
    Path(paths[1]).write_bytes(b"")
    with pytest.raises(ValueError, match="none of the 2 shards can be read"):
        make_val_loader(paths, resolution=8)


class _TouchOnUnpickle:
    """Unpickling this object creates a file: proof that a loader unpickled shard data."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("scheme", ["", "file:"])  # seeking reader, webdataset's stream
def test_pickled_arrays_are_refused_unread(tmp_path, scheme):
    marker = tmp_path / "unpickled"
    payload = io.BytesIO()
    np.save(payload, np.array([_TouchOnUnpickle(marker)] * 5, dtype=object), allow_pickle=True)
    video = toy_video(0, 5)
    path = tmp_path / shard_name("toy", "train", 0)
    sample = {"__key__": "evil", "video.npy": encode_npy(video["video"])}
    write_shard(path, [{**sample, "segmentations.npy": payload.getvalue()}])
    loader = make_val_loader([f"{scheme}{path}"], resolution=8, on_error="raise")
    with pytest.raises(CorruptSampleError, match="refusing to load an object"):
        list(loader)
    assert not marker.exists()


def test_any_failure_on_a_sample_names_it(shards, monkeypatch):
    def fail(*args):
        raise ValueError("read ended early")

    monkeypatch.setattr("post3r_data.loader.central_clips", fail)
    with pytest.raises(CorruptSampleError, match=r"'vid000' in .*toy-train-000000.tar: read ended"):
        list(make_val_loader(shards, resolution=8, on_error="raise"))


def test_unusable_stream_fails_clearly(shards):
    loader = make_train_loader(shards, batch_size=1, chunk_size=50, resolution=8, steps_per_epoch=1)
    with pytest.raises(RuntimeError, match="shorter than chunk_size"):
        next(iter(loader))


def test_find_shards_names_directory_and_command(tmp_path, shards):
    with pytest.raises(
        FileNotFoundError, match=r"nowhere does not exist.*uv run apps/synth --output"
    ):
        find_shards(tmp_path / "nowhere", "synthetic", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"no ytvis-validation-NNNNNN.tar shards .*apps/prepare-ytvis"
    ):
        find_shards(tmp_path / "empty", "ytvis", "val")
    Path(shards[0] + ".tmp").write_bytes(b"unfinished")
    assert find_shards(Path(shards[0]).parent, "toy", "training") == shards
    with pytest.raises(ValueError, match="unknown split"):
        find_shards(tmp_path, "toy", "test")


def test_slotcontrast_per_instance_channels_become_ids(tmp_path):
    channels = np.zeros((2, 3, 4, 3), np.uint8)
    channels[:, 0, :2, 0] = 17  # instance 0, category 17
    channels[:, 0, 1:3, 1] = 4  # instance 1 overlaps instance 0 at column 1
    channels[:, 2, :, 2] = 17  # instance 2 has the same category as instance 0
    expected = np.zeros((2, 3, 4), np.uint8)
    expected[:, 0, 0], expected[:, 0, 2], expected[:, 2, :] = 1, 2, 3
    np.testing.assert_array_equal(instance_ids(channels), expected)
    np.testing.assert_array_equal(instance_ids(channels[..., :1]), channels[..., 0])
    # A shard as SlotContrast wrote it: whole videos, (T, H, W, I) masks, no metadata.
    video = np.zeros((2, 3, 4, 3), np.uint8)
    path = tmp_path / "ytvis-validation-000000.tar"
    write_shard(
        path,
        [
            {
                "__key__": "123",
                "video.npy": encode_npy(video),
                "segmentations.npy": encode_npy(channels),
            }
        ],
    )
    batch = next(iter(make_val_loader([str(path)], resolution=(3, 4))))
    assert batch["key"] == ["123"] and torch.equal(
        batch["segmentations"][0], torch.from_numpy(expected).long()
    )


def test_fields_select_and_validate(shards):
    batch = next(iter(make_val_loader(shards, resolution=8, fields=[])))
    assert set(batch) == {"frames", "frame_index", "key"}
    with pytest.raises(ValueError, match="unknown fields"):
        make_val_loader(shards, resolution=8, fields=["normals"])
    half = next(iter(make_val_loader(shards, resolution=8, frames_dtype=torch.bfloat16)))
    assert half["frames"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="frames_dtype must be"):
        make_val_loader(shards, resolution=8, frames_dtype=torch.int32)
    with pytest.raises(ValueError, match="refusing shell-command"):
        make_val_loader("pipe:cat x.tar", resolution=8)
    with pytest.raises(ValueError, match=r"is a directory; pass its shards: find_shards\("):
        make_val_loader(str(Path(shards[0]).parent), resolution=8)
    with pytest.raises(ValueError, match=r"cannot read shard .*missing\.tar"):
        make_train_loader([shards[0] + ".missing.tar"], batch_size=1, chunk_size=1, resolution=8)


def test_rank_comes_from_the_environment(shards, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    keys = [k for batch in make_val_loader(shards, resolution=8) for k in batch["key"]]
    assert keys == _val_keys(shards, 2)[1]
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="rank < world_size"):
        make_val_loader(shards, resolution=8)


def test_fortran_ordered_arrays_read_like_c_ordered_ones(tmp_path):
    arrays = toy_video(3, 6)
    paths = {}
    for order in ("C", "F"):
        sample = {"__key__": "vid003"}
        for name, array in arrays.items():
            payload = io.BytesIO()
            np.save(payload, np.asarray(array, order=order), allow_pickle=False)
            sample[f"{name}.npy"] = payload.getvalue()
        paths[order] = tmp_path / shard_name(f"toy{order}", "validation", 0)
        write_shard(paths[order], [sample])
    expected = next(iter(make_val_loader([str(paths["C"])], resolution=(12, 12))))
    check_clip_content(expected)
    for url in (str(paths["F"]), f"file:{paths['F']}"):  # seeking reader, webdataset's stream
        batch = next(iter(make_val_loader([url], resolution=(12, 12))))
        for name in ("frames", "segmentations", "frame_index"):
            assert torch.equal(batch[name], expected[name]), (url, name)


def test_urls_stream_through_webdataset_with_the_same_result(shards):
    """Non-local URLs are streamed by webdataset instead of seeking; the batches agree."""
    urls = [f"file:{path}" for path in shards]
    local = list(make_val_loader(shards, resolution=8, chunk_size=2, batch_size=3))
    streamed = list(make_val_loader(urls, resolution=8, chunk_size=2, batch_size=3))
    assert len(local) == len(streamed) > 1
    for a, b in zip(local, streamed, strict=True):
        assert a["key"] == b["key"]
        for name in ("frames", "segmentations", "frame_index"):
            assert torch.equal(a[name], b[name])
    train = make_train_loader(urls, batch_size=2, chunk_size=3, resolution=8, steps_per_epoch=2)
    assert [b["frames"].shape for b in train] == [(2, 3, 3, 8, 8)] * 2


@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_npy_headers_are_parsed_once_and_read_as_numpy_reads_them(version):
    import io

    from post3r_data.shards import _parsed_header, decode_npy

    arrays = [np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.zeros((5, 1), np.uint8)]
    encoded = []
    for array in arrays:
        stream = io.BytesIO()
        np.lib.format.write_array(stream, np.asfortranarray(array), version=version)
        encoded.append(stream.getvalue())
    _parsed_header.cache_clear()
    for _ in range(3):
        for array, data in zip(arrays, encoded, strict=True):
            decoded = decode_npy(data)
            assert decoded.dtype == array.dtype and np.array_equal(decoded, array)
    assert _parsed_header.cache_info().misses == 2  # one parse per distinct header
    with pytest.raises(ValueError):
        decode_npy(encoded[0][:12])  # the header cut short

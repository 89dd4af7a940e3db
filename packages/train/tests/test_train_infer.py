"""apps/infer: the streamed output layout, argument and input checks, the writer's parts."""

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from train_model_runs import TINY_TTT3R, call, smoke_run

from post3r_train import infer
from post3r_train.infer_writer import (
    OUTSIDE_CROP,
    GrowingNpy,
    InferWriter,
    Reservoir,
    estimate_focal,
    read_manifest,
)
from post3r_train.visualize import read_ply


def _frames(count=5, height=40, width=48):
    rng = np.random.default_rng(0)
    frames = []
    for t in range(count):
        image = np.full((height, width, 3), 90, np.uint8)
        image[8 + t : 20 + t, 10:22] = (230, 40, 40)
        image[24:34, 26 - t : 38 - t] = (40, 200, 60)
        frames.append(np.clip(image + rng.integers(0, 10, image.shape), 0, 255).astype(np.uint8))
    return frames


def _folder(tmp_path, frames, name="frames"):
    folder = tmp_path / name
    folder.mkdir()
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{index:04d}.png")
    return folder


def _check_outputs(folder: Path, count: int, size=(40, 48)):
    import av

    manifest = read_manifest(folder)
    assert manifest["num_frames"] == count and manifest["input_size"] == list(size)
    assert manifest["crop"] == {"top": 0, "left": 4, "side": 40}
    for name in ("masks.mp4", "overlay.mp4"):
        with av.open(str(folder / name)) as container:
            assert sum(1 for _ in container.decode(video=0)) == count
    objects = sorted((folder / "objects").glob("slot*.mp4"))
    assert [int(p.stem[4:]) for p in objects] == manifest["used_slots"]
    ids = np.load(folder / "masks.npy")
    # one slot id per input pixel; the columns outside the centre square the model saw are 255
    assert ids.shape == (count, *size) and ids.dtype == np.uint8
    assert (ids[:, :, :4] == OUTSIDE_CROP).all() and (ids[:, :, 44:] == OUTSIDE_CROP).all()
    assert (ids[:, :, 4:44] < manifest["num_slots"]).all()
    assert len(list((folder / "thumbs").glob("frame_*.jpg"))) == count
    assert len(list((folder / "thumbs").glob("overlay_*.jpg"))) == count
    xyz = np.load(folder / "points" / "frame_xyz.npy")
    slots = np.load(folder / "points" / "frame_slot.npy")
    assert xyz.shape == (count, 16 * 16, 3) and slots.shape == (count, 16 * 16)
    clouds = sorted((folder / "points").glob("slot[0-9].ply"))
    total = sum(len(read_ply(p)[0]) for p in clouds)
    assert total == count * 16 * 16  # every decoder pixel lands in exactly one slot's cloud
    for path in clouds:  # each slot's cloud holds exactly the per-frame points it won
        k = int(path.stem[4:])
        assert len(read_ply(path)[0]) == int((slots == k).sum())
    cameras = json.loads((folder / "cameras.json").read_text())
    assert len(cameras["frames"]) == count and cameras["source"] == "none"
    np.testing.assert_allclose(cameras["frames"][-1]["camera_to_world"], np.eye(4))
    return manifest, ids


def test_infer_on_a_folder_of_frames(tmp_path, monkeypatch):
    folder = _folder(tmp_path, _frames())
    out_dir = tmp_path / "out"
    policies: list[str] = []  # the CPU job asks glibc to keep freed memory (the frames' maps)
    monkeypatch.setattr(infer, "keep_freed_memory_for", lambda device: policies.append(str(device)))
    code, out, err = call(
        infer.main,
        [str(smoke_run().run_dir), str(folder), "--output", str(out_dir), "--chunk-size", "2"],
    )
    assert code == 0, err
    assert policies == ["cpu"]
    assert "5 frames" in out
    _check_outputs(out_dir, 5)
    assert not list(tmp_path.glob(".out.partial-*"))  # the staging folder was published


def test_infer_on_a_video_file_equals_the_same_frames_in_one_clip(tmp_path):
    import av

    video = tmp_path / "clip.mp4"
    with av.open(str(video), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 48, 40, "yuv420p"
        for frame in _frames(count=4):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    run = str(smoke_run().run_dir)
    code, _, err = call(infer.main, [run, str(video), "--output", str(tmp_path / "a"), "-q"])
    assert code == 0, err
    _, ids = _check_outputs(tmp_path / "a", 4)
    # streamed clip by clip (slots carry over) = one clip of the whole video
    code, _, err = call(
        infer.main, [run, str(video), "--output", str(tmp_path / "b"), "--chunk-size", "1", "-q"]
    )
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "b" / "masks.npy"), ids)
    np.testing.assert_allclose(
        np.load(tmp_path / "b" / "points" / "frame_xyz.npy"),
        np.load(tmp_path / "a" / "points" / "frame_xyz.npy"),
        rtol=1e-4,
        atol=1e-5,
    )


def test_infer_max_frames_and_stride_mean_the_same_for_videos_and_folders(tmp_path):
    folder = _folder(tmp_path, _frames(count=6))
    code, _, err = call(
        infer.main,
        [str(smoke_run().run_dir), str(folder), "--output", str(tmp_path / "o"), "--max-frames",
         "2", "--stride", "2", "-q"],
    )  # fmt: skip
    assert code == 0, err
    assert read_manifest(tmp_path / "o")["num_frames"] == 2


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--fps", "0", "--fps must be a positive"),
        ("--fps", "nan", "--fps must be a positive"),
        ("--max-frames", "-1", "--max-frames must be a whole number >= 1"),
        ("--max-frames", "0", "--max-frames must be a whole number >= 1"),
        ("--stride", "0", "--stride must be"),
        ("--chunk-size", "0", "--chunk-size must be"),
        ("--max-points-per-slot", "0", "--max-points-per-slot must be"),
        ("--device", "nonsense", "--device 'nonsense'"),
    ],
)
def test_infer_bad_arguments_fail_before_any_work(tmp_path, flag, value, message):
    folder = _folder(tmp_path, _frames(count=2))
    out_dir = tmp_path / "out"
    code, _, err = call(
        infer.main, [str(smoke_run().run_dir), str(folder), "--output", str(out_dir), flag, value]
    )
    assert code == 1 and message in err and "Traceback" not in err
    assert not out_dir.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["frames"]


def test_infer_a_corrupt_image_is_named_and_nothing_is_written(tmp_path):
    folder = _folder(tmp_path, _frames(count=3))
    (folder / "0001.png").write_bytes(b"not a png at all")
    code, _, err = call(
        infer.main, [str(smoke_run().run_dir), str(folder), "--output", str(tmp_path / "out")]
    )
    assert code == 1 and "0001.png" in err and "not a readable image" in err
    assert not (tmp_path / "out").exists()


def test_infer_a_truncated_image_fails_cleanly_and_keeps_the_earlier_output(tmp_path):
    folder = _folder(tmp_path, _frames(count=3))
    run, out_dir = str(smoke_run().run_dir), tmp_path / "out"
    assert call(infer.main, [run, str(folder), "--output", str(out_dir), "-q"])[0] == 0
    before = (out_dir / "masks.npy").read_bytes()
    data = (folder / "0002.png").read_bytes()
    (folder / "0002.png").write_bytes(data[: len(data) // 2])  # header fine, pixels cut off
    code, _, err = call(infer.main, [run, str(folder), "--output", str(out_dir), "-q"])
    assert code == 1 and "0002.png" in err
    assert (out_dir / "masks.npy").read_bytes() == before
    assert not list(tmp_path.glob(".out.*"))  # no staging folder left behind


def test_infer_mixed_frame_sizes_warn_and_keep_one_size(tmp_path):
    frames = _frames(count=3)
    frames[1] = np.asarray(Image.fromarray(frames[1]).resize((60, 50)))
    folder = _folder(tmp_path, frames)
    with pytest.warns(UserWarning, match="60x50"):
        code, _, err = call(
            infer.main,
            [str(smoke_run().run_dir), str(folder), "--output", str(tmp_path / "o"), "-q"],
        )
    assert code == 0, err
    assert np.load(tmp_path / "o" / "masks.npy").shape == (3, 40, 48)


def test_infer_refuses_to_replace_a_folder_that_is_not_an_infer_output(tmp_path):
    folder = _folder(tmp_path, _frames(count=2))
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("keep me")
    code, _, err = call(
        infer.main, [str(smoke_run().run_dir), str(folder), "--output", str(precious)]
    )
    assert code == 1 and "not an infer output" in err
    assert (precious / "thesis.tex").read_text() == "keep me"


def test_infer_bad_input_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = call(infer.main, [str(smoke_run().run_dir), str(tmp_path / "empty")])
    assert code == 1 and "holds no images" in err
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 100)
    code, _, err = call(infer.main, [str(smoke_run().run_dir), str(tmp_path / "broken.mp4")])
    assert code == 1 and "broken.mp4" in err


def test_infer_with_the_ttt3r_teacher_writes_its_cameras_in_one_world_frame(tmp_path):
    from post3r_train import POST3RModel, load_config

    torch.manual_seed(0)
    model = POST3RModel.from_config(load_config("smoke", TINY_TTT3R)).eval()
    folder = _folder(tmp_path, _frames(count=4))
    results = {}
    for chunk in (4, 2):
        source = infer.open_frames(folder)
        writer = InferWriter(
            tmp_path / f"chunk{chunk}",
            input_size=source.size,
            model_size=model.image_size,
            num_slots=model.num_slots,
            fps=4.0,
            source=str(folder),
            checkpoint="none",
            mask_decoder="feature",
        )
        infer.stream(model, source, writer, chunk, torch.device("cpu"), progress=False)
        writer.finish()
        results[chunk] = tmp_path / f"chunk{chunk}"
    cameras = json.loads((results[2] / "cameras.json").read_text())
    assert cameras["source"] == "ttt3r" and len(cameras["frames"]) == 4
    np.testing.assert_allclose(cameras["frames"][0]["camera_to_world"], np.eye(4), atol=1e-5)
    assert read_manifest(results[2])["has_confidence"]
    # the teacher's state carries across clips: the same poses and points as one clip
    whole = json.loads((results[4] / "cameras.json").read_text())
    for a, b in zip(cameras["frames"], whole["frames"], strict=True):
        np.testing.assert_allclose(a["camera_to_world"], b["camera_to_world"], atol=1e-4)
    confidence = np.load(results[2] / "points" / "frame_confidence.npy")
    assert confidence.shape == (4, 256) and np.isfinite(confidence).all()


def test_growing_npy_round_trips_with_a_length_known_only_at_the_end(tmp_path):
    rows = np.arange(7 * 5 * 3, dtype=np.float32).reshape(7, 5, 3)
    array = GrowingNpy(tmp_path / "a.npy", (5, 3), np.float32)
    array.append(rows[:3])
    array.append(rows[3:])
    array.close()
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), rows)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy", mmap_mode="r"), rows)
    with pytest.raises(ValueError, match="rows"):
        GrowingNpy(tmp_path / "b.npy", (5, 3), np.float32).append(rows[:, :4])


def test_reservoir_is_bounded_and_uniform():
    capacity, total = 100, 10_000
    hits = np.zeros(total)
    for seed in range(200):
        reservoir = Reservoir(capacity, seed)
        for start in range(0, total, 700):  # uneven batches
            index = np.arange(start, min(total, start + 700))
            reservoir.add(
                np.repeat(index[:, None], 3, 1).astype(np.float32),
                np.zeros((len(index), 3), np.uint8),
            )
        points, _ = reservoir.sample()
        assert len(points) == capacity and len(np.unique(points[:, 0])) == capacity
        hits[points[:, 0].astype(int)] += 1
    # each row is kept with probability capacity / total = 1%: first and last tenth alike
    first, last = hits[:1000].mean(), hits[-1000:].mean()
    assert first == pytest.approx(2.0, rel=0.15) and last == pytest.approx(2.0, rel=0.15)
    small = Reservoir(10, 0)
    small.add(np.ones((3, 3), np.float32), np.ones((3, 3), np.uint8))
    assert len(small.sample()[0]) == 3


def test_estimate_focal_recovers_a_pinhole():
    height, width, focal = 12, 16, 20.0
    ys, xs = torch.meshgrid(
        torch.arange(height) - (height - 1) / 2,
        torch.arange(width) - (width - 1) / 2,
        indexing="ij",
    )
    depth = 2.0 + torch.rand(height, width)
    points = torch.stack([xs * depth / focal, ys * depth / focal, depth], -1)
    assert estimate_focal(points) == pytest.approx(focal, rel=1e-6)
    assert estimate_focal(torch.full((4, 4, 3), float("nan"))) is None


def test_stream_warns_nothing_for_same_sized_frames(tmp_path):
    folder = _folder(tmp_path, _frames(count=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list(infer.open_frames(folder))) == 2

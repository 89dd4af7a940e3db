"""Synthetic video: geometry consistent with the cameras, masks with depth, same seed same bytes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from post3r_data import SynthConfig, find_shards, generate_synthetic_dataset, make_train_loader
from post3r_data.render import render
from post3r_data.synth import render_videos, sample_scenes
from post3r_data.synth_cli import main

SIZE, FRAMES = 24, 3


@pytest.fixture(scope="module")
def videos() -> list[dict]:
    return render_videos(seed=3, split="train", indices=[0, 1, 2, 3], size=SIZE, frames=FRAMES)


def unproject(depth: np.ndarray, intrinsics: np.ndarray, cam_to_world: np.ndarray) -> np.ndarray:
    """World points of every pixel: X = R K^-1 [u, v, 1] z + t (pixel centres at integers)."""
    v, u = np.mgrid[0 : depth.shape[1], 0 : depth.shape[2]]
    pixels = np.stack([u, v, np.ones_like(u)], -1).astype(np.float64)  # (H, W, 3)
    rays = pixels @ np.linalg.inv(intrinsics[0].astype(np.float64)).T
    camera = rays[None] * depth[..., None]  # (T, H, W, 3)
    rotation, translation = cam_to_world[:, :3, :3], cam_to_world[:, :3, 3]
    return np.einsum("tij,thwj->thwi", rotation, camera) + translation[:, None, None]


def test_shard_layout_and_dtypes(videos):
    video = videos[0]
    assert video["video"].shape == (FRAMES, SIZE, SIZE, 3) and video["video"].dtype == np.uint8
    assert (
        video["segmentations"].shape == (FRAMES, SIZE, SIZE, 1)
        and video["segmentations"].dtype == np.uint8
    )
    assert video["depth"].shape == (FRAMES, SIZE, SIZE) and video["depth"].dtype == np.float32
    assert (
        video["pointmap"].shape == (FRAMES, SIZE, SIZE, 3) and video["pointmap"].dtype == np.float32
    )
    assert video["camera_to_world"].shape == (FRAMES, 4, 4) and video["intrinsics"].shape == (
        FRAMES,
        3,
        3,
    )
    for v in videos:
        ids = np.unique(v["segmentations"])
        assert 3 <= v["meta"]["num_objects"] <= 6
        assert set(ids) <= set(range(v["meta"]["num_objects"] + 1)) and 0 in ids and len(ids) >= 3


def test_unprojected_depth_is_the_stored_pointmap(videos):
    for video in videos:
        points = unproject(video["depth"], video["intrinsics"], video["camera_to_world"])
        np.testing.assert_allclose(points, video["pointmap"], atol=1e-4 * video["depth"].max())
        assert (video["depth"] > 0).all()


def test_camera_axes_follow_opencv(videos):
    pose = videos[0]["camera_to_world"][0].astype(np.float64)
    rotation = pose[:3, :3]
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(3), atol=1e-6)
    assert np.linalg.det(rotation) == pytest.approx(1.0, abs=1e-6)
    assert rotation[2, 2] < 0  # z (forward) looks down at the ground
    assert rotation[2, 1] < 0  # y (down in the image) points down in the world
    assert abs(rotation[2, 0]) < 1e-6  # x (right) is level: no camera roll
    # The ground (world z = 0) is where the stored pointmap says it is.
    ground = videos[0]["segmentations"][..., 0] == 0
    assert np.abs(videos[0]["pointmap"][..., 2][ground]).max() < 1e-4


def test_masks_agree_with_depth_ordering():
    scenes = sample_scenes(seed=5, split="train", indices=[0, 1], size=SIZE, frames=FRAMES)
    full = render(scenes)
    label, depth = full["segmentation"].long(), full["depth"]
    objects = scenes.present.shape[1]
    for k in range(objects):
        keep = torch.zeros_like(scenes.present)
        keep[:, k] = True
        alone = render(scenes.only(keep))  # object k over the ground, nothing else
        visible_alone, shown = alone["segmentation"] > 0, label == k + 1
        assert torch.equal(shown, shown & visible_alone)
        # Where object k is shown its own depth is the depth; where it is hidden, something
        # strictly nearer covers it; and nowhere is it nearer than what the full render shows.
        assert torch.equal(alone["depth"][shown], depth[shown])
        hidden = visible_alone & ~shown
        assert (depth[hidden] < alone["depth"][hidden]).all()
        assert (alone["depth"] >= depth).all()
    assert (label > 0).any() and (label == 0).any()


def test_crowded_scenes_keep_every_object_drawn():
    # Objects that found no room used to be dropped: most 8-object scenes had 5 to 7.
    crowded = SynthConfig(min_objects=8, max_objects=8)
    scenes = sample_scenes(
        seed=0, split="train", indices=range(6), size=8, frames=8, config=crowded
    )
    assert (scenes.present.sum(dim=1) == 8).all()


def test_long_videos_keep_objects_in_view():
    # At 96 frames the camera of video 3 used to drive into the arena (a render error) and
    # that of video 13 to drift away from the objects for 11 frames.
    for video in render_videos(seed=0, split="train", indices=[3, 13], size=8, frames=96):
        assert (video["segmentations"] > 0).any(axis=(1, 2, 3)).all()


def test_same_seed_same_bytes_any_grouping(tmp_path):
    one = render_videos(seed=11, split="validation", indices=[4], size=SIZE, frames=FRAMES)[0]
    grouped = render_videos(  # in a group
        seed=11, split="validation", indices=[2, 3, 4], size=SIZE, frames=FRAMES
    )[2]
    for name in ("video", "segmentations", "depth", "pointmap", "camera_to_world"):
        assert np.array_equal(one[name], grouped[name]), name
    # The renderer itself with 1 and 2 threads (tensors above torch's parallel grain size).
    scenes = sample_scenes(seed=11, split="validation", indices=[2, 3, 4], size=32, frames=FRAMES)
    threads, outputs = torch.get_num_threads(), []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            outputs.append(render(scenes))
    finally:
        torch.set_num_threads(threads)
    for name, value in outputs[0].items():
        assert torch.equal(value, outputs[1][name]), name
    a = generate_synthetic_dataset(
        tmp_path / "a", 5, SIZE, FRAMES, seed=1, videos_per_shard=3, progress=False
    )
    b = generate_synthetic_dataset(
        tmp_path / "b", 5, SIZE, FRAMES, seed=1, videos_per_shard=3, progress=False, workers=2
    )
    c = generate_synthetic_dataset(
        tmp_path / "c", 5, SIZE, FRAMES, seed=2, videos_per_shard=3, progress=False
    )
    names = [p.name for p in sorted((tmp_path / "a").glob("*.tar"))]
    assert names == [
        "synthetic-train-000000.tar",
        "synthetic-train-000001.tar",
        "synthetic-validation-000000.tar",
    ]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    assert a.splits["train"].videos == 5 and a.splits["validation"].videos == 1
    assert a.splits["train"].frames == 5 * FRAMES and a.rendered_videos == 6
    assert b.splits == a.splits and c.splits["train"].videos == 5


def test_rerun_keeps_shards_and_refuses_other_settings(tmp_path):
    out = tmp_path / "synthetic"
    generate_synthetic_dataset(out, 4, SIZE, FRAMES, seed=0, videos_per_shard=2, progress=False)
    first = out / "synthetic-train-000000.tar"
    stamp = first.stat().st_mtime_ns
    again = generate_synthetic_dataset(
        out, 4, SIZE, FRAMES, seed=0, videos_per_shard=2, progress=False
    )
    assert again.rendered_videos == 0 and first.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="other settings"):
        generate_synthetic_dataset(out, 4, SIZE, FRAMES, seed=1, videos_per_shard=2, progress=False)
    (out / "synthetic-info.json").write_text("")  # e.g. lost in a crash
    with pytest.raises(ValueError, match=r"synthetic-info.json is unreadable .*--overwrite"):
        generate_synthetic_dataset(out, 4, SIZE, FRAMES, seed=0, videos_per_shard=2, progress=False)
    redone = generate_synthetic_dataset(
        out, 2, SIZE, FRAMES, seed=1, overwrite=True, progress=False
    )
    assert redone.rendered_videos == 3 and len(find_shards(out, "synthetic", "train")) == 1
    info = json.loads((out / "synthetic-info.json").read_text())
    assert info["complete"] and info["settings"]["seed"] == 1


def test_loader_adjusts_intrinsics_for_crop_and_resize(tmp_path):
    out = tmp_path / "synthetic"
    generate_synthetic_dataset(out, 3, 32, FRAMES, seed=4, videos_per_shard=3, progress=False)
    loader = make_train_loader(
        find_shards(out, "synthetic", "train"),
        batch_size=2,
        chunk_size=2,
        resolution=12,
        crop_scale=(0.5, 0.9),
        steps_per_epoch=3,
    )
    for batch in loader:
        assert batch["pointmap"].shape == (2, 2, 12, 12, 3) and batch["depth"].shape == (
            2,
            2,
            12,
            12,
        )
        # Project the stored world points with the adjusted camera: each lands on its own pixel,
        # up to half a source pixel (nearest sampling), i.e. half the resize factor.
        world_to_camera = torch.linalg.inv(batch["camera_to_world"].double())
        points = batch["pointmap"].double()
        camera = torch.einsum("btij,bthwj->bthwi", world_to_camera[..., :3, :3], points)
        camera = camera + world_to_camera[..., None, None, :3, 3]
        # (numpy's check: torch.testing's first call imports torch.distributed, ~4 s)
        np.testing.assert_allclose(camera[..., 2], batch["depth"].double(), rtol=1e-5, atol=1e-5)
        pixels = torch.einsum("btij,bthwj->bthwi", batch["intrinsics"].double(), camera)
        u, v = pixels[..., 0] / pixels[..., 2], pixels[..., 1] / pixels[..., 2]
        grid_v, grid_u = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
        scale = batch["intrinsics"][:, :, 0, 0] / (32 / 2 / np.tan(np.radians(25)))  # resize factor
        bound = 0.5 * scale[..., None, None].double() + 1e-3
        assert ((u - grid_u).abs() <= bound).all() and ((v - grid_v).abs() <= bound).all()
        assert (scale < 1).all()  # crops of 16 to 29 pixels were shrunk to 12


def test_config_and_cli_validate_and_report(tmp_path, capsys):
    with pytest.raises(ValueError, match="min_objects <= max_objects"):
        SynthConfig(min_objects=4, max_objects=2)
    with pytest.raises(ValueError, match="shapes must be"):
        SynthConfig(shapes=("cone",))
    easy = SynthConfig(
        min_objects=2, max_objects=2, shapes=("sphere",), textures=False, camera_motion=0
    )
    video = render_videos(0, "train", [0], SIZE, FRAMES, easy)[0]
    assert video["meta"]["num_objects"] == 2
    assert {o["shape"] for o in video["meta"]["objects"]} == {"sphere"}
    assert {o["pattern"] for o in video["meta"]["objects"]} == {"solid"}
    np.testing.assert_array_equal(video["camera_to_world"][0], video["camera_to_world"][-1])
    args = ["--output", str(tmp_path / "s"), "--videos", "3", "--size", str(SIZE), "--frames", "2"]
    assert main([*args, "--workers", "2", "--max-objects", "4"]) == 0
    printed = capsys.readouterr().out
    assert "train: 3 videos, 6 frames" in printed and "videos/s" in printed
    with pytest.raises(SystemExit):
        main([*args, "--min-objects", "0"])
    assert "min_objects" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # was accepted and wrote no validation split
        main([*args, "--val-videos", "-1"])
    assert "num_val_videos must be >= 0, got -1" in capsys.readouterr().err


def test_cli_refuses_a_huge_size_and_reports_os_errors_in_one_line(tmp_path, capsys, monkeypatch):
    args = ["--output", str(tmp_path / "s"), "--videos", "3", "--frames", "2", "--workers", "1"]
    with pytest.raises(SystemExit):
        main([*args, "--size", "100000"])
    assert "size 100000 is beyond 4096 pixels" in capsys.readouterr().err
    import errno

    from post3r_data import shards

    real_write = shards.write_shard
    calls = []

    def fill_disk_on_second_shard(path, samples):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, samples)

    monkeypatch.setattr(shards, "write_shard", fill_disk_on_second_shard)
    import post3r_data.synth as synth_module

    monkeypatch.setattr(synth_module, "write_shard", fill_disk_on_second_shard, raising=False)
    sized = [*args, "--size", str(SIZE), "--videos-per-shard", "1"]
    assert main(sized) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("error: ") and "No space left" in last
    assert "shards finished so far are kept" in last
    monkeypatch.undo()
    assert main(sized) == 0  # the rerun writes only what is missing

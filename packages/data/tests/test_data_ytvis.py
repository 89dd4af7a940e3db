"""YouTube-VIS conversion: a tiny fake download is converted and read back exactly."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from post3r_data import find_shards, make_val_loader
from post3r_data import ytvis as ytvis_module
from post3r_data.shards import decode_npy
from post3r_data.ytvis import BadVideoError, convert_ytvis
from post3r_data.ytvis_cli import main

# pycocotools' own NumPy 2 deprecation notice, raised where the test decodes its polygons.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")

SIZE = 20  # short side after conversion; the fake videos have a short side of 40


def _frame(seed: int, height: int, width: int) -> np.ndarray:
    """A smooth random image (JPEG-friendly) so the resize has something to filter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (height + width)], -1)
    return np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)


def _rle(mask: np.ndarray, style: str):
    """Encode a 0/1 mask as YT-VIS does: compressed RLE, uncompressed RLE or a polygon."""
    if style == "compressed":
        rle = coco_mask.encode(np.asfortranarray(mask))
        return {"size": rle["size"], "counts": rle["counts"].decode()}
    if style == "uncompressed":
        flat = mask.flatten(order="F")
        changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
        counts = np.diff(np.concatenate([[0], changes])).tolist()
        return {"size": list(mask.shape), "counts": counts}
    raise ValueError(style)


def make_fake_ytvis(root: Path) -> dict:
    """Five videos: overlapping objects, absent objects (null), a portrait video, no objects.

    Returns the ground truth: per video id, its frames and its (T, H, W, I) category masks.
    """
    specs = [  # (id, name, height, width, frames, objects)
        (11, "aaa", 40, 60, 3, [(5, "compressed", None), (7, "uncompressed", 1)]),
        (12, "bbb", 60, 40, 4, [(3, "compressed", None)]),
        (13, "ccc", 40, 40, 2, []),
        (14, "ddd", 40, 80, 3, [(2, "compressed", 0), (9, "compressed", None)]),
        (15, "eee", 40, 60, 3, [(4, "polygon", None)]),
    ]
    truth, videos, annotations = {}, [], []
    for vid, name, height, width, frames, objects in specs:
        folder = root / "train" / "JPEGImages" / name
        folder.mkdir(parents=True)
        files = []
        for t in range(frames):
            Image.fromarray(_frame(vid * 10 + t, height, width)).save(
                folder / f"{t:05d}.jpg", quality=95
            )
            files.append(f"{name}/{t:05d}.jpg")
        videos.append(
            {"id": vid, "width": width, "height": height, "length": frames, "file_names": files}
        )
        masks = np.zeros((frames, height, width, max(1, len(objects))), np.uint8)
        for i, (category, style, absent_frame) in enumerate(objects):
            segmentations = []
            for t in range(frames):
                if t == absent_frame:
                    segmentations.append(None)
                    continue
                m = np.zeros((height, width), np.uint8)
                top, left = 5 + 3 * t + 2 * i, 4 + 5 * i  # objects i=0 and i=1 overlap
                if style == "polygon":
                    r0, c0, r1, c1 = top, left, top + 12, left + 16
                    segmentations.append([[c0, r0, c1, r0, c1, r1, c0, r1]])
                    m = coco_mask.decode(
                        coco_mask.merge(coco_mask.frPyObjects(segmentations[-1], height, width))
                    )
                else:
                    m[top : top + 15, left : left + 20] = 1
                    segmentations.append(_rle(m, style))
                masks[t, :, :, i] = m * category
            annotations.append(
                {
                    "id": 100 * vid + i,
                    "video_id": vid,
                    "category_id": category,
                    "iscrowd": 0,
                    "segmentations": segmentations,
                }
            )
        truth[vid] = masks
    annotations.append(  # crowd annotations are ignored, as in SlotContrast
        {"id": 999, "video_id": 11, "category_id": 1, "iscrowd": 1, "segmentations": [None] * 3}
    )
    (root / "train" / "instances.json").write_text(
        json.dumps({"videos": videos, "annotations": annotations, "categories": []})
    )
    return truth


def read_shards(paths: list[str]) -> dict[str, dict]:
    samples = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar:
                key, field = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                value = json.loads(data) if field == "meta.json" else decode_npy(data)
                samples.setdefault(key, {})[field] = value
    return samples


def expected_frames(root: Path, name: str, frames: int, out_hw: tuple[int, int]) -> np.ndarray:
    images = []
    for t in range(frames):
        with Image.open(root / "train" / "JPEGImages" / name / f"{t:05d}.jpg") as image:
            image = image.convert("RGB")
            images.append(np.asarray(image.resize(out_hw[::-1], Image.Resampling.BILINEAR)))
    return np.stack(images)


def nearest_oracle(masks: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Independent nearest resize: torch's 'nearest-exact' (pixel-centre sampling)."""
    x = torch.from_numpy(masks).permute(0, 3, 1, 2).float()
    return (
        torch.nn.functional.interpolate(x, size=out_hw, mode="nearest-exact")
        .permute(0, 2, 3, 1)
        .byte()
        .numpy()
    )


@pytest.fixture
def fake_root(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "raw"
    return root, make_fake_ytvis(root)


def test_convert_and_read_back_exactly(fake_root, tmp_path):
    root, truth = fake_root
    out = tmp_path / "shards"
    result = convert_ytvis(root, out, size=SIZE, videos_per_shard=2, val_videos=2, progress=False)
    train, val = find_shards(out, "ytvis", "train"), find_shards(out, "ytvis", "val")
    assert [Path(p).name for p in train] == ["ytvis-train-000000.tar", "ytvis-train-000001.tar"]
    assert [Path(p).name for p in val] == ["ytvis-validation-000000.tar"]
    samples = read_shards(train + val)
    assert set(samples) == {"11", "12", "13", "14", "15"}
    assert set(read_shards(val)) == {"14", "15"}  # validation = the last two videos
    names = {11: "aaa", 12: "bbb", 13: "ccc", 14: "ddd", 15: "eee"}
    for vid, masks in truth.items():
        sample = samples[str(vid)]
        frames, height, width = masks.shape[:3]
        out_hw = ytvis_module.resized_shape(height, width, SIZE)
        assert min(out_hw) == SIZE
        np.testing.assert_array_equal(
            sample["video.npy"], expected_frames(root, names[vid], frames, out_hw)
        )
        assert sample["segmentations.npy"].dtype == np.uint8
        np.testing.assert_array_equal(sample["segmentations.npy"], nearest_oracle(masks, out_hw))
        assert sample["meta.json"]["original_size"] == [height, width]
    # Absent frames are empty, overlapping objects keep both channels.
    seg = samples["11"]["segmentations.npy"]
    assert seg[1, :, :, 1].max() == 0 and seg[0, :, :, 1].max() == 7
    assert ((seg[..., 0] > 0) & (seg[..., 1] > 0)).any()
    assert samples["13"]["segmentations.npy"].shape[-1] == 1  # no objects: one empty channel
    summary = result.splits["train"] + result.splits["validation"]
    assert (summary.videos, summary.frames, summary.objects) == (5, 15, 6)
    assert summary.bytes == sum(Path(p).stat().st_size for p in train + val)
    info = json.loads((out / "ytvis-info.json").read_text())
    assert info["settings"]["size"] == SIZE and info["splits"]["train"]["videos"] == 3


def test_loader_reads_converted_masks_as_instance_ids(fake_root, tmp_path):
    root, truth = fake_root
    out = tmp_path / "shards"
    convert_ytvis(
        root, out, size=SIZE, videos_per_shard=1, val_videos=1, splits=["train"], progress=False
    )
    batches = {
        b["key"][0]: b for b in make_val_loader(find_shards(out, "ytvis", "train"), resolution=SIZE)
    }
    assert set(batches) == {"11", "12", "13", "14"}
    ids = batches["11"]["segmentations"][0].numpy()  # (T, 20, 20) after the centre crop
    # Both objects of video 11 keep distinct ids and pixels claimed by both become 0.
    resized = nearest_oracle(truth[11], (SIZE, 30))[:, :, 5:25]
    only_first = (resized[..., 0] > 0) & (resized[..., 1] == 0)
    only_second = (resized[..., 1] > 0) & (resized[..., 0] == 0)
    both = (resized[..., 0] > 0) & (resized[..., 1] > 0)
    assert (ids[only_first] == 1).all() and (ids[only_second] == 2).all() and (ids[both] == 0).all()
    assert both.any() and (ids[~(only_first | only_second)] == 0).all()


def test_interrupted_conversion_resumes_without_redoing_shards(fake_root, tmp_path, monkeypatch):
    root, _ = fake_root
    out = tmp_path / "shards"
    real = ytvis_module.convert_video
    calls = []

    def interrupt_on_third(task):
        calls.append(task.video["id"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(ytvis_module, "convert_video", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        convert_ytvis(
            root, out, size=SIZE, videos_per_shard=2, val_videos=2, splits=["train"], progress=False
        )
    first = out / "ytvis-train-000000.tar"
    assert first.exists() and not (out / "ytvis-train-000001.tar").exists()
    assert not list(out.glob("*.tmp"))  # the unfinished shard left nothing behind
    assert json.loads((out / "ytvis-info.json").read_text())["complete"] is False
    before = first.stat().st_mtime_ns, first.read_bytes()

    calls.clear()
    monkeypatch.setattr(
        ytvis_module, "convert_video", lambda task: calls.append(task.video["id"]) or real(task)
    )
    result = convert_ytvis(
        root, out, size=SIZE, videos_per_shard=2, val_videos=2, splits=["train"], progress=False
    )
    assert calls == [13]  # only the video of the unfinished shard
    assert result.kept_shards == 1 and result.splits["train"].videos == 3
    assert (first.stat().st_mtime_ns, first.read_bytes()) == before
    assert json.loads((out / "ytvis-info.json").read_text())["complete"] is True

    with pytest.raises(ValueError, match="other settings"):
        convert_ytvis(root, out, size=SIZE + 2, videos_per_shard=2, val_videos=2, progress=False)


def _break(root: Path, what: str) -> None:
    frames = root / "train" / "JPEGImages" / "bbb"
    if what == "missing frame":
        (frames / "00002.jpg").unlink()
    elif what == "corrupt jpeg":
        (frames / "00001.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    elif what in ("frame count", "no category"):
        path = root / "train" / "instances.json"
        content = json.loads(path.read_text())
        annotation = next(a for a in content["annotations"] if a["video_id"] == 12)
        if what == "frame count":
            annotation["segmentations"].pop()
        else:
            del annotation["category_id"]
        path.write_text(json.dumps(content))


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("missing frame", "00002.jpg is missing"),
        ("corrupt jpeg", "cannot decode"),
        ("frame count", "3 masks for 4 frames"),
        ("no category", "category id None outside 1..255"),
    ],
)
def test_bad_video_is_named_or_skipped(fake_root, tmp_path, what, message):
    root, _ = fake_root
    _break(root, what)
    with pytest.raises(BadVideoError, match=rf"video 12 \(bbb\): .*{message}.*--skip-bad"):
        convert_ytvis(root, tmp_path / "a", size=SIZE, val_videos=2, progress=False)
    result = convert_ytvis(
        root, tmp_path / "b", size=SIZE, val_videos=2, skip_bad=True, progress=False
    )
    assert [(s["video_id"], s["name"]) for s in result.skipped] == [(12, "bbb")]
    assert message in result.skipped[0]["reason"]
    assert result.splits["train"].videos == 2  # 11 and 13 remain


def test_bad_video_is_named_or_skipped_with_worker_processes(fake_root, tmp_path):
    # The error crosses the process boundary (it must pickle, or the pool breaks).
    root, _ = fake_root
    _break(root, "corrupt jpeg")
    with pytest.raises(BadVideoError, match=r"video 12 \(bbb\): .*cannot decode"):
        convert_ytvis(root, tmp_path / "a", size=SIZE, val_videos=2, workers=2, progress=False)
    result = convert_ytvis(
        root, tmp_path / "b", size=SIZE, val_videos=2, workers=2, skip_bad=True, progress=False
    )
    assert [(s["video_id"], s["name"]) for s in result.skipped] == [(12, "bbb")]
    assert result.splits["train"].videos == 2


def test_cli_reports_a_full_disk_in_one_line_and_a_rerun_finishes(fake_root, tmp_path, capsys):
    import errno

    from post3r_data import ytvis

    root, _ = fake_root
    args = ["--input", str(root), "--output", str(tmp_path / "o"), "--size", str(SIZE)]
    args += ["--val-videos", "2", "--videos-per-shard", "1", "--workers", "1"]
    real_write, calls = ytvis.write_shard, []

    def fill_disk_on_second_shard(path, samples):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, samples)

    ytvis.write_shard = fill_disk_on_second_shard
    try:
        assert main(args) == 1
    finally:
        ytvis.write_shard = real_write
    err = capsys.readouterr().err
    assert "Traceback" not in err and "No space left on device" in err
    assert "shards finished so far are kept" in err
    assert main(args) == 0
    assert "kept 1 finished shards" in capsys.readouterr().out


def test_cli_reports_missing_input_and_summary(fake_root, tmp_path, capsys):
    assert main(["--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")]) == 1
    assert "instances.json" in capsys.readouterr().err
    (tmp_path / "odd" / "train").mkdir(parents=True)
    (tmp_path / "odd" / "train" / "instances.json").write_text('{"videos": [{"name": "x"}]}')
    assert main(["--input", str(tmp_path / "odd"), "--output", str(tmp_path / "o")]) == 1
    assert "is not a YouTube-VIS instances file (KeyError: 'id')" in capsys.readouterr().err
    root, _ = fake_root
    args = ["--input", str(root), "--output", str(tmp_path / "o"), "--size", str(SIZE)]
    assert main([*args, "--val-videos", "2", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "train: 3 videos, 9 frames, 3 objects" in printed
    assert "validation: 2 videos, 6 frames, 3 objects" in printed
    # Two worker processes write the same bytes as one.
    convert_ytvis(root, tmp_path / "one", size=SIZE, val_videos=2, workers=1, progress=False)
    names = sorted(p.name for p in (tmp_path / "o").glob("*.tar"))
    assert names == sorted(p.name for p in (tmp_path / "one").glob("*.tar")) and len(names) == 2
    for name in names:
        assert (tmp_path / "o" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


def test_frame_filters_against_independent_oracles(fake_root, tmp_path):
    """Video 15 is 40 x 60, halved to 20 x 30: the area filter averages 2 x 2 blocks, and the
    bilinear one matches torch's antialiased bilinear; both within the rounding of PIL's
    separable passes."""
    root, _ = fake_root
    source = np.stack(
        [np.asarray(Image.open(root / "train/JPEGImages/eee" / f"{t:05d}.jpg")) for t in range(3)]
    ).astype(np.float64)
    blocks = source.reshape(3, 20, 2, 30, 2, 3).mean(axis=(2, 4))
    smooth = torch.nn.functional.interpolate(
        torch.from_numpy(source).permute(0, 3, 1, 2), size=(20, 30), mode="bilinear", antialias=True
    )
    oracles = {"area": blocks, "bilinear": smooth.permute(0, 2, 3, 1).numpy()}
    for resample, oracle in oracles.items():
        out = tmp_path / resample
        convert_ytvis(
            root, out, size=SIZE, val_videos=1, splits=["val"], resample=resample, progress=False
        )
        frames = read_shards(find_shards(out, "ytvis", "validation"))["15"]["video.npy"]
        assert np.abs(frames - oracle).max() <= 1.0, resample
    with pytest.raises(ValueError, match="unknown split 'test'"):
        convert_ytvis(root, tmp_path / "x", size=SIZE, splits=["test"], progress=False)

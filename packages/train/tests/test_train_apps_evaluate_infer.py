"""apps/evaluate, apps/infer and apps/bench-train on the smoke run."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from train_model_runs import call, smoke_run

from post3r_train import bench_train, evaluate, infer
from post3r_train.visualize import read_ply


def test_evaluate_prints_a_table_and_writes_json(tmp_path):
    run = smoke_run()
    output = tmp_path / "metrics.json"
    code, out, err = call(evaluate.main, [str(run.run_dir), "--output", str(output)])
    assert code == 0, err
    report = json.loads(output.read_text())
    metrics = report["metrics"]
    assert report["checkpoint"].endswith("last.ckpt")
    for name in ("ari", "mbo", "image_ari", "pointmap_ari", "object_point_error"):
        assert f"val/{name}" in metrics
        assert f"{name} " in out
    # The same checkpoint gives the same figures as the run's own last validation.
    import csv

    with open(run.run_dir / "logs" / "metrics" / "metrics.csv") as handle:
        last = [r for r in csv.DictReader(handle) if r["val/ari"]][-1]
    assert metrics["val/ari"] == pytest.approx(float(last["val/ari"]), abs=1e-6)


def test_evaluate_a_missing_checkpoint_is_a_clear_error(tmp_path):
    code, _, err = call(evaluate.main, [str(tmp_path / "nothing")])
    assert code == 1 and "nothing" in err


def _frames(count=5, size=40):
    rng = np.random.default_rng(0)
    frames = []
    for t in range(count):
        image = np.full((size, size + 8, 3), 90, np.uint8)
        image[8 + t : 20 + t, 10:22] = (230, 40, 40)
        image[24:34, 26 - t : 38 - t] = (40, 200, 60)
        frames.append(np.clip(image + rng.integers(0, 10, image.shape), 0, 255).astype(np.uint8))
    return frames


def _check_outputs(folder: Path, count: int):
    import av

    with av.open(str(folder / "masks.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == count
    objects = sorted((folder / "objects").glob("slot*.mp4"))
    assert objects
    with Image.open(folder / "overlay.gif") as gif:
        assert gif.n_frames == count
    ids = np.load(folder / "masks.npy")
    assert ids.shape == (count, 32, 32) and ids.dtype == np.uint8
    clouds = sorted((folder / "points").glob("video_slot[0-9].ply"))
    assert clouds
    total = sum(len(read_ply(p)[0]) for p in clouds)
    assert total == count * 16 * 16  # every decoder pixel lands in exactly one slot's cloud


def test_infer_on_a_folder_of_frames(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for index, frame in enumerate(_frames()):
        Image.fromarray(frame).save(folder / f"{index:04d}.png")
    out_dir = tmp_path / "out"
    code, _, err = call(
        infer.main,
        [str(smoke_run().run_dir), str(folder), "--output", str(out_dir), "--chunk-size", "2"],
    )
    assert code == 0, err
    _check_outputs(out_dir, 5)


def test_infer_on_a_video_file(tmp_path):
    import av

    video = tmp_path / "clip.mp4"
    with av.open(str(video), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 48, 40, "yuv420p"
        for frame in _frames(count=4):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    code, _, err = call(
        infer.main, [str(smoke_run().run_dir), str(video), "--output", str(tmp_path / "o")]
    )
    assert code == 0, err
    _check_outputs(tmp_path / "o", 4)


def test_infer_streaming_in_clips_matches_one_pass():
    from post3r_train.runs import load_run

    _, model, _ = load_run(smoke_run().run_dir)
    frames = infer.to_tensor([Image.fromarray(f) for f in _frames(count=4)], model.image_size)
    whole = infer.run_model(model, frames, chunk=4, device=torch.device("cpu"))
    pieces = infer.run_model(model, frames, chunk=1, device=torch.device("cpu"))
    for key in whole:
        torch.testing.assert_close(pieces[key], whole[key], rtol=1e-4, atol=1e-5)


def test_infer_bad_input_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = call(infer.main, [str(smoke_run().run_dir), str(tmp_path / "empty")])
    assert code == 1 and "holds no images" in err
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 100)
    code, _, err = call(infer.main, [str(smoke_run().run_dir), str(tmp_path / "broken.mp4")])
    assert code == 1 and "broken.mp4" in err


def test_bench_train_prints_a_table():
    code, out, err = call(
        bench_train.main, ["--config", "smoke", "--device", "cpu", "--steps", "1", "--warmup", "0"]
    )
    assert code == 0, err
    header, _, row = out.strip().splitlines()[1:4]
    assert "steps/s" in header and "peak" in header
    assert row.startswith("smoke") and float(row.split()[-5]) > 0

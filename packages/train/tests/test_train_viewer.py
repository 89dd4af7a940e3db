"""apps/view: the viser scene built from an infer output, its controls, the server's life."""

import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from train_model_runs import call, smoke_run

from post3r_train import infer, viewer
from post3r_train.infer_writer import read_manifest

viser = pytest.importorskip("viser", reason="the viewer extra (post3r-train[viewer])")


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    root = tmp_path_factory.mktemp("view")
    folder = root / "frames"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for t in range(4):
        image = np.full((40, 48, 3), 90, np.uint8)
        image[8 + t : 20 + t, 10:22] = (230, 40, 40)
        image[24:34, 26 - t : 38 - t] = (40, 200, 60)
        image = np.clip(image + rng.integers(0, 10, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{t:04d}.png")
    code, _, err = call(
        infer.main, [str(smoke_run().run_dir), str(folder), "--output", str(root / "out"), "-q"]
    )
    assert code == 0, err
    return root / "out"


@pytest.fixture
def running(output):
    server, view = viewer.start(output, port=viewer.free_port())
    yield server, view
    view.close()
    server.stop()


def test_the_scene_has_a_cloud_per_used_slot_in_its_colour(running, output):
    _, view = running
    manifest = read_manifest(output)
    assert sorted(view.clouds) == sorted({*manifest["used_slots"], *manifest["point_slots"]})
    assert view.data.num_frames == 4 and view.frame.max == 3
    palette = np.asarray(manifest["palette"], np.uint8)
    xyz, slot, _ = view.visible_points()
    assert len(xyz) == 16 * 16  # frame 0: every decoder pixel, once
    for k, cloud in view.clouds.items():
        if cloud.visible:
            assert (np.asarray(cloud.colors) == palette[k]).all()
            assert len(cloud.points) == int((slot == k).sum())


def test_toggles_change_what_is_visible(running):
    _, view = running
    k = next(k for k, c in view.clouds.items() if c.visible)
    total = len(view.visible_points()[0])
    view.slot_boxes[k].value = False  # the checkbox hides the slot
    assert not view.clouds[k].visible
    assert k not in set(view.visible_points()[1].tolist())
    assert len(view.visible_points()[0]) < total
    view.slot_boxes[k].value = True
    view.isolate.value = f"slot {k}"  # isolate: only that slot
    assert [c for c, cloud in view.clouds.items() if cloud.visible] == [k]
    assert set(view.visible_points()[1].tolist()) == {k}
    view.isolate.value = viewer.ALL
    view.accumulate.value = True
    view.frame.value = 3
    assert len(view.visible_points()[0]) == 4 * 16 * 16  # frames 0..3
    view.color_mode.value = "frame RGB"
    view.frame.value = 1  # the frustum follows the slider
    np.testing.assert_allclose(view.frustum.position, view.data.poses[1][:3, 3], atol=1e-6)


def test_export_writes_the_visible_points_as_ply(running, tmp_path):
    from post3r_train.visualize import read_ply

    _, view = running
    xyz, slot, _ = view.visible_points()
    path = tmp_path / "visible.ply"
    path.write_bytes(viewer.ply_bytes(xyz, view.colors[slot]))
    points, colors = read_ply(path)
    np.testing.assert_allclose(points, xyz)
    assert (colors == view.colors[slot]).all()


def test_the_server_serves_its_client_and_stops(output):
    port = viewer.free_port()
    server, view = viewer.start(output, port=port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.status == 200 and b"<html" in response.read().lower()
    finally:
        view.close()
        server.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)


def test_a_run_directory_opens_its_latest_validation_video():
    folder = viewer.find_output(smoke_run().run_dir)
    assert folder.parent.name == "step=000004" and folder.name == "video0"


def test_bad_outputs_are_clear_errors(tmp_path):
    code, _, err = call(viewer.main, [str(tmp_path / "nothing")])
    assert code == 1 and "no such infer output" in err
    code, _, err = call(viewer.main, [str(tmp_path)])
    assert code == 1 and "run apps/infer" in err
    code, _, err = call(viewer.main, [str(tmp_path), "--port", "0"])
    assert code == 1 and "--port" in err


def test_render_writes_an_orbit_video_and_gif_with_a_legend(output, tmp_path):
    import av

    from post3r_train import render_cli

    out = tmp_path / "orbit.mp4"
    args = [str(output), "--orbit", "--out", str(out), "--frames", "6", "--height", "64", "-q"]
    code, printed, err = call(render_cli.main, args)
    assert code == 0, err
    assert str(out) in printed
    with av.open(str(out)) as container:
        images = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(images) == 6 and images[0].shape == (64, 76, 3)  # the input's 48:40 aspect
    with Image.open(out.with_suffix(".gif")) as gif:  # PIL merges identical frames: count time
        total = 0
        for index in range(gif.n_frames):
            gif.seek(index)
            total += gif.info["duration"]
        assert abs(total - 6 * 1000 / 24) <= 6 * 10  # GIF durations are whole 10 ms
    # something was drawn besides the background and the legend
    assert (np.abs(images[0][30:, :].astype(int) - (24, 24, 28)).sum(-1) > 60).any()
    code, _, err = call(render_cli.main, [str(output), "--out", str(tmp_path / "t.mp4"), "-q"])
    assert code == 0, err  # along the pulled-back trajectory: one frame per input frame
    with av.open(str(tmp_path / "t.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 4
    code, _, err = call(render_cli.main, [str(output), "--out", str(tmp_path / "x.avi")])
    assert code == 1 and ".mp4" in err


def test_a_missing_viser_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "viser", None)  # import viser now raises ImportError
    with pytest.raises(ImportError, match=r"post3r-train\[viewer\]"):
        viewer.import_viser()


def test_visible_selection_filters_by_slot_confidence_and_accumulates():
    xyz = np.arange(3 * 4 * 3, dtype=np.float32).reshape(3, 4, 3)
    xyz[0, 3] = np.nan  # a non-finite point is never drawn
    data = viewer.ViewerData(
        folder=Path("unused"),
        manifest={"num_frames": 3},
        xyz=xyz,
        slot=np.array([[0, 1, 1, 0]] * 3, np.uint8),
        rgb=np.zeros((3, 4, 3), np.uint8),
        confidence=np.array([[0.5, 2.0, 3.0, 9.0]] * 3, np.float32),
        poses=np.tile(np.eye(4), (3, 1, 1)),
        focals=[None] * 3,
    )
    points, slots, _ = viewer.visible_selection(data, 0, False, [True, True])
    assert len(points) == 3 and slots.tolist() == [0, 1, 1]
    points, slots, _ = viewer.visible_selection(data, 0, False, [True, True], 2.5)
    assert slots.tolist() == [1] and points[0].tolist() == xyz[0, 2].tolist()
    _, slots, _ = viewer.visible_selection(data, 2, True, [False, True])
    assert slots.tolist() == [1] * 6  # frames 0..2, slot 1 only
    _, slots, _ = viewer.visible_selection(data, 2, True, [True, True], max_points=6)
    assert len(slots) == 7  # 12 points > 6: every other frame (2 and 0), 4 + 3 finite points
    _, slots, _ = viewer.visible_selection(data, 2, True, [True, True], max_points=4)
    assert len(slots) == 4  # every third frame: the current one only


def test_the_app_prints_its_address_and_ctrl_c_stops_it(output):
    import signal
    import subprocess
    import time

    app = Path(__file__).resolve().parents[3] / "apps" / "view"
    port = viewer.free_port()
    process = subprocess.Popen(
        [sys.executable, str(app), str(output), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = ""
        deadline = time.monotonic() + 240
        while "open http" not in line and time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line or process.poll() is None, process.stderr.read()
        assert f"http://localhost:{port}" in line
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=90) == 0
        err = process.stderr.read()
        assert "stopped" in err and "Traceback" not in err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

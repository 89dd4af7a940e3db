"""`uv run apps/view OUTPUT [--port 8080]`: an interactive 3D viewer (viser) of an infer output.

OUTPUT is an infer output folder (layout: `post3r_train.infer_writer`) or a run directory
(its latest validation visualisation, `visualizations/step=N/video0`). The viewer shows each
slot's points in its colour (or the frame's RGB) for the frame on the slider, or all frames up
to it accumulated; the camera trajectory and the current camera frustum with the frame as its image;
the frame with its slot masks beside it; a checkbox per slot, an isolate menu, point size, a
confidence threshold where confidences exist; and exports the visible points as PLY. viser
serves its own web client on localhost (no internet needed); it is the optional extra
`post3r-train[viewer]`.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from post3r_train.infer_writer import read_manifest

MISSING_VISER = (
    "the viewer needs viser, the optional extra post3r-train[viewer]: run it as "
    "`uv run apps/view ...` (the app depends on the extra) or install it with "
    "`uv sync --extra viewer` / `pip install 'post3r-train[viewer]'`"
)
ALL = "all slots"


def import_viser():
    """viser, or an ImportError that names the extra to install."""
    try:
        import viser
    except ImportError as error:
        raise ImportError(MISSING_VISER) from error
    return viser


def find_output(path: Path) -> Path:
    """The infer-layout folder of OUTPUT: itself, or a run directory's latest validation one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such infer output or run directory")
    if (path / "manifest.json").is_file():
        return path
    steps = sorted(
        (
            p
            for p in (path / "visualizations").glob("step=*")
            if (p / "video0" / "manifest.json").is_file()
        ),
        key=lambda p: int(p.name.partition("=")[2] or 0),
    )
    if steps:
        return steps[-1] / "video0"
    raise FileNotFoundError(
        f"{path} is neither an infer output (no manifest.json) nor a run directory with "
        "validation visualisations (visualizations/step=N/video0); run apps/infer on a video first"
    )


@dataclass
class ViewerData:
    """An infer output's per-frame points (memory-mapped), cameras and images."""

    folder: Path
    manifest: dict
    xyz: np.ndarray  # (T, P, 3) float32
    slot: np.ndarray  # (T, P) uint8
    rgb: np.ndarray  # (T, P, 3) uint8
    confidence: np.ndarray | None  # (T, P) float32
    poses: np.ndarray  # (T, 4, 4) camera-to-world
    focals: list[float | None]

    @property
    def num_frames(self) -> int:
        return int(self.manifest["num_frames"])

    @property
    def palette(self) -> np.ndarray:
        return np.asarray(self.manifest["palette"], np.uint8)

    def thumbnail(self, kind: str, frame: int) -> np.ndarray:
        """`frame` or `overlay` image of a frame (uint8 H, W, 3)."""
        with Image.open(self.folder / "thumbs" / f"{kind}_{frame:06d}.jpg") as image:
            return np.asarray(image.convert("RGB"))


def load_output(path: Path) -> ViewerData:
    folder = find_output(path)
    manifest = read_manifest(folder)
    if not manifest.get("has_points"):
        raise ValueError(f"{folder} has no points: the run has no pointmap decoder to show in 3D")
    points = folder / "points"
    confidence = None
    if manifest.get("has_confidence"):
        confidence = np.load(points / "frame_confidence.npy", mmap_mode="r")
    cameras = json.loads((folder / "cameras.json").read_text())["frames"]
    return ViewerData(
        folder,
        manifest,
        np.load(points / "frame_xyz.npy", mmap_mode="r"),
        np.load(points / "frame_slot.npy", mmap_mode="r"),
        np.load(points / "frame_rgb.npy", mmap_mode="r"),
        confidence,
        np.asarray([c["camera_to_world"] for c in cameras], np.float64),
        [c.get("focal_px") for c in cameras],
    )


def visible_selection(
    data: ViewerData,
    frame: int,
    accumulate: bool,
    shown: Sequence[bool],
    min_confidence: float = 0.0,
    max_points: int = 500_000,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points (N, 3), their slots (N,) and frame colours (N, 3) on screen: the frame (or frames
    0..frame, every n-th so at most `max_points`), finite, of shown slots, confident enough."""
    if accumulate:
        per_frame = max(1, data.xyz.shape[1])
        step = max(1, -(-(frame + 1) * per_frame // max_points))
        frames = np.arange(frame, -1, -step)[::-1]
    else:
        frames = np.array([frame])
    xyz = np.asarray(data.xyz[frames]).reshape(-1, 3)
    slot = np.asarray(data.slot[frames]).reshape(-1)
    rgb = np.asarray(data.rgb[frames]).reshape(-1, 3)
    keep = np.isfinite(xyz).all(1) & np.asarray(shown, bool)[slot]
    if data.confidence is not None and min_confidence > 0:
        keep &= np.asarray(data.confidence[frames]).reshape(-1) >= min_confidence
    return xyz[keep], slot[keep], rgb[keep]


def quaternion_wxyz(rotation: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z) of a 3x3 rotation."""
    viser = import_viser()
    return viser.transforms.SO3.from_matrix(rotation).wxyz


def ply_bytes(points: np.ndarray, colors: np.ndarray) -> bytes:
    """A binary PLY (the format `visualize.save_ply` writes) in memory."""
    from post3r_train.visualize import ply_payload

    return ply_payload(points, colors)


class SlotViewer:
    """The scene and controls on a viser server; `refresh()` redraws from the controls' state."""

    def __init__(self, server, data: ViewerData) -> None:
        self.server, self.data = server, data
        self.colors = data.palette
        manifest = data.manifest
        self.slots = sorted({*manifest["used_slots"], *manifest.get("point_slots", [])})
        finite = np.asarray(data.xyz[:: max(1, data.num_frames // 50)]).reshape(-1, 3)
        finite = finite[np.isfinite(finite).all(1)]
        self.centre = np.median(finite, 0) if len(finite) else np.zeros(3)
        self.scale = (
            float(np.percentile(np.linalg.norm(finite - np.median(finite, 0), axis=1), 90))
            if len(finite)
            else 1.0
        )
        self.scale = max(self.scale, 1e-6)  # a single point still gets a visible size
        self._lock = threading.RLock()
        self._stop = threading.Event()
        server.scene.set_up_direction("-y")  # OpenCV world: y points down
        self._place_initial_camera()
        self._build_gui()
        self._build_scene()
        self.refresh()
        self._player = threading.Thread(target=self._play_loop, daemon=True)
        self._player.start()

    def _place_initial_camera(self) -> None:
        """Start the browser's camera behind and above the first camera, looking at the scene
        centre (viser's default view knows nothing of the scene's size)."""
        pose = self.data.poses[0]
        eye = pose[:3, 3] - 2.5 * self.scale * pose[:3, 2] - 1.0 * self.scale * pose[:3, 1]
        camera = self.server.initial_camera
        camera.position = tuple(float(v) for v in eye)
        camera.look_at = tuple(float(v) for v in self.centre)
        camera.up = tuple(float(v) for v in -pose[:3, 1])

    # -- GUI --------------------------------------------------------------------------------

    def _build_gui(self) -> None:
        gui, data = self.server.gui, self.data
        with gui.add_folder("frame with masks"):
            self.image = gui.add_image(data.thumbnail("overlay", 0), label="masks")
        gui.add_markdown(
            f"**{data.folder.name}**: {data.num_frames} frames, {len(self.slots)} slots"
        )
        self.frame = gui.add_slider("frame", 0, max(0, data.num_frames - 1), 1, 0)
        self.playing = gui.add_checkbox("play", False)
        self.fps = gui.add_slider(
            "fps", 1, 30, 1, min(30, max(1, round(data.manifest.get("fps", 8))))
        )
        self.accumulate = gui.add_checkbox("all frames accumulated", False)
        self.color_mode = gui.add_dropdown("colour", ("slot", "frame RGB"), initial_value="slot")
        size = float(f"{self.scale / 60:.2g}")  # about a pixel's footprint at the centre
        self.point_size = gui.add_slider("point size", size / 10, size * 10, size / 10, size)
        self.confidence = None
        if data.confidence is not None:
            high = float(np.nanmax(np.asarray(data.confidence[:: max(1, data.num_frames // 50)])))
            self.confidence = gui.add_slider("min confidence", 0.0, max(high, 1.0), 0.01, 0.0)
        with gui.add_folder("slots"):
            self.isolate = gui.add_dropdown(
                "isolate", (ALL, *[f"slot {k}" for k in self.slots]), initial_value=ALL
            )
            self.slot_boxes = {k: gui.add_checkbox(f"slot {k}", True) for k in self.slots}
        self.export = gui.add_button("export visible points (PLY)")
        for control in (
            self.frame,
            self.accumulate,
            self.color_mode,
            self.point_size,
            self.isolate,
            *self.slot_boxes.values(),
        ):
            control.on_update(lambda _event: self.refresh())
        if self.confidence is not None:
            self.confidence.on_update(lambda _event: self.refresh())
        self.export.on_click(self._export)

    def _build_scene(self) -> None:
        scene, data = self.server.scene, self.data
        self.clouds = {
            k: scene.add_point_cloud(
                f"/slots/slot{k}",
                np.zeros((1, 3), np.float32),
                tuple(int(c) for c in self.colors[k]),
                point_size=self.point_size.value,
            )
            for k in self.slots
        }
        centres = data.poses[:, :3, 3]
        if len(centres) > 1:
            segments = np.stack([centres[:-1], centres[1:]], axis=1).astype(np.float32)
            scene.add_line_segments(
                "/trajectory", segments, (230, 230, 230), thickness=2.0, thickness_units="screen"
            )
        height, width = data.manifest["thumbnail_size"]
        self.frustum = scene.add_camera_frustum(
            "/camera",
            fov=self._fov(0),
            aspect=width / height,
            scale=0.15 * self.scale,
            image=data.thumbnail("frame", 0),
        )

    def _fov(self, frame: int) -> float:
        """Vertical field of view of a frame's camera (the estimated focal, else 60 degrees)."""
        focal = self.data.focals[frame] if frame < len(self.data.focals) else None
        if not focal:
            return np.radians(60.0)
        side = self.data.manifest["model_size"][0]
        height, width = self.data.manifest["input_size"]
        # the focal is in pixels of the square crop; the full frame is taller where H > W
        return float(2 * np.arctan(0.5 * side * max(1.0, height / width) / focal))

    # -- state -> scene ---------------------------------------------------------------------

    def shown_slots(self) -> list[bool]:
        shown = [False] * len(self.colors)
        isolated = self.isolate.value
        for k, box in self.slot_boxes.items():
            shown[k] = box.value if isolated == ALL else isolated == f"slot {k}"
        return shown

    def visible_points(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(points, slots, frame colours) drawn now."""
        threshold = self.confidence.value if self.confidence is not None else 0.0
        return visible_selection(
            self.data, int(self.frame.value), self.accumulate.value, self.shown_slots(), threshold
        )

    def refresh(self) -> None:
        with self._lock:
            frame = int(self.frame.value)
            xyz, slot, rgb = self.visible_points()
            shown = self.shown_slots()
            by_slot = self.color_mode.value == "slot"
            with self.server.atomic():
                for k, cloud in self.clouds.items():
                    mine = slot == k
                    cloud.visible = bool(shown[k] and mine.any())
                    if not cloud.visible:
                        continue
                    cloud.points = xyz[mine].astype(np.float32)
                    colors = (
                        np.broadcast_to(self.colors[k], (int(mine.sum()), 3))
                        if by_slot
                        else rgb[mine]
                    )
                    cloud.colors = np.ascontiguousarray(colors, np.uint8)
                    cloud.point_size = float(self.point_size.value)
                pose = self.data.poses[frame]
                self.frustum.wxyz = quaternion_wxyz(pose[:3, :3])
                self.frustum.position = pose[:3, 3]
                self.frustum.fov = self._fov(frame)
                self.frustum.image = self.data.thumbnail("frame", frame)
                self.image.image = self.data.thumbnail("overlay", frame)

    def _play_loop(self) -> None:
        while not self._stop.is_set():
            time.sleep(1.0 / max(1, self.fps.value))
            if self.playing.value and self.data.num_frames > 1:
                self.frame.value = (int(self.frame.value) + 1) % self.data.num_frames

    def _export(self, event) -> None:
        xyz, slot, rgb = self.visible_points()
        colors = self.colors[slot] if self.color_mode.value == "slot" else rgb
        payload = ply_bytes(xyz, colors)
        name = f"{self.data.folder.name}_frame{int(self.frame.value):06d}_visible.ply"
        if event.client is not None:
            event.client.send_file_download(name, payload)

    def close(self) -> None:
        self._stop.set()
        self._player.join(timeout=2)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def start(path: Path, host: str = "127.0.0.1", port: int = 8080) -> tuple[Any, SlotViewer]:
    """A running viser server with the scene of OUTPUT `path`."""
    data = load_output(path)  # validate before a port is opened
    viser = import_viser()
    server = viser.ViserServer(host=host, port=port, verbose=False)
    return server, SlotViewer(server, data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apps/view", description=__doc__.splitlines()[0].split(": ", 1)[1]
    )
    parser.add_argument(
        "output", type=Path, metavar="OUTPUT", help="infer output folder or run directory"
    )
    parser.add_argument("--port", type=int, default=8080, help="port to serve on (default 8080)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)"
    )
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        print(f"error: --port must be 1..65535, got {args.port}", file=sys.stderr)
        return 1
    try:
        server, viewer = start(args.output, args.host, args.port)
    except (FileNotFoundError, ValueError, ImportError, json.JSONDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # the port is taken
        print(
            f"error: cannot serve on {args.host}:{args.port} ({error}); pass another --port",
            file=sys.stderr,
        )
        return 1
    signal.signal(signal.SIGINT, _interrupt)  # also when started with SIGINT ignored (`cmd &`)
    signal.signal(signal.SIGTERM, _interrupt)
    shown = "localhost" if args.host in ("127.0.0.1", "0.0.0.0") else args.host
    address = f"http://{shown}:{server.get_port()}"
    try:  # entered before the address is printed: a Ctrl+C right after it is still clean
        print(f"viewing {viewer.data.folder}: open {address} (Ctrl+C stops)", flush=True)
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        viewer.close()
        server.stop()
    return 0

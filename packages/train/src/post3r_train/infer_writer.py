"""The infer output folder (format `post3r-infer` v1), written frame by frame at constant memory.

One layout, read by `apps/view` and `apps/render`, written by `apps/infer` (a video) and by
validation (its first video). All paths relative to the folder; T frames, K slots, input frames
H x W; the model saw the centre square `crop` = [top, left, side] of each frame, resized to its
input size (it is built for one square size and cannot take another aspect ratio):

- `manifest.json`: `format`, `version`, `num_frames`, `num_slots`, `input_size` [H, W],
  `crop`, `model_size`, `mask_decoder` (which decoder's masks the files show), `palette`
  (K RGB colours), `used_slots` (slots that win at least one pixel of masks.npy),
  `point_slots` (slots that win at least one point of the pointmap decoder), `fps`, `source`,
  `checkpoint`, `points_per_frame`, `has_confidence`, `thumbnail_size` [h, w].
- `masks.npy`: uint8 (T, H, W), the winning slot of every input pixel; 255 outside the crop.
  The model's soft masks are resized bilinearly from its input size to the crop, then argmax.
- `masks.mp4` (slot colours), `overlay.mp4` (frame tinted by slot), `objects/slotK.mp4` (slot
  K's mask, white), all H x W (rounded down to even), H.264 (MPEG-4 without libx264).
- `thumbs/frame_NNNNNN.jpg` and `thumbs/overlay_NNNNNN.jpg`: the frame and its overlay, longer
  side at most 256 pixels (the viewer's images).
- With the pointmap decoder, `points/`: `frame_xyz.npy` float32 (T, P, 3) world points of P
  decoder pixels per frame (all of them, or an evenly spaced subset when there are more than
  `--points-per-frame`), each at its winning slot's predicted XYZ; `frame_slot.npy` uint8 (T, P)
  that slot; `frame_rgb.npy` uint8 (T, P, 3) the frame's colour there; `frame_confidence.npy`
  float32 (T, P) the teacher's confidence where it has one; `slotK.ply` (frame colours) and
  `slots.ply` (slot colours): each slot's points over the whole video, a uniform sample
  (reservoir sampling) of at most `--max-points-per-slot` per slot.
- `cameras.json`: per frame `camera_to_world` (4x4, OpenCV axes: x right, y down, z forward) in
  the first frame's camera frame (the world of all points), `focal_px` per frame estimated from
  the decoder's camera-frame points (least squares over u = f x / z + c, in model-input pixels;
  null where it cannot be estimated) and `source` (`ttt3r`, or `none`: the model had no pose
  source at inference and assumed a static camera).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import DTypeLike
from PIL import Image
from torch import Tensor

from post3r_train.atomic import atomic_write_text
from post3r_train.visualize import palette, save_ply

FORMAT = "post3r-infer"
VERSION = 1
OUTSIDE_CROP = 255  # masks.npy's value for input pixels the model did not see
THUMBNAIL_SIDE = 256
_HEADER_BYTES = 128  # fixed .npy header size, so the frame count can be patched in at the end


class GrowingNpy:
    """A `.npy` file appended one slab at a time along its first axis (length unknown up front):
    rows go straight to disk and the header is rewritten with the final length on `close`."""

    def __init__(self, path: Path, row_shape: tuple[int, ...], dtype: DTypeLike) -> None:
        self.path, self.row_shape, self.dtype = Path(path), tuple(row_shape), np.dtype(dtype)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.length = 0
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed in close())
        self._file.write(self._header(0))

    def _header(self, length: int) -> bytes:
        text = str(
            {
                "descr": np.lib.format.dtype_to_descr(self.dtype),
                "fortran_order": False,
                "shape": (length, *self.row_shape),
            }
        )
        body_size = _HEADER_BYTES - 10  # magic (6) + version (2) + length (2)
        body = text.ljust(body_size - 1) + "\n"
        if len(body) != body_size:
            raise ValueError(f"{self.path.name}: shape {self.row_shape} too long for the header")
        return b"\x93NUMPY\x01\x00" + body_size.to_bytes(2, "little") + body.encode("latin1")

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path.name}: rows {rows.shape[1:]} != {self.row_shape}")
        self._file.write(rows.tobytes())
        self.length += len(rows)

    def close(self) -> None:
        self._file.seek(0)
        self._file.write(self._header(self.length))
        self._file.close()


class VideoEncoder:
    """An H.264 (or MPEG-4) file encoded frame by frame; odd sizes are cropped to even."""

    def __init__(self, path: Path, size: tuple[int, int], fps: float) -> None:
        import av

        path.parent.mkdir(parents=True, exist_ok=True)
        self.height, self.width = size[0] // 2 * 2, size[1] // 2 * 2
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self._container = av.open(str(path), mode="w", format="mp4")
        self._stream = cast(
            av.VideoStream, self._container.add_stream(codec, rate=max(1, round(fps)))
        )
        self._stream.width, self._stream.height = self.width, self.height
        self._stream.pix_fmt = "yuv420p"

    def write(self, image: np.ndarray) -> None:
        import av

        frame = np.ascontiguousarray(image[: self.height, : self.width])
        self._container.mux(self._stream.encode(av.VideoFrame.from_ndarray(frame, "rgb24")))

    def close(self) -> None:
        self._container.mux(self._stream.encode())
        self._container.close()


class Reservoir:
    """A uniform sample of at most `capacity` of all rows ever added (Algorithm R), so a slot's
    cloud over a video of any length costs bounded memory."""

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity, self.seen = capacity, 0
        self.points = np.empty((capacity, 3), np.float32)
        self.colors = np.empty((capacity, 3), np.uint8)
        self._rng = np.random.default_rng(seed)

    def add(self, points: np.ndarray, colors: np.ndarray) -> None:
        count = len(points)
        fill = max(0, min(count, self.capacity - self.seen))
        size = min(self.seen, self.capacity)
        self.points[size : size + fill], self.colors[size : size + fill] = (
            points[:fill],
            colors[:fill],
        )
        rest = np.arange(fill, count)
        if len(rest):
            # Row i (the (seen + i)-th overall) replaces a random slot with probability
            # capacity / (seen + i + 1); later rows in one call overwrite earlier ones as in
            # the sequential algorithm.
            draws = self._rng.integers(0, self.seen + rest + 1)
            keep = draws < self.capacity
            self.points[draws[keep]], self.colors[draws[keep]] = (
                points[rest[keep]],
                colors[rest[keep]],
            )
        self.seen += count

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        size = min(self.seen, self.capacity)
        return self.points[:size], self.colors[:size]


def centre_crop_box(height: int, width: int) -> tuple[int, int, int]:
    """[top, left, side] of the centred square the model sees."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side


def thumbnail_size(height: int, width: int, side: int = THUMBNAIL_SIDE) -> tuple[int, int]:
    scale = min(1.0, side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def estimate_focal(camera_points: Tensor) -> float | None:
    """Focal length (pixels of an h x w image) that best maps camera-frame points (h, w, 3) to
    their pixel centres under a centred pinhole: least squares of u - c = f x / z."""
    height, width = camera_points.shape[:2]
    ys, xs = torch.meshgrid(
        torch.arange(height) - (height - 1) / 2,
        torch.arange(width) - (width - 1) / 2,
        indexing="ij",
    )
    points = camera_points.double()
    z = points[..., 2]
    valid = torch.isfinite(points).all(-1) & (z > 1e-6)
    if valid.sum() < 4:
        return None
    ratio = torch.cat([points[..., 0][valid] / z[valid], points[..., 1][valid] / z[valid]])
    pixels = torch.cat([xs[valid], ys[valid]]).double()
    denominator = float((ratio * ratio).sum())
    if denominator < 1e-12:
        return None
    focal = float((ratio * pixels).sum()) / denominator
    return focal if np.isfinite(focal) and focal > 0 else None


class InferWriter:
    """Writes the layout above into a staging folder next to `output`; `finish` publishes it
    (replacing an earlier infer output there), `abort` removes it. Memory stays constant: every
    frame goes to disk as it arrives, point clouds are bounded reservoirs."""

    def __init__(
        self,
        output: Path,
        *,
        input_size: tuple[int, int],
        model_size: tuple[int, int],
        num_slots: int,
        fps: float,
        source: str,
        checkpoint: str,
        mask_decoder: str,
        points_per_frame: int = 4096,
        max_points_per_slot: int = 200_000,
        seed: int = 0,
    ) -> None:
        if num_slots >= OUTSIDE_CROP:
            raise ValueError(
                f"masks.npy holds slot ids as uint8: at most 254 slots, not {num_slots}"
            )
        self.output = Path(output)
        self.staging = self.output.with_name(f".{self.output.name}.partial-{uuid.uuid4().hex[:8]}")
        self.staging.mkdir(parents=True)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.model_size = (int(model_size[0]), int(model_size[1]))
        self.crop = centre_crop_box(*self.input_size)
        self.num_slots, self.fps = num_slots, fps
        self.colors = palette(num_slots)
        self.thumb_size = thumbnail_size(*self.input_size)
        self.meta = {"source": source, "checkpoint": checkpoint, "mask_decoder": mask_decoder}
        self.points_per_frame, self.max_points_per_slot, self.seed = (
            points_per_frame,
            max_points_per_slot,
            seed,
        )
        self.num_frames = 0
        self.used = np.zeros(num_slots, bool)
        self.cameras: list[dict] = []
        self.camera_source = "none"
        self.masks = GrowingNpy(self.staging / "masks.npy", self.input_size, np.uint8)
        self.videos = {
            "masks": VideoEncoder(self.staging / "masks.mp4", self.input_size, fps),
            "overlay": VideoEncoder(self.staging / "overlay.mp4", self.input_size, fps),
        }
        self.objects = [
            VideoEncoder(self.staging / "objects" / f"slot{k}.mp4", self.input_size, fps)
            for k in range(num_slots)
        ]
        self.points: dict[str, GrowingNpy] | None = None
        self.reservoirs: list[Reservoir] = []
        self.sample_index: np.ndarray | None = None

    # ------------------------------------------------------------------------------------

    def add_clip(
        self,
        images: list[np.ndarray],
        model_frames: Tensor,
        masks: Tensor,
        points: dict[str, Tensor] | None = None,
        camera_to_world: Tensor | None = None,
        camera_source: str = "none",
    ) -> None:
        """One clip: input images uint8 (H, W, 3) each, the frames the model saw (t, 3, h, w)
        in [0, 1], soft masks (t, K, h, w) at the model's input size, and with the pointmap
        decoder `points` = {slot_pointmaps (t, K, ph, pw, 3), pointmap_masks (t, K, ph, pw),
        optionally pointmap_confidence (t, ph, pw)}; `camera_to_world` (t, 4, 4)."""
        for index, image in enumerate(images):
            self._write_frame(self.num_frames + index, image, masks[index])
        if points is not None:
            self._write_points(model_frames, points, camera_to_world)
        poses = (
            camera_to_world
            if camera_to_world is not None
            else torch.eye(4).expand(len(images), 4, 4)
        )
        self.camera_source = camera_source
        for index in range(len(images)):
            focal = None
            if points is not None:
                focal = self._focal(points, poses[index], index)
            self.cameras.append(
                {
                    "frame": self.num_frames + index,
                    "camera_to_world": poses[index].double().tolist(),
                    "focal_px": focal,
                }
            )
        self.num_frames += len(images)

    def _write_frame(self, frame: int, image: np.ndarray, soft: Tensor) -> None:
        top, left, side = self.crop
        resized = F.interpolate(
            soft[None].float(), (side, side), mode="bilinear", align_corners=False
        )
        ids = np.full(self.input_size, OUTSIDE_CROP, np.uint8)
        crop_ids = resized[0].argmax(0).numpy().astype(np.uint8)
        ids[top : top + side, left : left + side] = crop_ids
        self.masks.append(ids[None])
        self.used |= np.bincount(crop_ids.ravel(), minlength=self.num_slots)[: self.num_slots] > 0
        inside = ids != OUTSIDE_CROP
        tint = np.zeros_like(image)
        tint[inside] = self.colors[ids[inside]]
        blend = image.copy()
        blend[inside] = (0.45 * image[inside] + 0.55 * tint[inside]).round().astype(np.uint8)
        self.videos["masks"].write(tint)
        self.videos["overlay"].write(blend)
        white = np.uint8(255)
        for k, encoder in enumerate(self.objects):
            encoder.write(np.repeat((ids == k)[..., None] * white, 3, axis=-1))
        name = f"{frame:06d}.jpg"
        size = (self.thumb_size[1], self.thumb_size[0])
        self._thumb(image, size, f"frame_{name}")
        self._thumb(blend, size, f"overlay_{name}")

    def _thumb(self, image: np.ndarray, size: tuple[int, int], name: str) -> None:
        path = self.staging / "thumbs" / name
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(image).resize(size, Image.Resampling.BILINEAR).save(path, quality=85)

    def _start_points(self, pixels: int, confidence: bool) -> None:
        count = min(pixels, self.points_per_frame)
        self.sample_index = np.linspace(0, pixels - 1, count).round().astype(np.int64)
        folder = self.staging / "points"
        self.points = {
            "xyz": GrowingNpy(folder / "frame_xyz.npy", (count, 3), np.float32),
            "slot": GrowingNpy(folder / "frame_slot.npy", (count,), np.uint8),
            "rgb": GrowingNpy(folder / "frame_rgb.npy", (count, 3), np.uint8),
        }
        if confidence:
            self.points["confidence"] = GrowingNpy(
                folder / "frame_confidence.npy", (count,), np.float32
            )
        self.reservoirs = [
            Reservoir(self.max_points_per_slot, self.seed + k) for k in range(self.num_slots)
        ]

    def _write_points(
        self, model_frames: Tensor, points: dict[str, Tensor], poses: Tensor | None
    ) -> None:
        slot_points, slot_masks = points["slot_pointmaps"].float(), points["pointmap_masks"].float()
        t, k, h, w = slot_masks.shape
        confidence = points.get("pointmap_confidence")
        if self.points is None:
            self._start_points(h * w, confidence is not None)
        assert self.points is not None and self.sample_index is not None
        colors = F.interpolate(model_frames.float(), (h, w), mode="bilinear", align_corners=False)
        rgb = (colors.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).reshape(t, h * w, 3)
        winner = slot_masks.argmax(1).reshape(t, h * w)  # (t, hw)
        xyz = slot_points.permute(0, 2, 3, 1, 4).reshape(t, h * w, k, 3)
        xyz = xyz.gather(2, winner[..., None, None].expand(-1, -1, 1, 3))[:, :, 0]
        xyz_np, slot_np, rgb_np = xyz.numpy(), winner.numpy().astype(np.uint8), rgb.numpy()
        index = self.sample_index
        self.points["xyz"].append(xyz_np[:, index])
        self.points["slot"].append(slot_np[:, index])
        self.points["rgb"].append(rgb_np[:, index])
        if confidence is not None:
            self.points["confidence"].append(confidence.float().reshape(t, h * w)[:, index].numpy())
        for slot, reservoir in enumerate(self.reservoirs):
            chosen = (slot_np == slot) & np.isfinite(xyz_np).all(-1)
            if chosen.any():
                reservoir.add(xyz_np[chosen], rgb_np[chosen])

    def _focal(self, points: dict[str, Tensor], pose: Tensor, index: int) -> float | None:
        slot_points, masks = (
            points["slot_pointmaps"][index].float(),
            points["pointmap_masks"][index],
        )
        winner = masks.argmax(0)  # (h, w)
        world = slot_points.gather(0, winner[None, ..., None].expand(1, -1, -1, 3))[0]
        to_camera = torch.linalg.inv(pose.double()).float()
        camera = world @ to_camera[:3, :3].T + to_camera[:3, 3]
        focal = estimate_focal(camera)  # in pixels of the decoder's grid
        if focal is None:
            return None
        return focal * self.model_size[1] / camera.shape[1]

    # ------------------------------------------------------------------------------------

    def finish(self) -> list[Path]:
        """Close every file, write the PLYs, cameras and manifest, publish; the written paths."""
        for encoder in self.videos.values():
            encoder.close()
        for k, encoder in enumerate(self.objects):
            encoder.close()
            if not self.used[k]:
                (self.staging / "objects" / f"slot{k}.mp4").unlink()
        self.masks.close()
        if self.points is not None:
            for array in self.points.values():
                array.close()
            self._write_clouds()
        atomic_write_text(
            self.staging / "cameras.json",
            json.dumps(
                {
                    "convention": "camera_to_world, OpenCV axes (x right, y down, z forward), "
                    "world = the first frame's camera",
                    "source": self.camera_source,
                    "focal_px_image_size": list(self.model_size),
                    "frames": self.cameras,
                },
                indent=1,
            ),
        )
        atomic_write_text(self.staging / "manifest.json", json.dumps(self.manifest(), indent=2))
        self._publish()
        return sorted(p for p in self.output.rglob("*") if p.is_file())

    def _write_clouds(self) -> None:
        everything, tints = [], []
        for k, reservoir in enumerate(self.reservoirs):
            xyz, rgb = reservoir.sample()
            if len(xyz) == 0:
                continue
            save_ply(self.staging / "points" / f"slot{k}.ply", xyz, rgb)
            everything.append(xyz)
            tints.append(np.broadcast_to(self.colors[k], (len(xyz), 3)))
        if everything:
            save_ply(
                self.staging / "points" / "slots.ply",
                np.concatenate(everything),
                np.concatenate(tints),
            )

    def manifest(self) -> dict:
        top, left, side = self.crop
        return {
            "format": FORMAT,
            "version": VERSION,
            "num_frames": self.num_frames,
            "num_slots": self.num_slots,
            "input_size": list(self.input_size),
            "crop": {"top": top, "left": left, "side": side},
            "model_size": list(self.model_size),
            "thumbnail_size": list(self.thumb_size),
            "palette": self.colors.tolist(),
            "used_slots": [int(k) for k in np.flatnonzero(self.used)],
            "point_slots": [k for k, r in enumerate(self.reservoirs) if r.seen > 0],
            "fps": self.fps,
            "points_per_frame": None if self.sample_index is None else len(self.sample_index),
            "has_points": self.points is not None,
            "has_confidence": self.points is not None and "confidence" in self.points,
            "camera_source": self.camera_source,
            **self.meta,
        }

    def _publish(self) -> None:
        old = None
        if self.output.exists():
            old = self.output.with_name(f".{self.output.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(self.output, old)
        os.replace(self.staging, self.output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Drop the staging folder (the output, if any, stays as it was)."""
        for encoder in (*self.videos.values(), *self.objects):
            with contextlib.suppress(Exception):  # best effort: the folder is deleted anyway
                encoder.close()
        shutil.rmtree(self.staging, ignore_errors=True)


def check_output_folder(output: Path) -> None:
    """Refuse, before any work, an output that exists and is not an earlier infer output (it
    would be replaced), or whose parent cannot be written."""
    output = Path(output)
    if output.exists():
        if not output.is_dir():
            raise FileExistsError(f"--output {output} is a file; choose a folder name")
        if any(output.iterdir()) and not (output / "manifest.json").is_file():
            raise FileExistsError(
                f"--output {output} exists and is not an infer output (no manifest.json); "
                "choose another folder or empty it"
            )
    parent = output.parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(
            f"cannot write into {parent} (for --output {output.name}); choose a writable folder"
        )


def read_manifest(folder: Path) -> dict:
    """The manifest of an infer-layout folder, checked for format and version."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no manifest.json: not an infer output")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise ValueError(
            f"{path}: layout version {manifest.get('version')} but this code reads {VERSION}; "
            "re-run apps/infer"
        )
    return manifest

"""3D metrics against known answers: alignments, per-object reconstruction, video depth, camera
trajectory; invariances (Sim(3), slot order) and 2 gloo ranks == 1 process."""

from __future__ import annotations

import math
import socket
import subprocess
import sys

import pytest
import torch

from post3r_train.alignment import (
    depth_scale,
    depth_scale_and_shift,
    least_squares_scale,
    umeyama_sim3,
)
from post3r_train.metrics3d import (
    CameraTrajectory,
    ObjectReconstruction,
    VideoDepth,
    is_count,
    trajectory_errors,
    video_depth_errors,
)


def random_rotation(generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


def orbit_poses(frames: int = 6) -> torch.Tensor:
    """Camera-to-world poses of a camera circling the origin and looking at it."""
    poses = torch.eye(4, dtype=torch.float64).repeat(frames, 1, 1)
    for i in range(frames):
        angle = 0.4 * i
        centre = torch.tensor(
            [3 * math.sin(angle), -1.0 + 0.1 * i, -3 * math.cos(angle)], dtype=torch.float64
        )
        forward = -centre / centre.norm()
        right = torch.linalg.cross(torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64), forward)
        right = right / right.norm()
        down = torch.linalg.cross(forward, right)
        poses[i, :3, :3] = torch.stack((right, down, forward), dim=1)
        poses[i, :3, 3] = centre
    return poses


def sim3_matrix(scale: float, rotation: torch.Tensor, translation: torch.Tensor):
    def apply(poses: torch.Tensor) -> torch.Tensor:
        out = poses.clone()
        out[..., :3, :3] = rotation @ poses[..., :3, :3]
        out[..., :3, 3] = scale * poses[..., :3, 3] @ rotation.T + translation
        return out

    return apply


# ------------------------------------------------------------------------------------------
# Alignments


def test_umeyama_recovers_a_known_similarity():
    g = torch.Generator().manual_seed(0)
    source = torch.randn(20, 3, generator=g, dtype=torch.float64)
    rotation, translation = random_rotation(g), torch.tensor([1.0, -2.0, 0.5])
    target = 2.5 * source @ rotation.T + translation
    fit = umeyama_sim3(source, target)
    torch.testing.assert_close(fit.scale, torch.tensor(2.5, dtype=torch.float64))
    torch.testing.assert_close(fit.rotation, rotation)
    torch.testing.assert_close(fit.translation, translation.double())
    with pytest.raises(ValueError, match="coincide"):
        umeyama_sim3(torch.ones(4, 3), torch.randn(4, 3))


def test_umeyama_never_returns_a_reflection():
    source = torch.randn(10, 3, dtype=torch.float64)
    mirrored = source * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    assert torch.det(umeyama_sim3(source, mirrored).rotation) > 0


def test_depth_alignments_on_hand_computed_cases():
    # L1 scale of a constant prediction is the median of the truth: 1 for [1, 1, 1, 3].
    scale = depth_scale(torch.ones(4), torch.tensor([1.0, 1.0, 1.0, 3.0]))
    assert abs(float(scale) - 1.0) < 1e-3
    # The L1 line through four of five points ignores the outlier (least squares would not).
    p, g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), torch.tensor([3.0, 5.0, 50.0, 9.0, 11.0])
    s, t = depth_scale_and_shift(p, g)
    assert abs(float(s) - 2.0) < 1e-4 and abs(float(t) - 1.0) < 1e-4
    s, t = depth_scale_and_shift(torch.full((5,), 2.0), torch.tensor([1.0, 2, 3, 4, 9]))
    assert float(s) == 0.0 and float(t) == 3.0  # a constant: only the shift fits (the median)
    torch.testing.assert_close(
        least_squares_scale(torch.tensor([[1.0, 0, 0]]), torch.tensor([[3.0, 4, 0]])),
        torch.tensor(3.0, dtype=torch.float64),
    )


# ------------------------------------------------------------------------------------------
# Video depth


def test_video_depth_is_zero_for_a_scaled_truth_and_matches_hand_computed_errors():
    truth = torch.rand(2, 3, 8, 8) * 5 + 1
    for alignment in ("scale", "scale&shift"):
        metric = VideoDepth(alignment)
        metric.update(truth * 0.37, truth)
        values = metric.compute()
        tag = "scale" if alignment == "scale" else "scale_shift"
        assert values[f"depth_abs_rel_{tag}"] < 1e-6
        assert values[f"depth_delta125_{tag}"] == 1.0
        assert values[f"depth_num_videos_{tag}"] == 2
    # p = 1 everywhere, g = [1, 1, 1, 3]: scale 1, Abs Rel (2/3) / 4, 3 of 4 within 1.25.
    abs_rel, within, pixels = video_depth_errors(
        torch.ones(1, 2, 2), torch.tensor([[[1.0, 1.0], [1.0, 3.0]]]), "scale"
    )
    assert pixels == 4 and within == 3 and abs(float(abs_rel) - 2 / 3) < 1e-3
    # Scale and shift: p = [1 2 3 4 5], g = [3 5 50 9 11] -> 2p + 1, Abs Rel |7 - 50| / 50 / 5.
    p = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 5.0]]])
    g = torch.tensor([[[3.0, 5.0, 50.0, 9.0, 11.0]]])
    metric = VideoDepth("scale&shift")
    metric.update(p[None], g[None])
    values = metric.compute()
    assert abs(values["depth_abs_rel_scale_shift"] - 0.86 / 5) < 1e-4
    assert values["depth_delta125_scale_shift"] == 0.8
    # A depth cap leaves the far pixel out and clips predictions to it.
    _, _, pixels = video_depth_errors(p, g, "scale&shift", max_depth=40)
    assert pixels == 4


def test_video_depth_weights_videos_by_their_valid_pixels():
    truth = torch.ones(2, 1, 2, 2)
    truth[1, 0, 0] = 0.0  # second video: 2 valid pixels
    prediction = truth.clone()
    prediction[0, 0, 0, 0] = 2.0  # first video: one pixel at relative error ~1 after scale
    metric = VideoDepth("scale")
    metric.update(prediction, truth)
    abs_rel0, _, n0 = video_depth_errors(prediction[0], truth[0], "scale")
    assert n0 == 4
    expected = float(abs_rel0) / 6  # the second video adds 2 exact pixels
    assert abs(metric.compute()["depth_abs_rel_scale"] - expected) < 1e-9


# ------------------------------------------------------------------------------------------
# Camera


def test_camera_metrics_are_zero_for_a_random_similarity_of_the_truth():
    g = torch.Generator().manual_seed(3)
    truth = orbit_poses(7)
    moved = sim3_matrix(0.3, random_rotation(g), torch.tensor([4.0, -1.0, 2.0]))(truth)
    ate, rpe_trans, rpe_rot = trajectory_errors(moved, truth)
    assert float(ate) < 1e-9 and float(rpe_trans) < 1e-9 and float(rpe_rot) < 1e-5


def test_camera_metrics_on_hand_computed_trajectories():
    truth = torch.eye(4, dtype=torch.float64).repeat(3, 1, 1)
    truth[:, 0, 3] = torch.tensor([0.0, 1.0, 2.0])
    turned = truth.clone()
    turned[2, :3, :3] = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    ate, rpe_trans, rpe_rot = trajectory_errors(turned, truth)
    # Same centres; the second step turns 90 degrees: RPE rot = sqrt((0² + 90²) / 2).
    assert float(ate) < 1e-9 and float(rpe_trans) < 1e-9
    assert abs(float(rpe_rot) - math.sqrt(90**2 / 2)) < 1e-6
    # Centres (-1,0,0) (0,1,0) (1,0,0) against (-1,0,0) (0,0,0) (1,0,0): Umeyama scale 3/4,
    # residuals (0.25, 0.25) (0, 0.5) (0.25, 0.25) -> ATE sqrt(1/6).
    line = torch.eye(4, dtype=torch.float64).repeat(3, 1, 1)
    line[:, 0, 3] = torch.tensor([-1.0, 0.0, 1.0])
    bent = line.clone()
    bent[1, 1, 3] = 1.0
    ate, rpe_trans, _ = trajectory_errors(bent, line)
    assert abs(float(ate) - math.sqrt(1 / 6)) < 1e-9
    # Relative steps (0.75, 0.75, 0) and (0.75, -0.75, 0) against (1, 0, 0): errors of norm
    # sqrt(0.25² + 0.75²) each.
    assert abs(float(rpe_trans) - math.hypot(0.25, 0.75)) < 1e-9


def test_camera_metric_skips_and_counts_undefined_videos():
    metric = CameraTrajectory()
    static = torch.eye(4, dtype=torch.float64).repeat(1, 4, 1, 1)
    metric.update(static, static)
    metric.update(orbit_poses(1)[None], orbit_poses(1)[None])
    values = metric.compute()
    assert values["camera_num_skipped"] == 2 and values["camera_num_videos"] == 0
    assert math.isnan(values["camera_ate"])
    assert is_count("camera_num_skipped") and not is_count("camera_ate")


# ------------------------------------------------------------------------------------------
# Per-object reconstruction


def hand_case():
    """One frame of 1x3 pixels: object 1 on pixel 0, object 2 on pixels 1 and 2; slot 0 owns
    pixel 0 (exact point), slot 1 owns pixels 1 and 2 and puts both at (0, 0, 2)."""
    truth = torch.tensor([[[[[0.0, 0, 1], [0, 0, 2], [1, 0, 2]]]]])  # (1, 1, 1, 3, 3)
    ids = torch.tensor([[[[1, 2, 2]]]])
    masks = torch.tensor([[[[[0.9, 0.2, 0.1]], [[0.1, 0.8, 0.9]]]]])  # (1, 1, 2, 1, 3)
    slot_points = truth[:, :, None].repeat(1, 1, 2, 1, 1, 1)
    slot_points[0, 0, 1, 0, 2] = torch.tensor([0.0, 0, 2])
    return slot_points, masks, truth, ids


def test_object_reconstruction_on_a_hand_computed_case():
    slot_points, masks, truth, ids = hand_case()
    metric = ObjectReconstruction()
    metric.update(slot_points, masks, truth, truth, ids)
    values = metric.compute()
    norm = (1 + 2 + math.sqrt(5)) / 3
    # Object 1: exact. Object 2: predicted points (0,0,2) twice -> accuracy 0; true (1,0,2)
    # is 1 from them -> completeness (0 + 1) / 2.
    assert values["obj3d_num_objects"] == 2
    assert abs(values["obj3d_accuracy"]) < 1e-12
    assert abs(values["obj3d_completeness"] - 0.25 / norm) < 1e-9
    assert abs(values["obj3d_chamfer"] - 0.125 / norm) < 1e-9


def test_object_reconstruction_is_invariant_to_the_scale_and_the_slot_order():
    g = torch.Generator().manual_seed(1)
    b, t, k, h, w = 2, 3, 5, 6, 6
    truth = torch.randn(b, t, h, w, 3, generator=g) + torch.tensor([0.0, 0.0, 5.0])
    ids = torch.randint(0, 4, (b, t, h, w), generator=g)
    masks = torch.rand(b, t, k, h, w, generator=g).softmax(2)
    slot_points = truth[:, :, None] + 0.3 * torch.randn(b, t, k, h, w, 3, generator=g)
    composite = truth + 0.1 * torch.randn(b, t, h, w, 3, generator=g)
    reference = ObjectReconstruction()
    reference.update(slot_points, masks, composite, truth, ids)
    order = torch.randperm(k, generator=g)
    permuted = ObjectReconstruction()
    permuted.update(slot_points[:, :, order], masks[:, :, order], composite, truth, ids)
    scaled = ObjectReconstruction()
    scaled.update(4.0 * slot_points, masks, 4.0 * composite, truth, ids)
    expected = reference.compute()
    for other in (permuted.compute(), scaled.compute()):
        assert other.keys() == expected.keys()
        for name, value in expected.items():
            assert abs(other[name] - value) < 1e-9, name
    # Exact slots on exact masks score 0, scaled or not.
    exact = ObjectReconstruction()
    one_hot = torch.nn.functional.one_hot(ids, k).movedim(-1, 2).float()
    exact.update(
        2.0 * truth[:, :, None].expand(-1, -1, k, -1, -1, -1), one_hot, 2 * truth, truth, ids
    )
    assert exact.compute()["obj3d_chamfer"] < 1e-6


def test_object_reconstruction_resamples_truth_to_the_prediction():
    slot_points, masks, truth, ids = hand_case()
    big_truth = truth.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    big_ids = ids.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    small, big = ObjectReconstruction(), ObjectReconstruction()
    small.update(slot_points, masks, truth, truth, ids)
    # Truth at twice the resolution, predictions at 1x3 upsampled the same way.
    big.update(slot_points, masks, truth, big_truth[:, :, ::2, ::2], big_ids[:, :, ::2, ::2])
    assert small.compute() == big.compute()


# ------------------------------------------------------------------------------------------
# Two gloo ranks == one process


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_RANKS_SCRIPT = """
import os, sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from post3r_train.metrics3d import CameraTrajectory, ObjectReconstruction, VideoDepth


def worker(rank, port, folder):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        data = torch.load(os.path.join(folder, "data.pt"))
        mine = slice(0, 1) if rank == 0 else slice(1, 3)  # unequal shares
        metrics = [ObjectReconstruction(), VideoDepth("scale"), VideoDepth("scale&shift"),
                   CameraTrajectory()]
        metrics[0].update(*(x[mine] for x in data["object"]))
        metrics[1].update(*(x[mine] for x in data["depth"]))
        metrics[2].update(*(x[mine] for x in data["depth"]))
        metrics[3].update(*(x[mine] for x in data["camera"]))
        values = {}
        for metric in metrics:
            values.update(metric.compute())
        torch.save(values, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    mp.start_processes(worker, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2, start_method="fork")
"""


def test_two_gloo_ranks_equal_one_process(tmp_path):
    g = torch.Generator().manual_seed(5)
    b, t, k, h, w = 3, 4, 4, 5, 5
    truth = torch.randn(b, t, h, w, 3, generator=g) + torch.tensor([0.0, 0.0, 4.0])
    object_inputs = (
        truth[:, :, None] + 0.2 * torch.randn(b, t, k, h, w, 3, generator=g),
        torch.rand(b, t, k, h, w, generator=g).softmax(2),
        truth + 0.1 * torch.randn(b, t, h, w, 3, generator=g),
        truth,
        torch.randint(0, 3, (b, t, h, w), generator=g),
    )
    depth_truth = torch.rand(b, t, 8, 8, generator=g) * 4 + 1
    depth_inputs = (depth_truth[..., ::2, ::2] * (1 + 0.2 * torch.rand(b, t, 4, 4)), depth_truth)
    poses = orbit_poses(t).repeat(b, 1, 1, 1)
    noisy = poses.clone()
    noisy[..., :3, 3] += 0.1 * torch.randn(b, t, 3, generator=g, dtype=torch.float64)
    camera_inputs = (noisy, poses)
    data = {"object": object_inputs, "depth": depth_inputs, "camera": camera_inputs}
    torch.save(data, tmp_path / "data.pt")
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS_SCRIPT)
    subprocess.run([sys.executable, str(script), str(_free_port()), str(tmp_path)], check=True)
    expected = {}
    for metric, inputs in (
        (ObjectReconstruction(), object_inputs),
        (VideoDepth("scale"), depth_inputs),
        (VideoDepth("scale&shift"), depth_inputs),
        (CameraTrajectory(), camera_inputs),
    ):
        metric.update(*inputs)
        expected.update(metric.compute())
    for rank in range(2):
        values = torch.load(tmp_path / f"rank{rank}.pt")
        assert values.keys() == expected.keys()
        for name, value in expected.items():
            assert abs(values[name] - value) < 1e-9, (rank, name)


def test_rotation_angle_is_accurate_near_zero_and_at_large_angles():
    from post3r_train.metrics3d import rotation_angle_degrees

    for degrees in (1e-4, 30.0, 179.0):
        angle = math.radians(degrees)
        rotation = torch.tensor(
            [
                [math.cos(angle), -math.sin(angle), 0],
                [math.sin(angle), math.cos(angle), 0],
                [0, 0, 1],
            ],
            dtype=torch.float64,
        )
        assert abs(float(rotation_angle_degrees(rotation)) - degrees) < 1e-9


# ------------------------------------------------------------------------------------------
# The model's outputs and the baselines (eval3d)


def test_update_3d_metrics_scores_exact_outputs_and_the_baselines_on_a_plane_scene():
    from post3r_train.eval3d import make_3d_metrics, pixel_rays, update_3d_metrics
    from post3r_train.geometry import transform_frames
    from post3r_train.model import PointmapOutput

    size, depth = 8, 3.0
    intrinsics = torch.tensor([[8.0, 0, 3.5], [0, 8.0, 3.5], [0, 0, 1]]).expand(1, 2, 3, 3)
    poses = torch.eye(4).repeat(1, 2, 1, 1)
    poses[0, 1, 0, 3] = 0.5  # the second camera moved sideways
    points = transform_frames(
        depth * pixel_rays(intrinsics.double(), (size, size), (size, size)), poses.double()
    )
    ids = torch.ones(1, 2, size, size, dtype=torch.long)
    ids[..., size // 2 :] = 2
    masks = torch.nn.functional.one_hot(ids - 1, 2).movedim(-1, 2).float()
    batch = {
        "pointmap": points.float(),
        "depth": torch.full((1, 2, size, size), depth),
        "camera_to_world": poses,
        "intrinsics": intrinsics,
        "segmentations": ids,
    }
    out = PointmapOutput(
        prediction=points.float(),
        pointmap=points.float(),
        slot_pointmaps=points[:, :, None].expand(-1, -1, 2, -1, -1, -1).float(),
        masks=masks,
        scale=torch.ones(1),
        target=None,
        camera_to_world=poses,
    )
    metrics = make_3d_metrics()
    update_3d_metrics(metrics, out, batch)
    values = {}
    for metric in metrics.values():
        values.update(metric.compute())
    assert values["obj3d_num_objects"] == 2 and values["obj3d_chamfer"] < 1e-6
    assert values["depth_abs_rel_scale"] < 1e-6 and values["camera_ate"] < 1e-6
    # The scene is a plane at constant depth: the plane baseline is exact too.
    assert values["baseline_plane_obj3d_chamfer"] < 1e-6
    assert values["baseline_plane_depth_abs_rel_scale_shift"] < 1e-6
    # Without object separation every true point is matched but half the slot's points are
    # on the other object.
    assert values["baseline_composite_obj3d_completeness"] < 1e-6
    assert values["baseline_composite_obj3d_accuracy"] > 0.05

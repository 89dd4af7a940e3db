"""The point splatting renderer: projection to known pixels, z-buffer order, orbit cameras."""

import math

import numpy as np
import torch

from post3r_train.render import (
    draw_legend,
    focal_from_fov,
    look_at,
    orbit_cameras,
    project,
    pulled_back,
    splat,
)


def test_known_points_project_to_the_expected_pixels():
    # Identity camera, focal 10, 21x31 image: centre pixel (15, 10); x/z and y/z scale by focal.
    points = torch.tensor([[0.0, 0.0, 2.0], [1.0, 0.0, 2.0], [0.0, -0.4, 1.0]])
    pixels, depth = project(points, torch.eye(4), focal=10.0, size=(21, 31))
    torch.testing.assert_close(pixels, torch.tensor([[15.0, 10.0], [20.0, 10.0], [15.0, 6.0]]))
    torch.testing.assert_close(depth, torch.tensor([2.0, 2.0, 1.0]))
    colors = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=torch.uint8)
    image, zbuffer = splat(points, colors, torch.eye(4), 10.0, (21, 31), radius=0)
    assert image[10, 15].tolist() == [255, 0, 0]
    assert image[10, 20].tolist() == [0, 255, 0]
    assert image[6, 15].tolist() == [0, 0, 255]
    assert torch.isfinite(zbuffer).sum() == 3  # nothing else drawn
    assert zbuffer[6, 15] == 1.0


def test_a_moved_camera_sees_the_point_from_its_own_pose():
    pose = torch.eye(4)
    pose[:3, 3] = torch.tensor([1.0, 0.0, 0.0])  # camera 1 to the right: the point is left
    pixels, depth = project(torch.tensor([[0.0, 0.0, 1.0]]), pose, focal=10.0, size=(21, 21))
    torch.testing.assert_close(pixels, torch.tensor([[0.0, 10.0]]))
    assert depth.item() == 1.0


def test_nearer_points_hide_farther_ones_in_any_order():
    near = torch.tensor([[0.0, 0.0, 1.0]])
    far = torch.tensor([[0.0, 0.0, 3.0]])
    red, blue = torch.tensor([[255, 0, 0]]), torch.tensor([[0, 0, 255]])
    for points, colors in (
        (torch.cat([near, far]), torch.cat([red, blue])),
        (torch.cat([far, near]), torch.cat([blue, red])),
    ):
        image, zbuffer = splat(points, colors.byte(), torch.eye(4), 10.0, (9, 9), radius=1)
        assert (image[3:6, 3:6] == torch.tensor([255, 0, 0], dtype=torch.uint8)).all()
        assert (zbuffer[3:6, 3:6] == 1.0).all()


def test_points_behind_the_camera_and_non_finite_points_are_skipped():
    points = torch.tensor([[0.0, 0.0, -1.0], [float("nan"), 0.0, 1.0]])
    image, zbuffer = splat(points, torch.full((2, 3), 255).byte(), torch.eye(4), 10.0, (9, 9))
    assert torch.isinf(zbuffer).all()
    assert (image != 255).all()


def test_look_at_and_orbit_cameras_look_at_the_centre():
    centre = torch.tensor([0.0, 0.0, 5.0])
    up = torch.tensor([0.0, -1.0, 0.0])
    pose = look_at(torch.tensor([0.0, 0.0, 0.0]), centre, up)
    torch.testing.assert_close(pose, torch.eye(4))  # OpenCV axes: already looking down +z
    for camera in orbit_cameras(centre, 2.0, 8, up):
        pixels, depth = project(centre[None], camera, 50.0, (101, 101))
        torch.testing.assert_close(pixels, torch.tensor([[50.0, 50.0]]), atol=1e-4, rtol=0)
        assert math.isclose(depth.item(), 2.0, rel_tol=1e-5)


def test_pulled_back_moves_along_the_viewing_axis():
    pose = look_at(torch.zeros(3), torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, -1.0, 0.0]))
    torch.testing.assert_close(pulled_back(pose, 2.0)[:3, 3], torch.tensor([-2.0, 0.0, 0.0]))


def test_focal_and_legend():
    assert math.isclose(focal_from_fov(100, 90.0), 50.0)
    image = np.zeros((40, 80, 3), np.uint8)
    drawn = draw_legend(image, ["slot 0", "slot 1"], np.array([[255, 0, 0], [0, 255, 0]]))
    assert (drawn[6, 8] == [255, 0, 0]).all() and (drawn[18, 8] == [0, 255, 0]).all()
    assert image.sum() == 0  # the input is left alone

"""From patch masks to image masks and ids, and from pointmaps and masks to per-slot clouds."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from post3r_slots._checks import check_shape


def patch_grid_size(num_patches: int, size: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) with h·w = `num_patches` and the aspect ratio of `size` = (H, W)."""
    height, width = size
    for rows in range(1, num_patches + 1):
        cols, remainder = divmod(num_patches, rows)
        if not remainder and rows * width == cols * height:
            return rows, cols
    raise ValueError(
        f"{num_patches} patches do not form a grid with the aspect ratio of {tuple(size)}; "
        "pass grid_size=(h, w)"
    )


def resize_masks(
    masks: torch.Tensor, size: tuple[int, int], *, mode: str = "bilinear"
) -> torch.Tensor:
    """Resize spatial slot masks (B, [T,] K, h, w) to (B, [T,] K, H, W), `size` = (H, W).

    `mode` is an interpolation mode of `torch.nn.functional.interpolate` (SlotContrast:
    bilinear). Float masks keep their dtype; others are returned as float32.
    """
    check_shape(masks, "masks", "B [T] K h w")
    leading = masks.shape[:-2]
    flat = masks.flatten(0, -3)[:, None]
    flat = flat if flat.is_floating_point() else flat.float()
    return F.interpolate(flat, size=tuple(size), mode=mode)[:, 0].unflatten(0, leading)


def patch_masks_to_image(
    masks: torch.Tensor,
    size: tuple[int, int],
    *,
    grid_size: tuple[int, int] | None = None,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Patch masks (B, [T,] K, N) → soft image masks (B, [T,] K, H, W).

    N is laid out row-major on `grid_size` = (h, w), by default the grid with h·w = N and the
    aspect ratio of `size` = (H, W).
    """
    num_patches = check_shape(masks, "masks", "B [T] K N")["N"]
    grid = tuple(grid_size) if grid_size is not None else patch_grid_size(num_patches, size)
    if grid[0] * grid[1] != num_patches:
        raise ValueError(f"grid_size {grid} does not hold the N={num_patches} patches of masks")
    return resize_masks(masks.unflatten(-1, grid), size, mode=mode)


def patch_masks_to_ids(
    masks: torch.Tensor, size: tuple[int, int], *, grid_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Patch masks (B, [T,] K, N) → per-pixel slot ids (B, [T,] H, W): bilinear upsampling,
    then argmax over slots (SlotContrast's hard decoder masks)."""
    return masks_to_ids(patch_masks_to_image(masks, size, grid_size=grid_size))


def masks_to_ids(masks: torch.Tensor, slot_dim: int = -3) -> torch.Tensor:
    """Hard assignment: the index of the most likely slot per pixel, ties to the lowest index.

    `masks` (B, [T,] K, H, W) → ids (B, [T,] H, W) int64.
    """
    return masks.argmax(dim=slot_dim)


def slot_point_clouds(
    points: torch.Tensor,
    masks: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
) -> list[list[torch.Tensor]]:
    """Each slot's 3D points: the pixels it wins (argmax over slots), over all frames.

    Args:
        points: one pointmap (B, [T,] H, W, 3), e.g. the backbone's world points, or per-slot
            pointmaps (B, [T,] K, H, W, 3) (`PointmapDecoderOutput.slot_pointmaps`), in which
            case each pixel takes the XYZ of the slot that wins it.
        masks: slot masks (B, [T,] K, H, W), soft or hard.
        valid: (B, [T,] H, W) bool, pixels to keep (e.g. confidence above a threshold).

    Returns:
        `clouds[b][k]`: (P_bk, 3) tensor of slot k's points in sample b.
    """
    sizes = check_shape(masks, "masks", "B [T] K H W")
    video, num_slots = "T" in sizes, sizes["K"]
    pixel_dims = "B T H W" if video else "B H W"
    ids = masks_to_ids(masks)
    if points.ndim == masks.ndim + 1:
        check_shape(points, "points", pixel_dims.replace("H", "K H") + " 3", **sizes)
        index = ids.unsqueeze(-3)[..., None].expand(*ids.shape[:-2], 1, *ids.shape[-2:], 3)
        points = points.gather(-4, index).squeeze(-4)
    else:
        check_shape(points, "points", pixel_dims + " 3", **sizes)
    if valid is not None:
        check_shape(valid, "valid", pixel_dims, **sizes)
        ids = torch.where(valid.bool(), ids, num_slots)  # invalid pixels go to a dropped bin
    clouds = []
    for sample_ids, sample_points in zip(ids.flatten(1), points.flatten(1, -2), strict=True):
        order = torch.argsort(sample_ids, stable=True)
        counts = torch.bincount(sample_ids, minlength=num_slots + 1).tolist()
        clouds.append(list(sample_points[order].split(counts))[:num_slots])
    return clouds

"""Vectorised ray caster for the synthetic scenes: a ground plane and boxes, spheres, cylinders.

All videos, frames, pixels and objects of a batch are traced at once with torch on the CPU:
a cheap bounding-sphere cull picks candidate pixel-object pairs, and only those get the exact
intersection, computed per shape kind. Large tensors only see +, -, *, /, sqrt, floor,
min/max, comparisons and selections (no fused ops, no reductions with arithmetic, no
transcendental functions), all exactly rounded in IEEE arithmetic, so the output does not
depend on thread count or SIMD tail handling: the same scene gives the same bytes.

Conventions: world z is up and the ground is z = 0. Cameras use OpenCV axes (x right, y down,
z forward) and pixel centres at integer coordinates. Rays have a camera-frame direction with
z = 1, so the ray parameter at a hit is the depth (camera-frame z), not the distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SPHERE, BOX, CYLINDER = 0, 1, 2
SHAPE_NAMES = ("sphere", "box", "cylinder")
SOLID, STRIPES, CHECKER = 0, 1, 2
PATTERN_NAMES = ("solid", "stripes", "checker")
_EPS = 1e-4  # minimum ray parameter of a valid hit
_SHADOW_OFFSET = 1e-3  # shadow rays start this far along the surface normal
_INF = float("inf")

Vec = tuple[Tensor, ...]  # (x, y, z) components, each of the same shape


@dataclass
class SceneBatch:
    """V scenes of T frames with up to K objects each (float32 tensors unless stated).

    Objects are upright: each has a centre, a yaw about world z, and half extents. A sphere uses
    `half[..., 0]` as its radius; a cylinder (axis z) uses `half[..., 0]` as radius and
    `half[..., 2]` as half height; a box uses all three.
    """

    height: int
    width: int
    focal: float  # pixels, same for x and y
    cx: float
    cy: float
    cam_origin: Tensor  # (V, T, 3) camera centre in world
    cam_rotation: Tensor  # (V, T, 3, 3) camera-to-world rotation; columns are camera axes
    present: Tensor  # (V, K) bool
    shape: Tensor  # (V, K) int64: SPHERE, BOX or CYLINDER
    center: Tensor  # (V, T, K, 3)
    yaw_cos: Tensor  # (V, T, K)
    yaw_sin: Tensor  # (V, T, K)
    half: Tensor  # (V, K, 3)
    color: Tensor  # (V, K, 3) albedo in [0, 1]
    pattern: Tensor  # (V, K) int64: SOLID, STRIPES or CHECKER
    frequency: Tensor  # (V, K) pattern cycles per world unit
    ground_colors: Tensor  # (V, 2, 3) the two checker colours of the ground
    ground_tile: Tensor  # (V,) checker tile size in world units
    light: Tensor  # (V, 3) unit vector towards the light
    ambient: Tensor  # (V,) ambient fraction in [0, 1]
    texture_contrast: float = 0.35
    shadows: bool = True

    def only(self, keep: Tensor) -> SceneBatch:
        """The same scenes with only the objects where `keep` (V, K) is true."""
        return SceneBatch(**{**self.__dict__, "present": self.present & keep})


def _dot(a: Vec, b: Vec) -> Tensor:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _split(x: Tensor) -> Vec:
    return x[..., 0], x[..., 1], x[..., 2]


def _to_local(v: Vec, cos: Tensor, sin: Tensor) -> Vec:
    """Rotate a world vector into an object's frame (inverse yaw)."""
    return cos * v[0] + sin * v[1], cos * v[1] - sin * v[0], v[2]


def _to_world(v: Vec, cos: Tensor, sin: Tensor) -> Vec:
    return cos * v[0] - sin * v[1], sin * v[0] + cos * v[1], v[2]


def _first_root(a: Tensor, b: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """Smaller root of a t^2 + 2 b t + c = 0 and whether it is real."""
    disc = b * b - a * c
    real = disc >= 0
    return (-b - torch.sqrt(torch.clamp(disc, min=0.0))) / a, real


def _hit(valid: Tensor, t: Tensor) -> Tensor:
    return torch.where(valid & (t > _EPS), t, _INF)


def _sphere(o: Vec, d: Vec, half: Vec) -> Tensor:
    radius = half[0]
    t, real = _first_root(_dot(d, d), _dot(o, d), _dot(o, o) - radius * radius)
    return _hit(real, t)


def _box(o: Vec, d: Vec, half: Vec) -> Tensor:
    near, far = None, None
    for oi, di, hi in zip(o, d, half, strict=True):
        t1, t2 = (-hi - oi) / di, (hi - oi) / di
        lo, hi_t = torch.minimum(t1, t2), torch.maximum(t1, t2)
        near = lo if near is None else torch.maximum(near, lo)
        far = hi_t if far is None else torch.minimum(far, hi_t)
    assert near is not None and far is not None  # three axes
    return _hit(near <= far, near)


def _cylinder(o: Vec, d: Vec, half: Vec) -> Tensor:
    radius, half_height = half[0], half[2]
    a = d[0] * d[0] + d[1] * d[1]
    b = o[0] * d[0] + o[1] * d[1]
    c = o[0] * o[0] + o[1] * o[1] - radius * radius
    t_side, real = _first_root(a, b, c)
    z_side = o[2] + t_side * d[2]
    t = _hit(real & (torch.abs(z_side) <= half_height), t_side)
    for cap in (half_height, -half_height):
        t_cap = (cap - o[2]) / d[2]
        x, y = o[0] + t_cap * d[0], o[1] + t_cap * d[1]
        t = torch.minimum(t, _hit(x * x + y * y <= radius * radius, t_cap))
    return t


def _bounding_radius(scene: SceneBatch) -> Tensor:
    """(V, K) radius of a sphere around each object's centre that contains the object."""
    hx, hy, hz = _split(scene.half)
    box = torch.sqrt(hx * hx + hy * hy + hz * hz)
    cylinder = torch.sqrt(hx * hx + hz * hz)
    return torch.where(scene.shape == SPHERE, hx, torch.where(scene.shape == BOX, box, cylinder))


def _per_shape(shape: Tensor, functions: dict, *args: tuple[Tensor, ...]) -> list[Tensor]:
    """Evaluate `functions[kind](*args)` on the elements of each shape kind and reassemble.

    Each function takes and returns tuples of 1-D tensors; computing only the matching kind per
    element costs a third of evaluating every kind everywhere.
    """
    outputs = None
    for kind, function in functions.items():
        index = (shape == kind).nonzero()[:, 0]
        if index.numel() == 0:
            continue
        result = function(*(tuple(x[index] for x in arg) for arg in args))
        if outputs is None:
            outputs = [torch.empty_like(args[0][0]) for _ in result]
        for out, value in zip(outputs, result, strict=True):
            out[index] = value
    return outputs if outputs is not None else []


def _intersect_local(o: Vec, d: Vec, half: Vec, shape: Tensor) -> Tensor:
    """First hit of 1-D batches of rays with objects, in the objects' frames (inf for a miss)."""
    if shape.numel() == 0:
        return torch.empty(0)
    functions = {
        SPHERE: lambda *a: (_sphere(*a),),
        BOX: lambda *a: (_box(*a),),
        CYLINDER: lambda *a: (_cylinder(*a),),
    }
    return _per_shape(shape, functions, o, d, half)[0]


def _primary_candidates(scene: SceneBatch) -> Tensor:
    """(V, T, P, K) pixels that may see each object: inside the image box of its bounding sphere.

    The box bounds x/z and y/z over the sphere's axis-aligned box in camera coordinates, which
    contains the projected sphere, plus one pixel of margin.
    """
    rotation, origin = scene.cam_rotation, scene.cam_origin  # (V, T, 3, 3), (V, T, 3)
    offset = tuple(c - origin[:, :, None, i] for i, c in enumerate(_split(scene.center)))
    x, y, z = (
        _dot(tuple(rotation[:, :, None, r, axis] for r in range(3)), offset) for axis in range(3)
    )
    radius = _bounding_radius(scene)[:, None, :]
    near, far = z - radius, z + radius
    if not (near > 0).all():
        raise ValueError("an object reaches behind the camera; move the camera further away")

    def pixel_range(lateral: Tensor, centre: float, size: int) -> Tensor:
        low, high = lateral - radius, lateral + radius
        low = torch.where(low < 0, low / near, low / far) * scene.focal + centre - 1.0
        high = torch.where(high > 0, high / near, high / far) * scene.focal + centre + 1.0
        grid = torch.arange(size, dtype=torch.float32)[:, None]  # (size, 1) against (V, T, 1, K)
        return (grid >= low[:, :, None]) & (grid <= high[:, :, None])  # (V, T, size, K)

    in_columns = pixel_range(x, scene.cx, scene.width) & scene.present[:, None, None, :]
    in_rows = pixel_range(y, scene.cy, scene.height)
    candidate = in_rows[:, :, :, None, :] & in_columns[:, :, None, :, :]
    return candidate.flatten(2, 3)


def _shadow_candidates(start: Vec, scene: SceneBatch) -> Tensor:
    """(V, T, P, K) shadow rays that may hit each object: those passing within its bounding
    radius in the plane across the light, from a start not entirely past the object."""
    light = scene.light  # (V, 3)
    across = torch.linalg.cross(light, torch.tensor([[0.0, 0.0, 1.0]]).expand_as(light))
    e1 = across / torch.linalg.vector_norm(across, dim=-1, keepdim=True)
    e2 = torch.linalg.cross(light, e1)
    center = _split(scene.center)  # (V, T, K) each
    point, centre = [], []
    for axis in (e1, e2, light):
        a = tuple(axis[:, None, None, i] for i in range(3))
        point.append(_dot(a, start)[..., None])  # (V, T, P, 1)
        centre.append(_dot(a, center)[:, :, None, :])  # (V, T, 1, K)
    radius = _bounding_radius(scene)[:, None, None, :]
    d1, d2 = point[0] - centre[0], point[1] - centre[1]
    candidate = (d1 * d1 + d2 * d2 <= radius * radius) & (point[2] - centre[2] < radius)
    return candidate & scene.present[:, None, None, :]


def _trace_objects(origin: Vec, direction: Vec, scene: SceneBatch, candidate: Tensor) -> Tensor:
    """Ray parameter of the first hit with every object, (V, T, P, K), inf for a miss.

    `origin` and `direction` components broadcast to (V, T, P); only the ray-object pairs
    marked in `candidate` (a conservative cull) get the exact intersection.
    """
    v, t, p, k = candidate.nonzero(as_tuple=True)
    center = _split(scene.center[v, t, k])
    pixel = (v, t, p)

    def pick(x: Tensor) -> Tensor:
        return x.expand(candidate.shape[:3])[pixel]

    cos, sin = scene.yaw_cos[v, t, k], scene.yaw_sin[v, t, k]
    o_local = _to_local(tuple(pick(o) - c for o, c in zip(origin, center, strict=True)), cos, sin)
    d_local = _to_local(tuple(pick(d) for d in direction), cos, sin)
    hits = _intersect_local(o_local, d_local, _split(scene.half[v, k]), scene.shape[v, k])
    result = torch.full(candidate.shape, _INF)
    result[v, t, p, k] = hits
    return result


def _sphere_normal(p: Vec, half: Vec) -> Vec:
    return tuple(pi / half[0] for pi in p)


def _box_normal(p: Vec, half: Vec) -> Vec:
    """The face is the axis where the point is relatively furthest out."""
    sx, sy, sz = (torch.abs(pi) / hi for pi, hi in zip(p, half, strict=True))
    on_x = (sx >= sy) & (sx >= sz)
    on_y = ~on_x & (sy >= sz)
    on_z = ~on_x & ~on_y
    zero = torch.zeros_like(sx)
    return tuple(
        torch.where(on, torch.sign(pi), zero) for on, pi in zip((on_x, on_y, on_z), p, strict=True)
    )


def _cylinder_normal(p: Vec, half: Vec) -> Vec:
    """A cap if the point is relatively further out along the axis than radially."""
    rho = torch.sqrt(p[0] * p[0] + p[1] * p[1])
    on_cap = torch.abs(p[2]) / half[2] >= rho / half[0]
    safe_rho = torch.clamp(rho, min=1e-12)
    zero = torch.zeros_like(rho)
    return (
        torch.where(on_cap, zero, p[0] / safe_rho),
        torch.where(on_cap, zero, p[1] / safe_rho),
        torch.where(on_cap, torch.sign(p[2]), zero),
    )


def _local_normal(p: Vec, half: Vec, shape: Tensor) -> Vec:
    """Outward normal in the object's frame at surface points p (not normalised for boxes)."""
    functions = {SPHERE: _sphere_normal, BOX: _box_normal, CYLINDER: _cylinder_normal}
    return tuple(_per_shape(shape, functions, p, half)) or (shape.float(),) * 3


def _pattern(p: Vec, kind: Tensor, frequency: Tensor) -> Tensor:
    """0/1 texture value at object-frame point p: horizontal stripes or a 3D checker."""
    cells = [torch.floor(pi * frequency) for pi in p]
    stripes = torch.remainder(cells[2], 2.0)
    checker = torch.remainder(cells[0] + cells[1] + cells[2], 2.0)
    zero = torch.zeros_like(stripes)
    return torch.where(kind == STRIPES, stripes, torch.where(kind == CHECKER, checker, zero))


def _normalize(v: Vec) -> Vec:
    norm = torch.sqrt(_dot(v, v))
    return tuple(vi / norm for vi in v)


def _rays(scene: SceneBatch) -> tuple[Vec, Vec]:
    """Camera centres (V, T, 1) and world ray directions (V, T, P) per component."""
    v, u = torch.meshgrid(
        torch.arange(scene.height, dtype=torch.float32),
        torch.arange(scene.width, dtype=torch.float32),
        indexing="ij",
    )
    x_cam = ((u - scene.cx) / scene.focal).reshape(1, 1, -1)
    y_cam = ((v - scene.cy) / scene.focal).reshape(1, 1, -1)
    rot = scene.cam_rotation[..., None]  # (V, T, 3, 3, 1)
    direction = tuple(
        rot[:, :, i, 0] * x_cam + rot[:, :, i, 1] * y_cam + rot[:, :, i, 2] for i in range(3)
    )
    origin = tuple(c[:, :, None] for c in _split(scene.cam_origin))
    return origin, direction


def _object_surface(
    point: Vec, label: Tensor, scene: SceneBatch
) -> tuple[tuple[Tensor, ...], Vec, list[Tensor]]:
    """Indices (v, t, p), world normals and albedo (r, g, b) of the pixels that show objects."""
    v, t, p = (label > 0).nonzero(as_tuple=True)
    k = label[v, t, p].long() - 1
    cos, sin = scene.yaw_cos[v, t, k], scene.yaw_sin[v, t, k]
    center = _split(scene.center[v, t, k])
    local = _to_local(tuple(x[v, t, p] - c for x, c in zip(point, center, strict=True)), cos, sin)
    shape = scene.shape[v, k]
    normal = _normalize(_to_world(_local_normal(local, _split(scene.half[v, k]), shape), cos, sin))
    texture = _pattern(local, scene.pattern[v, k], scene.frequency[v, k])
    shade = 1.0 - scene.texture_contrast * texture
    albedo = [scene.color[v, k, c] * shade for c in range(3)]
    return (v, t, p), normal, albedo


def _in_shadow(point: Vec, normal: Vec, scene: SceneBatch) -> Tensor:
    """Whether a ray from each surface point towards the light hits an object."""
    start = tuple(p + _SHADOW_OFFSET * n for p, n in zip(point, normal, strict=True))
    light = tuple(lc[:, None, None] for lc in _split(scene.light))
    hits = _trace_objects(start, light, scene, _shadow_candidates(start, scene))
    return torch.isfinite(hits).any(dim=-1)


def render(scene: SceneBatch) -> dict[str, Tensor]:
    """Trace every pixel of every frame.

    Returns `rgb` uint8 (V, T, H, W, 3), `segmentation` uint8 (V, T, H, W) with 0 = ground and
    k + 1 = object k, `depth` float32 (V, T, H, W) and `pointmap` float32 (V, T, H, W, 3) in
    world coordinates. The camera must look down at the ground so that every ray hits it.
    """
    V, T = scene.cam_origin.shape[:2]
    H, W = scene.height, scene.width
    origin, direction = _rays(scene)

    # Nearest hit among the ground plane and all objects.
    t_ground = torch.where(direction[2] < 0, -origin[2] / direction[2], _INF)
    t_objects = _trace_objects(origin, direction, scene, _primary_candidates(scene))
    depth, label = torch.min(torch.cat([t_ground[..., None], t_objects], dim=-1), dim=-1)
    if not torch.isfinite(depth).all():
        raise ValueError("some rays miss the ground; raise the camera elevation")
    point = tuple(o + depth * d for o, d in zip(origin, direction, strict=True))

    # Ground everywhere first, then the object pixels written over it.
    tile = scene.ground_tile[:, None, None]
    parity = torch.remainder(torch.floor(point[0] / tile) + torch.floor(point[1] / tile), 2.0)
    colors = scene.ground_colors[:, None, None]
    albedo = [torch.where(parity > 0, colors[..., 1, c], colors[..., 0, c]) for c in range(3)]
    normal = (torch.zeros_like(depth), torch.zeros_like(depth), torch.ones_like(depth))
    index, object_normal, object_albedo = _object_surface(point, label, scene)
    for full, part in zip((*normal, *albedo), (*object_normal, *object_albedo), strict=True):
        full[index] = part

    light = tuple(lc[:, None, None] for lc in _split(scene.light))
    lambert = torch.clamp(_dot(normal, light), min=0.0)
    if scene.shadows:
        lambert = torch.where(_in_shadow(point, normal, scene), 0.0, lambert)
    ambient = scene.ambient[:, None, None]
    shade = ambient + (1.0 - ambient) * lambert
    rgb = torch.stack([a * shade for a in albedo], dim=-1)
    rgb = torch.floor(torch.clamp(rgb, 0.0, 1.0) * 255.0 + 0.5).to(torch.uint8)
    return {
        "rgb": rgb.reshape(V, T, H, W, 3),
        "segmentation": label.to(torch.uint8).reshape(V, T, H, W),
        "depth": depth.reshape(V, T, H, W),
        "pointmap": torch.stack(point, dim=-1).reshape(V, T, H, W, 3),
    }

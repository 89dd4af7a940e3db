"""`uv run apps/doctor [CONFIG] [--data-dir D] [key=value ...]`: check a machine before a long job.

One line per check: `ok`, `skip` (does not apply here, e.g. no GPU) or `PROBLEM` with the fix.
The exit status is 1 when any check found a problem, else 0. Without CONFIG (and without
overrides or --data-dir) only the environment and the GPU kernels are checked; with one, also
the files and data that config needs and the memory its batch needs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from post3r_train.config import ConfigError, load_config

OK, SKIP, PROBLEM = "ok", "skip", "PROBLEM"
# Distributions that install the `triton` package: PyPI's (NVIDIA) and the ROCm builds.
TRITON_DISTRIBUTIONS = ("triton", "pytorch-triton-rocm", "pytorch-triton", "triton-rocm")
ROCM_TRITONS = ("pytorch-triton-rocm", "triton-rocm")
# Triton against the reference on a model-sized input; bf16 is rounded once, hence looser.
KERNEL_SHAPE = (2, 12, 769, 64)  # (B, H, N, D): the decoder's heads, 512x384 tokens + pose
KERNEL_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {  # (rtol, atol)
    torch.float32: (1e-5, 3e-5),
    torch.bfloat16: (1.6e-2, 2e-2),
}


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, its status, what was found, and the fix."""

    name: str
    status: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<8} {self.name:<18} {self.detail}"
        return f"{text}\n{'':<27} fix: {self.fix}" if self.fix else text


def problem(name: str, detail: str, fix: str) -> Check:
    return Check(name, PROBLEM, detail, fix)


# ----------------------------------------------------------------------------------------------
# Environment


def check_python() -> Check:
    # The packages require >= 3.11, so an older Python never gets this far.
    return Check("python", OK, f"{platform.python_version()} ({sys.executable})")


def torch_build() -> str:
    """'CUDA 13.0', 'HIP 7.0.1' or 'CPU-only'."""
    if torch.version.hip:
        return f"HIP {torch.version.hip}"
    if torch.version.cuda:
        return f"CUDA {torch.version.cuda}"
    return "CPU-only"


def check_torch() -> Check:
    return Check("torch", OK, f"{torch.__version__}, {torch_build()} build")


def installed_tritons() -> dict[str, str]:
    """Installed distributions that provide `triton`, with their versions."""
    found = {}
    for name in TRITON_DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def torch_triton_requirement() -> str | None:
    """The triton distribution torch's own metadata asks for (e.g. 'pytorch-triton-rocm')."""
    try:
        requirements = importlib.metadata.requires("torch") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for requirement in requirements:
        match = re.match(r"[A-Za-z0-9_.-]+", requirement)
        name = match.group().lower().replace("_", "-") if match else ""
        if name in TRITON_DISTRIBUTIONS:
            return name
    return None


def check_triton(tritons: dict[str, str], hip: bool, wanted: str | None, gpu_count: int) -> Check:
    """Triton matches the torch build: ROCm's triton next to ROCm's torch, never both kinds."""
    uninstall = "uv pip uninstall triton, then reinstall ROCm's torch (README: GPUs)"
    if not tritons:
        detail = "not installed: rope2d runs the PyTorch reference"
        if gpu_count:
            build = "ROCm's torch brings pytorch-triton-rocm" if hip else "torch pins triton"
            return problem("triton", detail, f"reinstall torch with its triton ({build})")
        return Check("triton", OK, detail + " (fine without a GPU)")
    found = ", ".join(f"{name} {version}" for name, version in tritons.items())
    rocm = [name for name in tritons if name in ROCM_TRITONS]
    cuda = [name for name in tritons if name not in ROCM_TRITONS]
    if rocm and cuda:
        return problem(
            "triton", f"{found}: a CUDA and a ROCm triton in one `triton/` folder", uninstall
        )
    if hip and cuda:
        return problem("triton", f"{found} (a CUDA build) next to a ROCm (HIP) torch", uninstall)
    if not hip and rocm:
        return problem(
            "triton",
            f"{found} (a ROCm build) next to a torch without ROCm ({torch_build()})",
            "uv pip uninstall pytorch-triton-rocm, then `uv sync` (restores PyPI's triton)",
        )
    if wanted and wanted not in tritons:
        return problem(
            "triton",
            f"{found}, but torch {torch.__version__} was built against {wanted}",
            f"install the {wanted} that torch pins (uv pip install --reinstall torch)",
        )
    pinned = "the one torch pins; " if wanted else ""
    return Check("triton", OK, f"{found} ({pinned}{_distribution_location(next(iter(tritons)))})")


def _distribution_location(name: str) -> str:
    try:
        distribution = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed here"
    installer = (distribution.read_text("INSTALLER") or "?").strip()
    return f"installed by {installer} into {distribution.locate_file('')}"


def check_gpus() -> Check:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not count:
        return Check("gpus", SKIP, "no device (CPU-only: the GPU checks below are skipped)")
    described = []
    for index in range(count):
        props = torch.cuda.get_device_properties(index)
        arch = getattr(props, "gcnArchName", "") or f"sm_{props.major}{props.minor}"
        described.append(f"{index}: {props.name} ({arch}, {props.total_memory / 2**30:.0f} GiB)")
    return Check("gpus", OK, "; ".join(described))


def check_rope2d_choice() -> Check:
    """Which implementation `rope2d` runs for bf16 tokens on the first device (or the CPU)."""
    from post3r_kernels import ENV_VAR, resolve_rope2d_impl

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.empty(1, 1, 1, 4, dtype=torch.bfloat16, device=device)
    try:
        chosen = resolve_rope2d_impl(None, x)
    except ValueError as error:
        return problem("rope2d impl", str(error), f"unset {ENV_VAR} or set it to a listed name")
    source = f"{ENV_VAR}={os.environ[ENV_VAR]}" if os.environ.get(ENV_VAR) else "auto"
    return Check("rope2d impl", OK, f"{chosen} for bf16 on {device} ({source})")


# ----------------------------------------------------------------------------------------------
# The Triton kernel on each device


def compare_rope2d(impl: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when `impl` matches the torch reference forward and backward, else what differs."""
    from post3r_kernels import rope2d

    generator = torch.Generator().manual_seed(0)
    batch, heads, tokens, dim = KERNEL_SHAPE
    qkv = torch.randn(batch, tokens, 3, heads, dim, generator=generator)
    x = qkv.to(device=device, dtype=dtype)[:, :, 1].transpose(1, 2)  # k, as the backbone slices
    positions = torch.randint(-1, 48, (batch, tokens, 2), generator=generator).to(device)
    grad = torch.randn(x.shape, generator=generator).to(device=device, dtype=dtype)
    results = {}
    for name in (impl, "torch"):
        leaf = x.detach().requires_grad_()
        out = rope2d(leaf, positions, impl=name)
        out.backward(grad)
        results[name] = (out, leaf.grad)
    for what, index in (("forward", 0), ("backward", 1)):
        got, expected = results[impl][index], results["torch"][index]
        try:
            rtol, atol = KERNEL_TOLERANCES[dtype]
            torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
        except AssertionError as error:
            return f"{what} differs: {str(error).splitlines()[0]}"
    return None


def check_rope2d_kernels(impl: str = "triton") -> Iterator[Check]:
    """`impl` (the Triton kernel) against the reference on every visible device."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not count:
        yield Check(
            "rope2d kernel",
            SKIP,
            "no device (the CPU interpreter runs it: uv run pytest packages/kernels)",
        )
        return
    fix = "force the reference with POST3R_ROPE2D_IMPL=torch and report the failure"
    for index in range(count):
        device = torch.device("cuda", index)
        for dtype in KERNEL_TOLERANCES:
            name = f"rope2d cuda:{index}"
            label = str(dtype).removeprefix("torch.")
            try:
                with torch.cuda.device(index):  # Triton launches on the current device
                    difference = compare_rope2d(impl, device, dtype)
            except Exception as error:  # a compile or launch failure is the finding itself
                yield problem(name, f"{label}: {type(error).__name__}: {error}", fix)
                continue
            if difference:
                yield problem(name, f"{label}: {difference}", fix)
            else:
                yield Check(name, OK, f"{impl} = torch reference, {label} forward and backward")


# ----------------------------------------------------------------------------------------------
# What a config needs


def check_teacher_checkpoint(cfg: DictConfig) -> Check:
    """The TTT3R checkpoint exists and loads strictly into the architecture it describes."""
    teacher = cfg.model.teacher
    if teacher.name == "cached":
        return Check(
            "teacher weights",
            SKIP,
            "model.teacher.name=cached: training reads the cache (apps/cache-teacher, which "
            "made it, needed the checkpoint)",
        )
    if teacher.name != "ttt3r":
        return Check("teacher weights", SKIP, f"model.teacher.name={teacher.name}: no checkpoint")
    if teacher.checkpoint is None:
        if teacher.random_weights:
            return Check("teacher weights", OK, "random weights (model.teacher.random_weights)")
        return problem(
            "teacher weights",
            "model.teacher.checkpoint is not set",
            "set model.teacher.checkpoint=checkpoints/cut3r_512_dpt_4_64.pth "
            "(packages/backbone/README.md says where to get it)",
        )
    from post3r_backbone import TTT3RCheckpointError, TTT3RCheckpointNotFoundError, load_checkpoint

    try:
        model = load_checkpoint(teacher.checkpoint)
    except TTT3RCheckpointNotFoundError as error:
        first, *rest = str(error).splitlines()
        return problem("teacher weights", first, " ".join(rest) or "download the checkpoint")
    except (TTT3RCheckpointError, OSError, ValueError) as error:
        return problem(
            "teacher weights",
            f"{teacher.checkpoint} does not load: {error}",
            "download it again, or convert it with apps/convert-checkpoint",
        )
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    return Check(
        "teacher weights",
        OK,
        f"{teacher.checkpoint}: loads strictly ({millions:.0f} M parameters)",
    )


def check_encoder_weights(cfg: DictConfig) -> Check:
    """The DINOv2 weights exist and fit the configured timm ViT."""
    encoder = cfg.model.encoder
    if encoder.name != "dinov2":
        return Check("encoder weights", SKIP, f"model.encoder.name={encoder.name}: no file")
    if not encoder.pretrained:
        return Check("encoder weights", OK, "random weights (model.encoder.pretrained=false)")
    from post3r_train.encoders import DinoV2Encoder, MissingWeightsError

    try:
        DinoV2Encoder(
            encoder.timm_model,
            weights=encoder.weights,
            block=encoder.block,
            image_size=encoder.image_size,
            timm_kwargs=dict(encoder.timm_kwargs),
        )
    except MissingWeightsError as error:
        where = f"{encoder.weights}: not found" if encoder.weights else "no weights file set"
        return problem("encoder weights", where, str(error))
    except (ValueError, RuntimeError, OSError) as error:
        return problem(
            "encoder weights",
            f"{encoder.weights} does not load: {error}",
            f"use {encoder.timm_model} weights (timm's .safetensors or Meta's .pth)",
        )
    return Check("encoder weights", OK, f"{encoder.weights}: loads into {encoder.timm_model}")


def check_data(cfg: DictConfig) -> Iterator[Check]:
    """Train and validation shards exist and the first sample of each split decodes."""
    from post3r_data import find_shards, make_val_loader
    from post3r_train.config import frame_size
    from post3r_train.data import data_root

    d = cfg.dataset
    if d.name == "synthetic" and d.root is None:
        root = data_root(cfg)
        state = "generated" if root.is_dir() else "not generated yet"
        yield Check("data", SKIP, f"synthetic, {state} in {root} (apps/train generates it)")
        return
    try:
        root = data_root(cfg)
    except FileNotFoundError as error:
        yield problem("data", "no data directory", str(error))
        return
    if not root.is_dir():  # one line for both splits
        try:
            find_shards(root, d.name, "train")
        except FileNotFoundError as error:
            detail, _, fix = str(error).partition("; ")
            yield problem("data", detail, fix)
            return
    for split in ("train", "validation"):
        name = f"data {split}"
        try:
            shards = find_shards(root, d.name, split)
        except FileNotFoundError as error:
            detail, _, fix = str(error).partition("; ")
            yield problem(name, detail, fix or "pass --data-dir DIR")
            continue
        try:
            loader = make_val_loader(
                shards[:1],
                resolution=frame_size(cfg),
                batch_size=1,
                chunk_size=None,
                rank=0,
                world_size=1,
                on_error="raise",
            )
            sample = next(iter(loader))
        except StopIteration:
            yield problem(name, f"{shards[0]} holds no video", "re-create the shards")
            continue
        except Exception as error:  # the reader's own errors name the shard and the sample
            yield problem(
                name,
                f"the first sample does not decode: {error}",
                f"re-create {Path(shards[0]).name} (e.g. rerun the command that wrote {root})",
            )
            continue
        frames = sample["frames"].shape[1]
        fields = ", ".join(sorted(k for k in sample if k != "frames"))
        detail = (
            f"{len(shards)} shards in {root}; the first video decodes "
            f"({frames} frames, {fields or 'frames only'})"
        )
        if split == "train" and frames < d.chunk_size:
            yield problem(
                name,
                f"{detail}, shorter than dataset.chunk_size={d.chunk_size}",
                "lower dataset.chunk_size (videos shorter than a clip are skipped)",
            )
            continue
        yield Check(name, OK, detail)


def check_teacher_cache(cfg: DictConfig, config: str | None, overrides: Sequence[str]) -> Check:
    """For `model.teacher.name=cached`: the cache is complete and made by the run's teacher from
    the run's data (the check training runs before its first step), else the command that
    builds or resumes it."""
    teacher = cfg.model.teacher
    if teacher.name != "cached":
        return Check("teacher cache", SKIP, f"model.teacher.name={teacher.name}: no cache used")
    from post3r_train.data import data_root
    from post3r_train.teacher_cache import (
        TeacherCacheError,
        build_command,
        cache_dir,
        check_teacher_cache,
    )

    try:
        root = data_root(cfg)
    except FileNotFoundError as error:
        return problem("teacher cache", "no data directory to match it to", str(error))
    command = build_command(config, overrides, root, cache_dir(cfg, root))
    try:
        directory = check_teacher_cache(cfg, root, command)
    except TeacherCacheError as error:
        detail, _, fix = str(error).rpartition("; ")
        return problem("teacher cache", detail or fix, fix)
    except FileNotFoundError as error:  # no data shards: the data check names the fix
        return problem("teacher cache", "no data shards to match it to", str(error))
    return Check("teacher cache", OK, f"{directory}: complete, made by this run's teacher")


def gpu_memory() -> list[int]:
    """Total bytes of each visible GPU (empty without one)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [torch.cuda.get_device_properties(i).total_memory for i in range(count)]


def check_memory(cfg: DictConfig, gpu_bytes: Sequence[int]) -> Check:
    """Peak memory of one training step at the config's batch against the smallest GPU's."""
    from post3r_train.memory_estimate import estimate_training_memory, human_bytes

    try:
        estimate = estimate_training_memory(cfg)
    except Exception as error:  # an estimate that cannot be made is reported, not fatal
        return problem(
            "memory estimate",
            f"could not trace a training step: {type(error).__name__}: {error}",
            "run `uv run apps/train CONFIG --dry` to see the error",
        )
    smallest = min(gpu_bytes, default=None)
    if smallest is not None and estimate.peak_bytes > 0.9 * smallest:
        return problem(
            "memory estimate",
            f"{estimate.describe()}, more than 90 % of the GPU's {human_bytes(smallest)}",
            "lower dataset.batch_size and raise trainer.accumulate_grad_batches by the same "
            "factor, or use trainer.precision=bf16",
        )
    where = f"fits the GPU's {human_bytes(smallest)}" if smallest else "no GPU here to compare"
    return Check("memory estimate", OK, f"{estimate.describe()}; {where}")


# ----------------------------------------------------------------------------------------------
# The report


def environment_checks() -> Iterator[Check]:
    yield check_python()
    yield check_torch()
    gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    yield check_triton(
        installed_tritons(), bool(torch.version.hip), torch_triton_requirement(), gpu_count
    )
    yield check_gpus()
    yield check_rope2d_choice()
    yield from check_rope2d_kernels()


def config_checks(config: str | None, overrides: list[str]) -> Iterator[Check]:
    try:
        cfg = load_config(config, overrides)
    except ConfigError as error:
        yield problem("config", str(error), "fix the config file or the override")
        return
    yield Check("config", OK, f"{config or 'default'} loads ({len(overrides)} overrides)")
    yield check_teacher_checkpoint(cfg)
    yield check_encoder_weights(cfg)
    yield from check_data(cfg)
    yield check_teacher_cache(cfg, config, overrides)
    yield check_memory(cfg, gpu_memory())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apps/doctor",
        description="Check this machine (and, given a config, its files and data) before a job.",
        epilog="Exit status 1 when a check found a problem. Example: "
        "uv run apps/doctor ytvis2021 --data-dir data/ytvis2021",
    )
    parser.add_argument(
        "items",
        nargs="*",
        metavar="[CONFIG] [key=value ...]",
        help="a config (path or name in configs/) and overrides, as for apps/train",
    )
    parser.add_argument("--data-dir", type=Path, help="dataset directory (sets dataset.root)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `uv run apps/doctor`; returns the exit status."""
    from post3r_train.cli import split_items

    parser = build_parser()
    args = parser.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    try:
        config, overrides = split_items(args.items)
    except ConfigError as error:
        parser.error(str(error))
    checks = list(environment_checks())
    for check in checks:
        print(check.line(), flush=True)
    if args.data_dir is not None:
        overrides = [*overrides, f"dataset.root={args.data_dir}"]
    if config is not None or overrides:
        for check in config_checks(config, overrides):
            print(check.line(), flush=True)
            checks.append(check)
    problems = [check for check in checks if check.status == PROBLEM]
    print(f"{len(problems)} problem(s) in {len(checks)} checks" if problems else "all checks ok")
    return 1 if problems else 0

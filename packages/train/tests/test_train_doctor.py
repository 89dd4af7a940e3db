"""apps/doctor on CPU: every check's ok and problem paths, the report lines and the exit status."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_model_runs import TINY_TTT3R, TINY_VIT, call

from post3r_backbone import TTT3R, TTT3RConfig, save_safetensors
from post3r_data import generate_synthetic_dataset
from post3r_kernels import register_rope2d_impl, rope2d_torch
from post3r_train import doctor, teacher_cache
from post3r_train.config import load_config
from post3r_train.encoders import DinoV2Encoder
from post3r_train.memory_estimate import LiveTensorMemory, estimate_training_memory

SMALL_DATA = ["dataset.image_size=16", "dataset.chunk_size=2"]


def lines_of(stdout: str) -> dict[str, str]:
    """Report lines by check name (the fix line, if any, appended)."""
    found: dict[str, str] = {}
    last = None
    for line in stdout.splitlines():
        if line.startswith((doctor.OK, doctor.SKIP, doctor.PROBLEM)):
            last = line[9:27].strip()
            found[last] = line
        elif last and line.strip().startswith("fix:"):
            found[last] += "\n" + line
    return found


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("doctor-data")
    generate_synthetic_dataset(
        root, 2, size=16, frames=3, num_val_videos=1, videos_per_shard=1, progress=False
    )
    return root


def test_cpu_only_environment_passes_and_says_no_device() -> None:
    code, out, _ = call(doctor.main, [])
    lines = lines_of(out)
    assert code == 0, out
    assert lines["python"].startswith("ok") and lines["torch"].startswith("ok")
    assert lines["gpus"].startswith("skip") and "no device" in lines["gpus"]
    assert lines["rope2d kernel"].startswith("skip") and "no device" in lines["rope2d kernel"]
    assert "eager for bf16 on cpu (auto)" in lines["rope2d impl"]
    assert "config" not in lines  # no CONFIG: the environment only
    assert out.rstrip().endswith("all checks ok")


def test_an_unknown_rope2d_choice_in_the_environment_is_a_problem(monkeypatch) -> None:
    monkeypatch.setenv("POST3R_ROPE2D_IMPL", "tritn")
    code, out, _ = call(doctor.main, [])
    assert code == 1
    assert lines_of(out)["rope2d impl"].startswith("PROBLEM") and "'tritn'" in out


@pytest.mark.parametrize(
    ("tritons", "hip", "wanted", "gpus", "status", "words"),
    [
        ({"triton": "3.5.0"}, False, "triton", 1, "ok", "the one torch pins"),
        ({"triton": "3.5.0"}, True, "pytorch-triton-rocm", 1, "PROBLEM", "CUDA build"),
        ({"pytorch-triton-rocm": "3.5.0"}, True, "pytorch-triton-rocm", 1, "ok", "rocm 3.5.0"),
        (
            {"triton": "3.5.0", "pytorch-triton-rocm": "3.5.0"},
            True,
            "pytorch-triton-rocm",
            1,
            "PROBLEM",
            "a CUDA and a ROCm triton",
        ),
        ({}, False, "triton", 0, "ok", "fine without a GPU"),
        ({}, True, "pytorch-triton-rocm", 2, "PROBLEM", "pytorch-triton-rocm"),
        ({"pytorch-triton": "3.5.0"}, False, "triton", 1, "PROBLEM", "built against triton"),
        ({"pytorch-triton-rocm": "3.5.0"}, False, "triton", 1, "PROBLEM", "a ROCm build"),
    ],
)
def test_triton_against_the_torch_build(tritons, hip, wanted, gpus, status, words) -> None:
    check = doctor.check_triton(tritons, hip, wanted, gpus)
    assert check.status == status, check
    assert words in check.detail + check.fix
    if status == "PROBLEM":
        assert "uninstall" in check.fix or "install" in check.fix


def test_the_installed_triton_is_found_with_torchs_pin() -> None:
    pytest.importorskip("triton")
    assert doctor.torch_triton_requirement() in doctor.installed_tritons()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_comparison_accepts_the_reference_and_names_a_broken_kernel(dtype) -> None:
    cpu = torch.device("cpu")
    assert doctor.compare_rope2d("torch", cpu, dtype) is None

    def wrong_backward(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
        out = rope2d_torch(x, positions, base)
        return out.detach() + (x - x.detach()) * 2.0  # right forward, gradient doubled

    register_rope2d_impl("doctor-wrong-backward", wrong_backward, overwrite=True)
    difference = doctor.compare_rope2d("doctor-wrong-backward", cpu, dtype)
    assert difference is not None and difference.startswith("backward differs")

    def wrong_forward(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
        return rope2d_torch(x, positions.flip(-1), base)  # y and x swapped

    register_rope2d_impl("doctor-wrong-forward", wrong_forward, overwrite=True)
    assert doctor.compare_rope2d("doctor-wrong-forward", cpu, dtype).startswith("forward")


def test_a_bad_config_key_is_a_problem_line_and_exit_1() -> None:
    code, out, _ = call(doctor.main, ["smoke", "model.num_slot=4"])
    line = lines_of(out)["config"]
    assert code == 1 and line.startswith("PROBLEM")
    assert "model.num_slot" in line and "did you mean model.num_slots" in line
    assert "teacher weights" not in out  # nothing else is checked against a broken config


def test_two_configs_are_a_usage_error() -> None:
    code, _, err = call(doctor.main, ["smoke", "default"])
    assert code == 2 and "only one config" in err


def test_missing_checkpoint_is_a_problem_with_where_to_get_it(tmp_path: Path, shards) -> None:
    argv = [
        "smoke",
        "--data-dir",
        str(shards),
        *SMALL_DATA,
        "model.teacher.name=ttt3r",
        f"model.teacher.checkpoint={tmp_path / 'cut3r_512_dpt_4_64.pth'}",
    ]
    code, out, _ = call(doctor.main, argv)
    line = lines_of(out)["teacher weights"]
    assert code == 1 and line.startswith("PROBLEM")
    assert "not found" in line and "fix: " in line and "download" in line
    assert lines_of(out)["data train"].startswith("ok")  # the other checks still ran


def test_checkpoint_that_loads_strictly_and_one_that_does_not(tmp_path: Path) -> None:
    torch.manual_seed(0)
    good = tmp_path / "tiny.safetensors"
    save_safetensors(TTT3R(TTT3RConfig.preset("tiny")), good)
    cfg = load_config("smoke", ["model.teacher.name=ttt3r", f"model.teacher.checkpoint={good}"])
    check = doctor.check_teacher_checkpoint(cfg)
    assert check.status == "ok" and "loads strictly" in check.detail

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # a cut-off download
    cfg = load_config("smoke", ["model.teacher.name=ttt3r", f"model.teacher.checkpoint={broken}"])
    check = doctor.check_teacher_checkpoint(cfg)
    assert check.status == "PROBLEM" and "does not load" in check.detail


def test_dinov2_weights_that_fit_and_weights_of_another_model(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tiny = [item for item in TINY_VIT if "pretrained" not in item]
    encoder = DinoV2Encoder(
        pretrained=False,
        block=2,
        timm_kwargs={"embed_dim": 24, "depth": 2, "num_heads": 2},
        image_size=28,
    )
    weights = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.vit.state_dict().items()}, weights)
    cfg = load_config("smoke", [*tiny, f"model.encoder.weights={weights}"])
    assert doctor.check_encoder_weights(cfg).status == "ok"

    other = tmp_path / "other.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, other)
    check = doctor.check_encoder_weights(
        load_config("smoke", [*tiny, f"model.encoder.weights={other}"])
    )
    assert check.status == "PROBLEM" and "does not load" in check.detail

    missing = load_config("smoke", [*tiny, f"model.encoder.weights={tmp_path / 'no.safetensors'}"])
    check = doctor.check_encoder_weights(missing)
    assert check.status == "PROBLEM" and "no such file" in check.fix


def test_data_ok_then_empty_dir_then_corrupt_first_shard(tmp_path: Path, shards: Path) -> None:
    code, out, _ = call(doctor.main, ["smoke", "--data-dir", str(shards), *SMALL_DATA])
    lines = lines_of(out)
    assert code == 0, out
    assert "2 shards" in lines["data train"] and "3 frames" in lines["data train"]
    assert "1 shards" in lines["data validation"]
    assert "pointmap" in lines["data train"]  # synthetic shards bring their geometry

    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, _ = call(doctor.main, ["smoke", "--data-dir", str(empty), *SMALL_DATA])
    lines = lines_of(out)
    assert code == 1
    for split in ("train", "validation"):
        assert lines[f"data {split}"].startswith("PROBLEM")
        assert f"no synthetic-{split}-NNNNNN.tar shards" in lines[f"data {split}"]
        assert "apps/synth" in lines[f"data {split}"]  # the command that makes them

    corrupt = tmp_path / "corrupt"
    shutil.copytree(shards, corrupt)
    first = corrupt / "synthetic-train-000000.tar"
    first.write_bytes(first.read_bytes()[:700])  # a truncated copy
    code, out, _ = call(doctor.main, ["smoke", "--data-dir", str(corrupt), *SMALL_DATA])
    lines = lines_of(out)
    assert code == 1
    assert lines["data train"].startswith("PROBLEM") and "does not decode" in lines["data train"]
    assert "synthetic-train-000000.tar" in lines["data train"]
    assert lines["data validation"].startswith("ok")


def test_a_missing_data_directory_is_one_problem(tmp_path: Path) -> None:
    cfg = load_config("smoke", [f"dataset.root={tmp_path / 'absent'}", *SMALL_DATA])
    (check,) = doctor.check_data(cfg)
    assert check.status == "PROBLEM" and check.name == "data"
    assert "does not exist" in check.detail and "apps/synth --output" in check.fix


def test_videos_shorter_than_a_clip_are_a_problem(shards: Path) -> None:
    cfg = load_config(
        "smoke", [f"dataset.root={shards}", "dataset.image_size=16", "dataset.chunk_size=4"]
    )
    train = next(iter(doctor.check_data(cfg)))
    assert train.status == "PROBLEM" and "dataset.chunk_size=4" in train.detail


def test_the_embedded_synthetic_default_is_not_required_to_exist_yet() -> None:
    (check,) = doctor.check_data(load_config("smoke", ["dataset.synthetic.seed=987654"]))
    assert check.status == "skip" and "apps/train generates it" in check.detail


def test_teacher_cache_is_skipped_without_a_cached_teacher() -> None:
    check = doctor.check_teacher_cache(load_config("smoke"), "smoke", [])
    assert check.status == "skip" and "model.teacher.name=dataset" in check.detail


# The cached teacher of the tiny TTT3R with random weights, at the frames' own 32 px.
CACHED = [
    "model.teacher.name=cached",
    "model.teacher.preset=tiny",
    "model.teacher.random_weights=true",
    "model.teacher.image_size=32",
    "model.teacher.cache_resolution=32",
]


def test_teacher_cache_missing_then_complete_then_stale(tmp_path: Path) -> None:
    root = tmp_path / "data"
    generate_synthetic_dataset(
        root, 2, size=32, frames=3, num_val_videos=1, videos_per_shard=1, progress=False
    )
    argv = ["smoke", "--data-dir", str(root), *CACHED]
    code, out, _ = call(doctor.main, argv)
    line = lines_of(out)["teacher cache"]
    assert code == 1 and line.startswith("PROBLEM") and "no teacher cache at" in line
    assert f"uv run apps/cache-teacher smoke --data-dir {root}" in line  # the command to run
    assert lines_of(out)["teacher weights"].startswith("skip")

    code, _, err = call(teacher_cache.main, ["smoke", "--data-dir", str(root), "-q", *CACHED])
    assert code == 0, err
    code, out, _ = call(doctor.main, argv)
    assert code == 0, out
    assert "complete" in lines_of(out)["teacher cache"]

    code, out, _ = call(doctor.main, [*argv, "model.teacher.update_rule=cut3r"])
    line = lines_of(out)["teacher cache"]
    assert code == 1 and line.startswith("PROBLEM") and "update_rule" in line


def test_memory_tracker_counts_live_storages_exactly() -> None:
    mib = 2**20
    x = torch.empty(512, 512)  # 1 MiB, exists before: a view of it is not a new allocation
    memory = LiveTensorMemory()
    memory.add_existing([x])
    with memory:
        y = x.t() @ x  # the transpose is a view of x; y is new
        assert memory.live_bytes == 2 * mib
        z = y.relu()
        del y
        assert (memory.live_bytes, memory.peak_bytes) == (2 * mib, 3 * mib)
        leaf = x.clone().requires_grad_()
        (leaf @ leaf).sin().sum().backward()  # saves leaf@leaf for sin's backward
    assert memory.live_bytes == 4 * mib  # x, z, leaf and its gradient
    assert memory.peak_bytes >= 5 * mib
    del z


def test_memory_estimate_grows_with_the_batch_and_fits_or_not() -> None:
    small = load_config("smoke", [*TINY_TTT3R, "dataset.batch_size=1"])
    large = load_config("smoke", [*TINY_TTT3R, "dataset.batch_size=8"])
    one, eight = estimate_training_memory(small), estimate_training_memory(large)
    assert 0 < one.weight_bytes == eight.weight_bytes
    assert eight.batch_bytes == 8 * one.batch_bytes
    assert eight.peak_bytes - eight.weight_bytes > 4 * (one.peak_bytes - one.weight_bytes)

    fits = doctor.check_memory(small, [80 * 2**30])
    assert fits.status == "ok" and "fits the GPU's 80.0 GiB" in fits.detail
    too_big = doctor.check_memory(large, [eight.peak_bytes // 2])
    assert too_big.status == "PROBLEM" and "dataset.batch_size" in too_big.fix
    assert "no GPU here" in doctor.check_memory(small, []).detail

"""The cached 3D teacher: apps/cache-teacher's output against the online backbone, resume and
rank splits, the pre-training check, and synth -> cache-teacher -> train -> evaluate."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_model_runs import call, run_cli

from post3r_data.shards import encode_npy, read_local_shard, write_shard
from post3r_data.synth_cli import main as synth_main
from post3r_data.teacher_cache import read_sidecar, record_path
from post3r_train import evaluate, teacher_cache
from post3r_train.config import load_config
from post3r_train.data import build_train_loader, checkpoint_aligned_epoch
from post3r_train.geometry import to_first_camera
from post3r_train.model import POST3RModel
from post3r_train.teacher import TeacherOutput, TTT3RTeacher

CACHED = [
    "model.teacher.name=cached",
    "model.teacher.preset=tiny",
    "model.teacher.random_weights=true",
    "model.teacher.image_size=32",  # the frames' size: the teacher sees them unresized
    "model.teacher.cache_resolution=32",  # and the maps are stored unresized
]
SYNTH = ["--videos", "4", "--val-videos", "2", "--size", "32", "--frames", "3"]
SYNTH += ["--videos-per-shard", "2", "--min-objects", "2", "--max-objects", "3", "--workers", "1"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """Synthetic shards (apps/synth) and their cache (apps/cache-teacher), made once."""
    root = tmp_path_factory.mktemp("cache")
    code, _, err = call(synth_main, ["--output", str(root / "data"), *SYNTH])
    assert code == 0, err
    code, out, err = call(
        teacher_cache.main, ["smoke", "--data-dir", str(root / "data"), "-q", *CACHED]
    )
    assert code == 0, err
    assert "3 shards written (0 already finished), 6 videos, 18 frames" in out
    return root


def config(root: Path, *extra: str):
    return load_config("smoke", [*CACHED, f"dataset.root={root / 'data'}", *extra])


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def online_backbone():
    torch.manual_seed(0)  # as cache-teacher builds random weights
    return TTT3RTeacher(preset="tiny", random_weights=True).backbone


def video_frames(shard: str, key: str) -> torch.Tensor:
    for sample in read_local_shard(shard, lambda field: field == "video.npy"):
        if sample["__key__"] == key:
            from post3r_data.shards import NpyMember

            video = np.array(NpyMember(sample["video.npy"])).copy()
            return torch.from_numpy(video).permute(0, 3, 1, 2)[None].float() / 255
    raise KeyError(key)


def test_cached_targets_equal_the_online_backbone_over_the_whole_video(built):
    backbone = online_backbone()
    shard = str(built / "data" / "synthetic-train-000001.tar")
    for sample in read_sidecar(built / "data" / "teacher-cache" / "synthetic-train-000001.tar"):
        frames = video_frames(shard, sample["__key__"])
        out, _ = backbone.forward_video(
            frames, outputs=["pts3d_world", "conf_world", "camera_to_world"]
        )
        points = out.pts3d_world[0].numpy()
        tolerance = 1e-3 * np.abs(points).max()  # float16 storage: 2^-11 relative
        np.testing.assert_allclose(sample["teacher_pointmap"], points, rtol=1e-3, atol=tolerance)
        np.testing.assert_allclose(
            sample["teacher_confidence"], out.conf_world[0].numpy(), rtol=1e-3
        )
        np.testing.assert_allclose(
            sample["teacher_camera_to_world"], out.camera_to_world[0].numpy(), rtol=1e-6
        )


def test_training_clips_carry_the_cached_targets_in_the_clips_first_camera(built):
    cfg = config(built, "dataset.batch_size=4")
    model = POST3RModel.from_config(cfg)
    epoch = checkpoint_aligned_epoch(cfg)
    batch = next(iter(build_train_loader(cfg, built / "data", batches_per_epoch=epoch)(0)))
    batch["frames"] = batch["frames"].float() / 255
    teacher = model._teacher(batch, None, True)
    backbone = online_backbone()
    data = sorted((built / "data").glob("synthetic-train-*.tar"))
    for b, key in enumerate(batch["key"]):
        shard = next(str(s) for s in data if key in _keys(s))
        out, _ = backbone.forward_video(
            video_frames(shard, key), outputs=["pts3d_world", "conf_world", "camera_to_world"]
        )
        frames = batch["frame_index"][b]
        expected = to_first_camera(
            TeacherOutput(out.pts3d_world[:, frames], None, out.camera_to_world[:, frames])
        )
        # The decoder's resolution (16) samples every other stored pixel (32), at pixel centres.
        points = expected.pointmap[0][:, 1::2, 1::2]
        tolerance = 2e-3 * points.abs().max().item()
        torch.testing.assert_close(teacher.pointmap[b], points, rtol=2e-3, atol=tolerance)
        torch.testing.assert_close(
            teacher.camera_to_world[b], expected.camera_to_world[0], rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(teacher.camera_to_world[b, 0], torch.eye(4))


def _keys(shard: Path) -> list[str]:
    return [s["__key__"] for s in read_local_shard(str(shard), lambda field: False)]


def test_a_killed_build_redoes_only_unfinished_shards_with_the_same_bytes(built, monkeypatch):
    cfg = config(built)
    output = built / "resumed"
    real = teacher_cache._cache_shard
    calls = []

    def killed_on_the_second_shard(teacher, shard, sidecar, progress):
        calls.append(Path(shard).name)
        if len(calls) == 2:
            sidecar.with_name(sidecar.name + ".tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        return real(teacher, shard, sidecar, progress)

    monkeypatch.setattr(teacher_cache, "_cache_shard", killed_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        teacher_cache.build_cache(cfg, built / "data", output, progress=False)
    monkeypatch.setattr(teacher_cache, "_cache_shard", real)
    summary = teacher_cache.build_cache(cfg, built / "data", output, progress=False)
    assert (summary.shards_kept, summary.shards_written) == (1, 2)
    assert files(output) == files(built / "data" / "teacher-cache")


def test_two_ranks_write_the_same_bytes_as_one(built):
    cfg = config(built)
    output = built / "two-ranks"
    for rank in (1, 0):
        summary = teacher_cache.build_cache(
            cfg, built / "data", output, rank=rank, world_size=2, progress=False
        )
        assert summary.shards_written == (2 if rank == 0 else 1)
    assert files(output) == files(built / "data" / "teacher-cache")


def _check(cfg, root: Path, command: str = "THE-COMMAND"):
    return teacher_cache.check_teacher_cache(cfg, root / "data", command)


def test_missing_partial_and_stale_caches_are_named_with_the_command(built, tmp_path):
    cfg = config(built)
    assert _check(cfg, built) == built / "data" / "teacher-cache"
    missing = config(built, f"model.teacher.cache={tmp_path / 'nothing'}")
    with pytest.raises(teacher_cache.TeacherCacheError, match=r"no teacher cache.*THE-COMMAND"):
        _check(missing, built)
    with pytest.raises(teacher_cache.TeacherCacheError, match=r"update_rule is 'ttt3r'.*'cut3r'"):
        _check(config(built, "model.teacher.update_rule=cut3r"), built)
    with pytest.raises(teacher_cache.TeacherCacheError, match=r"stored resolution \(short side 32"):
        _check(config(built, "model.decoder_resolution=[64,64]"), built)
    partial = tmp_path / "partial"
    shutil.copytree(built / "data" / "teacher-cache", partial)
    record_path(partial / "synthetic-validation-000000.tar").unlink()
    with pytest.raises(
        teacher_cache.TeacherCacheError,
        match=r"unfinished: 1 data shard.*synthetic-validation-000000.tar.*THE-COMMAND",
    ):
        _check(config(built, f"model.teacher.cache={partial}"), built)


def test_the_data_directory_is_refused_as_the_output(built):
    before = files(built / "data" / "teacher-cache")
    with pytest.raises(ValueError, match="is the data directory"):
        teacher_cache.build_cache(config(built), built / "data", built / "data" / ".." / "data")
    assert files(built / "data" / "teacher-cache") == before


def test_a_video_added_to_the_data_is_named(built, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(built / "data", data)
    shard = data / "synthetic-train-000000.tar"
    samples = _raw_samples(shard)
    samples.append({"__key__": "new_video", "video.npy": encode_npy(np.zeros((3, 32, 32, 3)))})
    write_shard(shard, samples)
    cfg = load_config("smoke", [*CACHED, f"dataset.root={data}"])
    with pytest.raises(
        teacher_cache.TeacherCacheError,
        match=r"data shard synthetic-train-000000.tar changed.*without a cache entry: new_video",
    ):
        teacher_cache.check_teacher_cache(cfg, data, "THE-COMMAND")


def _raw_samples(shard: Path) -> list[dict]:
    import tarfile

    samples: dict[str, dict] = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            key, _, field = member.name.partition(".")
            samples.setdefault(key, {"__key__": key})[field] = tar.extractfile(member).read()
    return list(samples.values())


def test_synth_then_cache_teacher_then_train_then_evaluate(built, tmp_path):
    data, logs = str(built / "data"), tmp_path / "logs"
    argv = ["smoke", "--data-dir", data, "--log-dir", str(logs), "-q", *CACHED]
    code, out, err = run_cli([*argv, "trainer.max_steps=2", "trainer.val_check_interval=2"])
    assert code == 0, err
    assert "pointmap_ari" in out
    (run_dir,) = (logs / "smoke").iterdir()
    code, out, err = call(evaluate.main, [str(run_dir), "--output", str(tmp_path / "m.json")])
    assert code == 0, err
    assert "pointmap_mbo" in out


def test_training_without_the_cache_stops_before_the_first_step(built, tmp_path):
    argv = ["smoke", "--data-dir", str(built / "data"), "--log-dir", str(tmp_path), "-q"]
    code, _, err = run_cli([*argv, *CACHED, f"model.teacher.cache={tmp_path / 'none'}"])
    assert code == 1
    assert "no teacher cache" in err
    assert "uv run apps/cache-teacher smoke --data-dir" in err
    assert f"--output {tmp_path / 'none'}" in err
    assert not (tmp_path / "smoke").exists()  # no run directory: nothing started


def test_bench_train_compares_the_online_and_the_cached_teacher():
    from post3r_train import bench_train

    tiny = ["model.teacher.preset=tiny", "model.teacher.random_weights=true"]
    argv = ["--config", "smoke", "--compare-teachers", "--steps", "1", "--warmup", "0", *tiny]
    code, out, err = call(bench_train.main, [*argv, "model.teacher.image_size=32"])
    assert code == 0, err
    rows = {
        row[0]: row
        for row in map(str.split, out.splitlines())
        if row[:1] in (["online"], ["cached"]) and len(row) == 5
    }
    assert set(rows) == {"online", "cached"}
    flops = {name: float(row[-1]) for name, row in rows.items()}
    assert flops["online"] > flops["cached"] > 0  # the tiny teacher's FLOPs are gone
    assert "random frozen weights" in out
    differences = dict(
        line.rsplit(maxsplit=1) for line in out.splitlines() if line.startswith("  ")
    )
    assert 0 < float(differences["  bf16 pointmap"]) < 5e-2
    assert 0 < float(differences["  float16 storage pointmap"]) < 1e-3

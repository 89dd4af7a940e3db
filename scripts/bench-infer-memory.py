"""Peak memory of `apps/infer` against video length: the same generated video at 100 and 1,000
frames, each run in a fresh process; prints peak RSS, frames/s and the 1000/100 ratio.

    uv run --no-sync python scripts/bench-infer-memory.py RUN [--size 320x240] [--lengths 100 1000]

RUN is a run directory or checkpoint (e.g. the embedded default's, `uv run apps/train`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

APP = Path(__file__).resolve().parents[1] / "apps" / "infer"


def make_video(path: Path, frames: int, width: int, height: int) -> None:
    """Two coloured squares moving over a gradient (PyAV, MPEG-4)."""
    import av

    ys, xs = np.mgrid[0:height, 0:width]
    background = np.stack([xs * 200 // width, ys * 200 // height, np.full_like(xs, 80)], -1)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(frames):
            image = background.astype(np.uint8).copy()
            x = int((0.5 + 0.4 * np.sin(t / 15)) * (width - 60))
            image[height // 4 : height // 4 + 50, x : x + 50] = (230, 40, 40)
            y = int((0.5 + 0.4 * np.cos(t / 11)) * (height - 50))
            image[y : y + 40, width // 2 : width // 2 + 40] = (40, 200, 60)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def peak_rss_of(command: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of a child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"infer failed: {process.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024, seconds  # Linux reports KiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory or checkpoint")
    parser.add_argument("--size", default="320x240", help="video WIDTHxHEIGHT")
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 1000])
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as root:
        for length in args.lengths:
            video = Path(root) / f"video{length}.mp4"
            make_video(video, length, width, height)
            command = [sys.executable, str(APP), args.run, str(video)]
            command += ["--output", str(Path(root) / f"out{length}"), "--device", "cpu", "-q"]
            rss, seconds = peak_rss_of(command)
            rows.append((length, rss, length / seconds))
    print(f"apps/infer on a generated {width}x{height} video, CPU, one fresh process per length")
    print(f"{'frames':>8} {'peak RSS MiB':>13} {'frames/s':>9}")
    for length, rss, speed in rows:
        print(f"{length:>8} {rss:>13.0f} {speed:>9.1f}")
    if len(rows) > 1:
        print(f"peak RSS ratio {rows[-1][0]}/{rows[0][0]} frames: {rows[-1][1] / rows[0][1]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

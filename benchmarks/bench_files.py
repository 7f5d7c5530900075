"""Whole-tree transfers and the files API, side by side with tar through run() in one run.

    .venv/bin/python benchmarks/bench_files.py [--files 1000] [--mb 200] [--rounds 3]

Prints, as medians of ``--rounds``: upload and download of a tree of small
files (files/s) and of a tree holding one big file (MB/s), each beside the
baseline an agent would write today (``tar`` piped through ``run(stdin=...)``
in, ``run("tar -c | base64")`` out), and the big one beside
upload_file/download_file of its file, in turns; ``files.list`` of a
directory of that many entries; and reading a 100 MB file through a mount in
the guest against download_file of it.
Goals (issue 9, TCG here): small files at least 2x the baseline; the big one
at least the single-file rate; list of 1,000 entries under 100 ms.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from smolvm import Mount, SmolVM


def median_s(fn: Callable[[int], object], rounds: int) -> float:
    samples = []
    for i in range(rounds):
        t = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def tar_bytes(root: Path) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name in sorted(os.listdir(root)):
            tar.add(root / name, arcname=name)
    return out.getvalue()


def baseline_download(vm: SmolVM, guest: str, local: Path) -> None:
    text = vm.run(f"tar -c -C {guest} . | base64 -w0", timeout=600, max_output=1 << 31).stdout
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(text))) as tar:
        tar.extractall(local, filter="data")


def compare(vm: SmolVM, name: str, src: Path, work: Path, rounds: int, unit: float, unit_name: str) -> None:
    data = tar_bytes(src)
    ours_up = median_s(lambda i: vm.upload_dir(src, f"/bench/{name}-ours-{i}"), rounds)
    base_up = median_s(
        lambda i: vm.run(f"mkdir -p /bench/{name}-base-{i} && tar -x -C /bench/{name}-base-{i}", 600, stdin=data),
        rounds,
    )
    ours_down = median_s(lambda i: vm.download_dir(f"/bench/{name}-ours-0", work / f"{name}-ours-{i}"), rounds)
    base_down = median_s(lambda i: baseline_download(vm, f"/bench/{name}-ours-0", work / f"{name}-base-{i}"), rounds)
    print(f"{name}: upload   {unit / ours_up:9.1f} {unit_name}  baseline {unit / base_up:9.1f}  "
          f"ratio {base_up / ours_up:.2f}x")  # fmt: skip
    print(f"{name}: download {unit / ours_down:9.1f} {unit_name}  baseline {unit / base_down:9.1f}  "
          f"ratio {base_down / ours_down:.2f}x")  # fmt: skip


def tree_vs_file(vm: SmolVM, big: Path, work: Path, mb: int, rounds: int) -> None:
    """A tree of one big file against upload_file/download_file of it, in turns, each
    copy removed before the next so that the guest's page cache starts alike."""
    times: dict[str, list[float]] = {"tree up": [], "file up": [], "tree down": [], "file down": []}
    for i in range(rounds):
        times["tree up"].append(median_s(lambda _: vm.upload_dir(big, "/turn/tree"), 1))
        times["file up"].append(median_s(lambda _: vm.upload_file(big / "blob", "/turn/blob"), 1))
        times["tree down"].append(median_s(lambda _, i=i: vm.download_dir("/turn/tree", work / f"tree-{i}"), 1))
        times["file down"].append(median_s(lambda _, i=i: vm.download_file("/turn/blob", work / f"blob-{i}"), 1))
        vm.run("rm -rf /turn")
    rate = {k: mb / statistics.median(v) for k, v in times.items()}
    for way in ("up", "down"):
        print(f"big: {way}load_dir {rate['tree ' + way]:.1f} MB/s, {way}load_file {rate['file ' + way]:.1f} MB/s, "
              f"ratio {rate['tree ' + way] / rate['file ' + way]:.2f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mount-mb", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, SmolVM(memory=1024) as vm:
        work = Path(tmp)
        small = work / "small"
        for i in range(args.files):
            (small / f"d{i % 20:02d}").mkdir(parents=True, exist_ok=True)
            (small / f"d{i % 20:02d}" / f"f{i:05d}.txt").write_bytes(os.urandom(1024))
        big = work / "big"
        big.mkdir()
        with open(big / "blob", "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(1 << 20))
        vm.run("true")
        compare(vm, "small", small, work, args.rounds, args.files, "files/s")
        compare(vm, "big", big, work, args.rounds, args.mb, "MB/s")
        tree_vs_file(vm, big, work, args.mb, args.rounds)
        vm.run(f"mkdir -p /bench/list && cd /bench/list && touch $(seq -f 'e%05g' 1 {args.files})")
        listing = median_s(lambda i: vm.files.list("/bench/list"), max(args.rounds, 5))
        print(f"files.list of {args.files} entries: {listing * 1000:.0f} ms")
    mount_read(args.mount_mb, args.rounds)


def mount_read(mb: int, rounds: int) -> None:
    """Reading a file through a mount (in the guest) against download_file of it (to the
    host), in turns, in one sandbox that has both."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "shared"
        folder.mkdir()
        os.chmod(tmp, 0o755)
        os.chmod(folder, 0o755)  # as root, a folder of root's is served by the jail's uid
        with open(folder / "blob", "wb") as f:
            for _ in range(mb):
                f.write(os.urandom(1 << 20))
        os.chmod(folder / "blob", 0o644)
        with SmolVM(memory=1024, mounts=[Mount(folder, "/data")]) as vm:
            vm.run("cp /data/blob /blob", timeout=300)
            through, down = [], []
            for i in range(rounds):
                through.append(median_s(lambda _: vm.run("cat /data/blob > /dev/null", timeout=300), 1))
                down.append(median_s(lambda _, i=i: vm.download_file("/blob", Path(tmp) / f"down-{i}"), 1))
        t, d = statistics.median(through), statistics.median(down)
        print(f"mount: read {mb} MB in the guest {mb / t:.1f} MB/s, download_file {mb / d:.1f} MB/s, "
              f"ratio {d / t:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()

"""Custom image figures, measured side by side in one run (these machines are noisy).

    .venv/bin/python benchmarks/bench_images.py [--boots 5] [--keep]

Builds a four-step image on the default one (a command, a copied tree of 200
files, a variable, a working directory), then prints: the first build; a
rebuild with every step cached (goal: under 2 s); a rebuild with only the last
step changed (goal: only that step runs); start to the first command of a
sandbox of the custom image against one of the default image, both from their
templates, in turns (goal: within 10%); and the image's size on disk against
the default image's. The image and its layers are removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench_core import start_to_first_command

from smolvm import Image, templates
from smolvm.images import layers
from smolvm.images.builder import info
from smolvm.images.store import ImageStore

NAME = "bench-custom"


def recipe(tree: Path, token: str, last: str) -> Image:
    return (
        Image.from_image("default")
        .run(f"echo {token} > /etc/bench-marker && useradd -m bench")
        .copy(tree, "/srv/app")
        .env({"BENCH": token})
        .workdir(last)
    )


def timed(fn):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=5, help="starts of each image to take the median of")
    parser.add_argument("--keep", action="store_true", help="keep the image and its layers")
    args = parser.parse_args()
    tree = Path(tempfile.mkdtemp(prefix="bench-tree-"))
    for i in range(200):
        (tree / f"m{i // 50}").mkdir(exist_ok=True)
        (tree / f"m{i // 50}" / f"f{i}.py").write_text(f"VALUE = {i}\n" * 20)
    token = secrets.token_hex(4)  # a build of its own, not an earlier run's cache
    store = ImageStore()
    before = set(layers.layers_dir().iterdir()) if layers.layers_dir().is_dir() else set()
    try:
        first, t_first = timed(lambda: recipe(tree, token, "/srv/app").build(NAME))
        cached, t_cached = timed(lambda: recipe(tree, token, "/srv/app").build(NAME))
        changed, t_changed = timed(lambda: recipe(tree, token, "/srv/other").build(NAME))
        print(f"== building a {len(first.steps)}-step image on the default one (a command, 200 files, env, workdir)")
        print(f"  first build                 {t_first:7.2f} s   {first.built_steps} steps run")
        verdict = "met" if t_cached < 2 else "NOT met"
        print(
            f"  rebuild, all cached         {t_cached:7.2f} s   {cached.built_steps} steps run   goal < 2 s: {verdict}"
        )
        verdict = "met" if changed.built_steps == 1 else "NOT met"
        print(
            f"  rebuild, last step changed  {t_changed:7.2f} s   {changed.built_steps} step run    "
            f"goal: only it runs: {verdict}   ({t_changed / t_first:.2f}x the first build)"
        )
        # Templates for both (the first start of a shape makes one), then starts in turns.
        start_to_first_command(1, template=True, image=NAME)
        start_to_first_command(1, template=True)
        custom: list[float] = []
        default: list[float] = []
        for _ in range(args.boots):
            custom += [r["total"] for r in start_to_first_command(1, template=True, image=NAME)]
            default += [r["total"] for r in start_to_first_command(1, template=True)]
        c, d = statistics.median(custom), statistics.median(default)
        print(f"\n== start to the first command from the template, in turns (median of {args.boots})")
        print(f"  default image    {d:6.3f} s   1.00x")
        verdict = "met" if c <= 1.1 * d else "NOT met"
        print(f"  custom image     {c:6.3f} s   {c / d:.2f}x   goal <= 1.10x: {verdict}")
        own = info(store.load(NAME)).size
        base = store.load("default").rootfs.stat().st_blocks * 512
        print("\n== size on disk")
        print(f"  default image's root disk   {base / 2**20:7.1f} MiB   1.00x")
        print(f"  the custom image's layers   {own / 2**20:7.1f} MiB   {own / base:.3f}x (read through to the default)")
    finally:
        shutil.rmtree(tree, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(store.root / NAME, ignore_errors=True)
            for entry in set(layers.layers_dir().iterdir()) - before:
                shutil.rmtree(entry, ignore_errors=True)
            templates.prune({v.name for n in store.names() for v in (store.root / n).iterdir() if not v.is_symlink()})


if __name__ == "__main__":
    main()

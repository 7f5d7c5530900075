"""Templates for any shape: made on the first start of a sandbox of a new shape, resumed
by every later one, skipped with ``fast_start=False``; one that cannot be made is not
tried again on every start."""

from __future__ import annotations

import shutil

import pytest

from smolvm import SmolVM, templates
from smolvm.backends.accel import choose_accel
from smolvm.exceptions import HostError
from smolvm.images.store import ImageStore


def shape_dir(memory: int) -> tuple[object, str, object]:
    image = ImageStore().load("default")
    accel = choose_accel(image.kernel, image.initrd).accel
    return image, accel, templates.template_dir(image, memory, 1, accel)


@pytest.mark.vm
def test_a_new_shape_gets_a_template_on_its_first_start() -> None:
    image, accel, directory = shape_dir(384)
    shutil.rmtree(directory, ignore_errors=True)  # a shape only this test uses
    with SmolVM(memory=384) as first:
        assert first.boot_timings["resumed_template"] == 1.0
        assert first.run("hostname").output == first.vm_id
    assert templates.find(image, 384, 1, accel) is not None  # type: ignore[arg-type]
    with SmolVM(memory=384) as second:
        assert second.boot_timings["resumed_template"] == 1.0
        kib = int(second.run("awk '/MemTotal/ {print $2}' /proc/meminfo").output)
        assert 300_000 < kib < 400_000  # the shape asked for, not the default's 512 MiB
    with SmolVM(memory=384, fast_start=False) as cold:
        assert cold.boot_timings["resumed_template"] == 0.0
        assert cold.info()["fast_start"] is False
        assert cold.run("hostname").output == cold.vm_id


@pytest.mark.vm
def test_a_shape_whose_template_cannot_be_made_boots_cold_and_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, directory = shape_dir(320)
    shutil.rmtree(directory, ignore_errors=True)
    failed = directory.with_name(directory.name + ".failed")
    failed.unlink(missing_ok=True)
    tries = []

    def broken(*args: object) -> object:
        tries.append(args)
        raise HostError("no room to save a machine here")

    monkeypatch.setattr(templates, "_create", broken)
    try:
        for _ in range(2):
            with SmolVM(memory=320) as vm:
                assert vm.boot_timings["resumed_template"] == 0.0
                assert vm.run("echo up").output == "up"
        assert len(tries) == 1 and "no room" in failed.read_text()
    finally:
        failed.unlink(missing_ok=True)

"""Choosing KVM or TCG: SMOLVM_ACCEL, the per-boot cache, and (slow) the real probe."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from smolvm.backends import accel
from smolvm.exceptions import SmolVMError, ValidationError


@pytest.fixture
def own_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SMOLVM_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("SMOLVM_ACCEL", raising=False)
    return tmp_path


def _no_probe(*_a: object, **_k: object) -> tuple[bool, str]:
    raise AssertionError("the KVM probe must not run here")


@pytest.mark.parametrize("value,expected", [("tcg", "tcg"), ("kvm", "kvm"), ("KVM", "kvm"), (" tcg\n", "tcg")])
def test_forced(monkeypatch: pytest.MonkeyPatch, own_data_dir: Path, value: str, expected: str) -> None:
    monkeypatch.setenv("SMOLVM_ACCEL", value)
    monkeypatch.setattr(accel, "probe_kvm", _no_probe)
    choice = accel.choose_accel(Path("/nonexistent/vmlinuz"), Path("/nonexistent/initrd"), refresh=True)
    assert choice.accel == expected
    assert choice.kvm_works is None
    assert "SMOLVM_ACCEL" in choice.reason
    assert not (own_data_dir / "accel.json").exists()


@pytest.mark.parametrize("value", ["xen", "hvf", "kvm,tcg", "1"])
def test_forced_invalid(monkeypatch: pytest.MonkeyPatch, own_data_dir: Path, value: str) -> None:
    monkeypatch.setenv("SMOLVM_ACCEL", value)
    with pytest.raises(ValidationError, match="SMOLVM_ACCEL") as info:
        accel.choose_accel(None, None)
    assert isinstance(info.value, SmolVMError)


def test_empty_forced_value_means_unset(monkeypatch: pytest.MonkeyPatch, own_data_dir: Path) -> None:
    monkeypatch.setenv("SMOLVM_ACCEL", "  ")
    monkeypatch.setattr(accel, "probe_kvm", _no_probe)
    choice = accel.choose_accel(None, None)
    assert choice.accel == "tcg"
    assert "SMOLVM_ACCEL" not in choice.reason


def test_no_image_falls_back_to_tcg_without_probing(monkeypatch: pytest.MonkeyPatch, own_data_dir: Path) -> None:
    monkeypatch.setattr(accel, "probe_kvm", _no_probe)
    choice = accel.choose_accel(None, None)
    assert choice.accel == "tcg"
    assert choice.kvm_works is None
    assert "no image" in choice.reason
    assert not (own_data_dir / "accel.json").exists()


def _write_cache(data_dir: Path, **fields: object) -> None:
    (data_dir / "accel.json").write_text(json.dumps(fields))


@pytest.mark.parametrize("works,expected", [(True, "kvm"), (False, "tcg")])
def test_cache_of_this_boot_is_used(
    monkeypatch: pytest.MonkeyPatch, own_data_dir: Path, works: bool, expected: str
) -> None:
    _write_cache(own_data_dir, boot_id=accel._boot_id(), kvm_works=works, reason="cached reason")
    monkeypatch.setattr(accel, "probe_kvm", _no_probe)
    choice = accel.choose_accel(Path("/k"), Path("/i"))
    assert choice.accel == expected
    assert choice.kvm_works is works
    assert "cached reason" in choice.reason


@pytest.mark.parametrize(
    "content",
    [
        json.dumps({"boot_id": "another-boot", "kvm_works": True, "reason": "old"}),
        "not json",
        json.dumps({"boot_id": "__BOOT__"}),
    ],
)
def test_stale_or_broken_cache_is_probed_again(
    monkeypatch: pytest.MonkeyPatch, own_data_dir: Path, content: str
) -> None:
    (own_data_dir / "accel.json").write_text(content.replace("__BOOT__", accel._boot_id()))
    calls: list[tuple[Path, Path]] = []

    def fake_probe(kernel: Path, initrd: Path, timeout: float = 0) -> tuple[bool, str]:
        calls.append((kernel, initrd))
        return False, "fake probe failed"

    monkeypatch.setattr(accel, "probe_kvm", fake_probe)
    choice = accel.choose_accel(Path("/k"), Path("/i"))
    assert calls == [(Path("/k"), Path("/i"))]
    assert choice.accel == "tcg" and choice.kvm_works is False
    cached = json.loads((own_data_dir / "accel.json").read_text())
    assert cached == {"boot_id": accel._boot_id(), "kvm_works": False, "reason": "fake probe failed"}


def test_refresh_ignores_a_valid_cache(monkeypatch: pytest.MonkeyPatch, own_data_dir: Path) -> None:
    _write_cache(own_data_dir, boot_id=accel._boot_id(), kvm_works=False, reason="cached")
    monkeypatch.setattr(accel, "probe_kvm", lambda k, i, timeout=0: (True, "fake probe ok"))
    choice = accel.choose_accel(Path("/k"), Path("/i"), refresh=True)
    assert choice.accel == "kvm" and choice.kvm_works is True
    assert json.loads((own_data_dir / "accel.json").read_text())["kvm_works"] is True


def test_kvm_openable_returns_reason() -> None:
    ok, why = accel.kvm_openable()
    assert isinstance(ok, bool)
    assert isinstance(why, str) and why


@pytest.mark.vm
def test_real_probe(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    """The probe path for real: boots the image's kernel under KVM (or finds it can't), caches the answer."""
    from smolvm.images.store import ImageStore

    monkeypatch.delenv("SMOLVM_ACCEL", raising=False)
    image = ImageStore().load("default")
    choice = accel.choose_accel(image.kernel, image.initrd, refresh=True)
    assert choice.accel in ("kvm", "tcg")
    assert isinstance(choice.reason, str) and len(choice.reason) > 10
    assert choice.kvm_works is (choice.accel == "kvm")
    cached = json.loads((data_dir / "accel.json").read_text())
    assert cached["boot_id"] == accel._boot_id()
    assert cached["kvm_works"] is choice.kvm_works
    # Now answered from the cache, without booting anything.
    started = time.monotonic()
    again = accel.choose_accel(image.kernel, image.initrd)
    assert time.monotonic() - started < 1.0
    assert again == choice

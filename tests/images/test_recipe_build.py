"""Pure logic of the image recipe and build: apt sources, module order, recipe hash."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from smolvm.exceptions import ImageError
from smolvm.images import build, recipe

# -- host_sources -------------------------------------------------------------


@pytest.fixture
def apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    main = tmp_path / "sources.list"
    d = tmp_path / "sources.list.d"
    d.mkdir()
    monkeypatch.setattr(build, "APT_SOURCES", main)
    monkeypatch.setattr(build, "APT_SOURCES_DIR", d)
    return main, d


def test_one_line_sources(apt: tuple[Path, Path]) -> None:
    main, _ = apt
    main.write_text(
        "# a comment\n"
        "deb http://mirror.example.org/debian bookworm main contrib\n"
        "deb-src http://mirror.example.org/debian bookworm main\n"
        "deb http://mirror.example.org/debian bookworm-updates main\n"
        "deb http://security.example.org/debian-security bookworm-security main\n"
        "deb http://mirror.example.org/debian trixie main\n"
        "deb http://mirror.example.org/debian bookworm-backports main\n"
        "#deb http://commented.example/debian bookworm main\n"
    )
    got = build.host_sources("bookworm")
    assert got == [
        {
            "Types": "deb",
            "URIs": "http://mirror.example.org/debian",
            "Suites": "bookworm",
            "Components": "main contrib",
        },
        {
            "Types": "deb",
            "URIs": "http://mirror.example.org/debian",
            "Suites": "bookworm-updates",
            "Components": "main",
        },
        {
            "Types": "deb",
            "URIs": "http://security.example.org/debian-security",
            "Suites": "bookworm-security",
            "Components": "main",
        },
    ]


def test_one_line_sources_with_options(apt: tuple[Path, Path]) -> None:
    _, d = apt
    (d / "mirror.list").write_text(
        "deb [arch=amd64 signed-by=/usr/share/keyrings/debian.gpg] http://mirror.example/debian bookworm main\n"
        "deb [signed-by=/k.gpg] http://m2.example/debian bookworm main\n"
    )
    got = build.host_sources("bookworm")
    assert len(got) == 2
    assert got[0]["URIs"] == "http://mirror.example/debian"
    assert got[0]["Signed-By"] == "/usr/share/keyrings/debian.gpg"
    assert got[1]["Signed-By"] == "/k.gpg"


def test_deb822_sources(apt: tuple[Path, Path]) -> None:
    _, d = apt
    (d / "debian.sources").write_text(
        "# comment\n"
        "Types: deb deb-src\n"
        "URIs: http://mirror.example.org/debian\n"
        "Suites: bookworm bookworm-updates bookworm-backports\n"
        "Components: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        "\n"
        "Types: deb\n"
        "URIs: http://disabled.example/debian\n"
        "Suites: bookworm\n"
        "Components: main\n"
        "Enabled: no\n"
        "\n"
        "Types: deb-src\n"
        "URIs: http://src-only.example/debian\n"
        "Suites: bookworm\n"
        "Components: main\n"
        "\n"
        "Types: deb\n"
        "URIs: http://other-suite.example/debian\n"
        "Suites: trixie\n"
        "Components: main\n"
    )
    got = build.host_sources("bookworm")
    assert len(got) == 1
    s = got[0]
    assert s["URIs"] == "http://mirror.example.org/debian"
    assert s["Suites"] == "bookworm bookworm-updates"  # backports dropped
    assert s["Signed-By"] == "/usr/share/keyrings/debian-archive-keyring.gpg"


def test_ubuntu_style_deb822(apt: tuple[Path, Path]) -> None:
    _, d = apt
    (d / "ubuntu.sources").write_text(
        "Types: deb\n"
        "URIs: http://archive.ubuntu.com/ubuntu/\n"
        "Suites: noble noble-updates noble-backports\n"
        "Components: main restricted universe multiverse\n"
        "Signed-By: /usr/share/keyrings/ubuntu-archive-keyring.gpg\n"
        "\n"
        "Types: deb\n"
        "URIs: http://security.ubuntu.com/ubuntu/\n"
        "Suites: noble-security\n"
        "Components: main restricted universe multiverse\n"
        "Signed-By: /usr/share/keyrings/ubuntu-archive-keyring.gpg\n"
    )
    got = build.host_sources("noble")
    assert [(s["URIs"], s["Suites"]) for s in got] == [
        ("http://archive.ubuntu.com/ubuntu/", "noble noble-updates"),
        ("http://security.ubuntu.com/ubuntu/", "noble-security"),
    ]


def test_missing_files_give_no_sources(apt: tuple[Path, Path]) -> None:
    assert build.host_sources("bookworm") == []


def test_files_are_read_in_order(apt: tuple[Path, Path]) -> None:
    main, d = apt
    main.write_text("deb http://first.example/ bookworm main\n")
    (d / "b.list").write_text("deb http://third.example/ bookworm main\n")
    (d / "a.list").write_text("deb http://second.example/ bookworm main\n")
    (d / "z.sources").write_text("Types: deb\nURIs: http://fourth.example/\nSuites: bookworm\nComponents: main\n")
    (d / "ignored.save").write_text("deb http://ignored.example/ bookworm main\n")
    assert [s["URIs"] for s in build.host_sources("bookworm")] == [
        "http://first.example/",
        "http://second.example/",
        "http://third.example/",
        "http://fourth.example/",
    ]


def test_sources_file_prefers_smolvm_mirror(
    apt: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMOLVM_MIRROR", "http://mirror.example/debian")
    dest = build.sources_file("bookworm", tmp_path / "out.sources")
    text = dest.read_text()
    assert "URIs: http://mirror.example/debian\n" in text
    assert "Suites: bookworm\n" in text


def test_sources_file_without_any_source_raises(
    apt: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SMOLVM_MIRROR", raising=False)
    with pytest.raises(ImageError, match="SMOLVM_MIRROR"):
        build.sources_file("bookworm", tmp_path / "out.sources")


def test_sources_file_writes_deb822_stanzas(
    apt: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SMOLVM_MIRROR", raising=False)
    main, _ = apt
    main.write_text("deb http://a.example/ bookworm main\ndeb http://b.example/ bookworm-security main\n")
    text = build.sources_file("bookworm", tmp_path / "out.sources").read_text()
    stanzas = [s for s in text.split("\n\n") if s.strip()]
    assert len(stanzas) == 2
    assert stanzas[0].splitlines()[0] == "Types: deb"
    assert "URIs: http://b.example/" in stanzas[1]


# -- module_load_order --------------------------------------------------------

MODULES_DEP = """\
kernel/drivers/virtio/virtio_mmio.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz kernel/drivers/virtio/virtio.ko.xz
kernel/drivers/virtio/virtio.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/virtio/virtio_ring.ko.xz:
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/char/virtio_console.ko.xz: kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz
kernel/net/core/failover.ko.xz:
kernel/fs/ext4/ext4.ko.xz: kernel/fs/mbcache.ko.xz kernel/fs/jbd2/jbd2.ko.xz kernel/lib/crc16.ko.xz
kernel/fs/mbcache.ko.xz:
kernel/fs/jbd2/jbd2.ko.xz:
kernel/lib/crc16.ko.xz:
kernel/crypto/crc32c_generic.ko.xz:
kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz kernel/drivers/virtio/virtio.ko.xz
kernel/net/9p/9pnet.ko.xz:
kernel/fs/9p/9p.ko.xz: kernel/fs/netfs/netfs.ko.xz kernel/net/9p/9pnet.ko.xz kernel/fs/fscache/fscache.ko.xz
kernel/fs/netfs/netfs.ko.xz:
kernel/fs/fscache/fscache.ko.xz: kernel/fs/netfs/netfs.ko.xz
kernel/fs/xfs/xfs.ko.xz:
"""


def _assert_deps_first(order: list[str], dep_text: str) -> None:
    deps = {}
    for line in dep_text.splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    for i, path in enumerate(order):
        for dep in deps.get(path, []):
            assert dep in order[:i], f"{dep} must load before {path}"


def test_module_order_dependencies_first() -> None:
    order = build.module_load_order(MODULES_DEP, recipe.MODULES)
    # virtio_net brings failover and net_failover; ext4 three more, 9p three more
    assert len(order) == len(set(order)) == 19
    assert order[0] == "kernel/drivers/virtio/virtio_ring.ko.xz"
    assert order[1] == "kernel/drivers/virtio/virtio.ko.xz"
    _assert_deps_first(order, MODULES_DEP)
    assert "kernel/fs/xfs/xfs.ko.xz" not in order  # not asked for


def test_built_in_modules_are_skipped_and_others_still_loaded() -> None:
    builtin = "kernel/fs/ext4/ext4.ko\nkernel/crypto/crc32c_generic.ko\n"
    order = build.module_load_order(MODULES_DEP, ("crc32c_generic", "ext4", "virtio_blk"), builtin)
    assert order == [
        "kernel/drivers/virtio/virtio_ring.ko.xz",
        "kernel/drivers/virtio/virtio.ko.xz",
        "kernel/drivers/block/virtio_blk.ko.xz",
    ]
    without = "\n".join(line for line in MODULES_DEP.splitlines() if not line.startswith("kernel/fs/ext4/"))
    assert build.module_load_order(without, ("ext4",), builtin) == []  # built in, and not a module at all
    with pytest.raises(ImageError, match="ext4"):
        build.module_load_order(without, ("ext4",))  # neither: the image cannot boot


def test_module_order_pulls_in_unrequested_dependencies() -> None:
    order = build.module_load_order(MODULES_DEP, ("ext4",))
    assert order[-1] == "kernel/fs/ext4/ext4.ko.xz"
    assert set(order) == {
        "kernel/fs/ext4/ext4.ko.xz",
        "kernel/fs/mbcache.ko.xz",
        "kernel/fs/jbd2/jbd2.ko.xz",
        "kernel/lib/crc16.ko.xz",
    }


def test_module_order_does_not_depend_on_dep_line_order() -> None:
    reversed_text = "\n".join(reversed(MODULES_DEP.splitlines())) + "\n"
    order = build.module_load_order(reversed_text, recipe.MODULES)
    _assert_deps_first(order, MODULES_DEP)
    assert len(order) == 19


@pytest.mark.parametrize("wanted", ["virtio-rng", "virtio_rng"])
def test_module_names_match_dash_or_underscore(wanted: str) -> None:
    order = build.module_load_order(MODULES_DEP, (wanted,))
    assert order[-1] == "kernel/drivers/char/hw_random/virtio-rng.ko.xz"


def test_module_with_underscore_file_found_by_dash_name() -> None:
    text = "kernel/drivers/foo_bar.ko:\n"
    assert build.module_load_order(text, ("foo-bar",)) == ["kernel/drivers/foo_bar.ko"]


@pytest.mark.parametrize("suffix", [".ko", ".ko.xz", ".ko.zst", ".ko.gz"])
def test_module_compression_suffixes(suffix: str) -> None:
    text = f"kernel/a/virtio{suffix}:\n"
    assert build.module_load_order(text, ("virtio",)) == [f"kernel/a/virtio{suffix}"]


def test_missing_module_raises() -> None:
    with pytest.raises(ImageError, match="virtio_blk"):
        build.module_load_order("kernel/drivers/virtio/virtio.ko:\n", ("virtio_blk",))


def test_module_order_ignores_blank_and_malformed_lines() -> None:
    text = "\n# not a module line\nkernel/x/virtio.ko:\n"
    assert build.module_load_order(text, ("virtio",)) == ["kernel/x/virtio.ko"]


def test_module_order_of_nothing() -> None:
    assert build.module_load_order(MODULES_DEP, ()) == []


# -- recipe -------------------------------------------------------------------


def test_recipe_hash_is_stable_and_short() -> None:
    a = recipe.recipe_hash("debian", "bookworm")
    b = recipe.recipe_hash("debian", "bookworm")
    assert a == b
    assert re.fullmatch(r"[0-9a-f]{16}", a)


def test_recipe_hash_depends_on_release() -> None:
    hashes = {
        recipe.recipe_hash("debian", "bookworm"),
        recipe.recipe_hash("debian", "trixie"),
        recipe.recipe_hash("ubuntu", "noble"),
    }
    assert len(hashes) == 3


def test_recipe_hash_depends_on_guest_files(monkeypatch: pytest.MonkeyPatch) -> None:
    before = recipe.recipe_hash("debian", "bookworm")
    real = recipe.guest_file

    def changed(name: str) -> bytes:
        data = real(name)
        return data + b"\n# changed\n" if name == "agent.py" else data

    monkeypatch.setattr(recipe, "guest_file", changed)
    assert recipe.recipe_hash("debian", "bookworm") != before


def test_recipe_hash_depends_on_disk_size(monkeypatch: pytest.MonkeyPatch) -> None:
    before = recipe.recipe_hash("debian", "bookworm")
    monkeypatch.setattr(recipe, "DISK_SIZE_MIB", recipe.DISK_SIZE_MIB * 2)
    assert recipe.recipe_hash("debian", "bookworm") != before


def test_tree_key_depends_on_packages_only(monkeypatch: pytest.MonkeyPatch) -> None:
    key = recipe.tree_key("debian", "bookworm")
    assert re.fullmatch(r"[0-9a-f]{16}", key)
    monkeypatch.setattr(recipe, "guest_file", lambda name: b"different")
    assert recipe.tree_key("debian", "bookworm") == key
    monkeypatch.setattr(recipe, "PACKAGES", (*recipe.PACKAGES, "htop"))
    assert recipe.tree_key("debian", "bookworm") != key


def test_packages_include_the_distro_kernel() -> None:
    deb = recipe.packages("debian")
    ubu = recipe.packages("ubuntu")
    assert "linux-image-amd64" in deb and "linux-image-kvm" not in deb
    assert "linux-image-kvm" in ubu
    assert deb == sorted(deb)
    assert {"python3", "bash", "tini", "busybox-static"} <= set(deb)
    assert recipe.packages("gentoo") == deb  # unknown distros fall back to Debian's kernel


def test_guest_files_are_readable() -> None:
    for name in (*recipe.GUEST_FILES, "protocol.py"):
        assert len(recipe.guest_file(name)) > 0
    assert b"MAGIC" in recipe.guest_file("protocol.py")


@pytest.mark.parametrize(
    "text,expected",
    [
        ('PRETTY_NAME="Debian GNU/Linux 12"\nID=debian\nVERSION_CODENAME=bookworm\n', ("debian", "bookworm")),
        ('ID=ubuntu\nVERSION_CODENAME="noble"\n', ("ubuntu", "noble")),
        ("ID=fedora\nVERSION_CODENAME=\n", ("debian", "bookworm")),
        ("ID=debian\n", ("debian", "bookworm")),
        ("", ("debian", "bookworm")),
    ],
)
def test_host_release(tmp_path: Path, text: str, expected: tuple[str, str]) -> None:
    path = tmp_path / "os-release"
    path.write_text(text)
    assert recipe.host_release(path) == expected


def test_host_release_missing_file(tmp_path: Path) -> None:
    assert recipe.host_release(tmp_path / "nope") == ("debian", "bookworm")


# -- module decompression -----------------------------------------------------

MODULE_BYTES = b"\x7fELF fake module " + bytes(range(256)) * 50


def test_module_bytes_plain_and_xz(tmp_path: Path) -> None:
    import lzma

    plain = tmp_path / "virtio.ko"
    plain.write_bytes(MODULE_BYTES)
    xz = tmp_path / "virtio_blk.ko.xz"
    xz.write_bytes(lzma.compress(MODULE_BYTES))
    assert build._module_bytes(plain) == MODULE_BYTES
    assert build._module_bytes(xz) == MODULE_BYTES


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd is not installed")
def test_module_bytes_zstd(tmp_path: Path) -> None:
    raw = tmp_path / "virtio_blk.ko"
    raw.write_bytes(MODULE_BYTES)
    subprocess.run(["zstd", "-q", "--rm", str(raw)], check=True)
    assert build._module_bytes(tmp_path / "virtio_blk.ko.zst") == MODULE_BYTES

"""Builds the default guest image from the host's own distribution mirrors.

Steps: a root filesystem tree by mmdebstrap (cached by its package set),
our agent and init copied in, an ext4 image made from the tree by
``mkfs.ext4 -d`` (no loop mounts) and stored as qcow2, the distribution's
kernel, and a small initramfs of ours (busybox plus the virtio modules).
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .. import protocol
from ..exceptions import HostError, ImageError
from ..paths import images_dir
from . import recipe
from .kernel import pvh_kernel
from .store import ImageStore, ImageVersion

Progress = Callable[[str, float], None]  # (step description, fraction done)

APT_SOURCES = Path("/etc/apt/sources.list")
APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")
FORWARDED_APT_OPTIONS = re.compile(r"^Acquire::(https?::Proxy|Check-Valid-Until|Check-Date)\b")


def _run(argv: list[str], what: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    except FileNotFoundError:
        raise HostError(f"{argv[0]} is not installed: run 'smolvm setup' as root to install it") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise ImageError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc


def host_sources(suite: str) -> list[dict[str, str]]:
    """The host's apt sources for ``suite`` (and its -updates/-security), as deb822 stanzas."""
    stanzas: list[dict[str, str]] = []
    files = [APT_SOURCES, *sorted(APT_SOURCES_DIR.glob("*.list")), *sorted(APT_SOURCES_DIR.glob("*.sources"))]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for block in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in block.splitlines():
                    if line.startswith("#") or ":" not in line or line[0].isspace():
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip()] = value.strip()
                if fields.get("Enabled", "yes").lower() != "no" and "deb" in fields.get("Types", "").split():
                    stanzas.append(fields)
        else:
            for line in text.splitlines():
                m = re.match(r"^\s*deb\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+(.+)$", line)
                if m:
                    stanza = {"Types": "deb", "URIs": m.group(2), "Suites": m.group(3), "Components": m.group(4)}
                    signed = re.search(r"signed-by=(\S+?)[\s\]]", m.group(1) or "")
                    if signed:
                        stanza["Signed-By"] = signed.group(1)
                    stanzas.append(stanza)
    wanted = {suite, f"{suite}-updates", f"{suite}-security"}
    result = []
    for stanza in stanzas:
        suites = [s for s in stanza.get("Suites", "").split() if s in wanted]
        if suites and stanza.get("URIs"):
            result.append(dict(stanza, Suites=" ".join(suites)))
    return result


def sources_file(suite: str, dest: Path) -> Path:
    """Write the sources mmdebstrap should use: SMOLVM_MIRROR if set, else the host's own."""
    mirror = os.environ.get("SMOLVM_MIRROR")
    if mirror:
        stanzas = [{"Types": "deb", "URIs": mirror, "Suites": suite, "Components": "main"}]
    else:
        stanzas = host_sources(suite)
    if not stanzas:
        raise ImageError(
            f"no apt source for {suite!r} found in the host's apt configuration: "
            "set SMOLVM_MIRROR to a Debian mirror URL and run 'smolvm setup' again"
        )
    dest.write_text("\n".join("".join(f"{k}: {v}\n" for k, v in s.items()) for s in stanzas))
    return dest


def apt_options() -> list[str]:
    """The host's apt settings worth keeping in the build (proxies, date checks)."""
    try:
        dump = subprocess.run(["apt-config", "dump"], capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        return []
    return [f"--aptopt={line}" for line in dump.splitlines() if FORWARDED_APT_OPTIONS.match(line)]


def build_tree(distro: str, suite: str, progress: Progress) -> Path:
    """The root filesystem tree for this package set, built once and cached."""
    cache = images_dir() / "cache"
    tree = cache / f"tree-{recipe.tree_key(distro, suite)}"
    if (tree / ".complete").exists():
        return tree
    cache.mkdir(parents=True, exist_ok=True)
    progress(f"downloading and installing {distro} {suite} packages (about a minute)", 0.05)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".tree-") as tmp:
        work = Path(tmp) / "root"
        sources = sources_file(suite, Path(tmp) / "host.sources")
        argv = [
            "mmdebstrap",
            "--mode=root",
            "--variant=minbase",
            "--format=directory",
            f"--include={','.join(recipe.packages(distro))}",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-exclude=/usr/share/info/*",
            *(f"--dpkgopt={f}" for f in recipe.dpkg_filters()),
            *apt_options(),
            suite,
            str(work),
            str(sources),
        ]
        _run(argv, "mmdebstrap")
        _prepare_tree(work)
        (work / ".complete").touch()
        if tree.exists():
            shutil.rmtree(tree)
        os.rename(work, tree)
    return tree


def _prepare_tree(tree: Path) -> None:
    # Each sandbox gets its own SSH host key later; none is baked into the image.
    for key in (tree / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    for initrd in (tree / "boot").glob("initrd.img*"):
        initrd.unlink()
    (tree / "etc/hostname").write_text("smolvm\n")


def _install_guest_files(tree: Path) -> None:
    dest = tree / "opt/smolvm"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in (*recipe.AGENT_FILES, "protocol.py"):
        (dest / name).write_bytes(recipe.guest_file(name))
    (dest / "init.sh").chmod(0o755)
    _write_network_config(tree)
    # Compile with the guest's own python so the agent starts without compiling.
    _run(["chroot", str(tree), "python3", "-m", "compileall", "-q", "/opt/smolvm"], "compiling the guest agent")


def _write_network_config(tree: Path) -> None:
    """The guest's view of its network: no DNS (names are resolved, and checked, by the
    host's egress proxy), the proxy for every program that honours the variables, and
    the host's name for the ports a sandbox may reach on it."""
    (tree / "etc/hosts").write_text(
        f"127.0.0.1 localhost\n::1 localhost\n{protocol.HOST_ADDRESS} {protocol.HOST_ALIAS}\n"
    )
    (tree / "etc/resolv.conf").unlink(missing_ok=True)
    (tree / "etc/resolv.conf").write_text("# smolvm: no DNS here; HTTP(S) goes through the proxy in $https_proxy\n")
    proxy = "".join(f"{k}={v}\n" for k, v in protocol.PROXY_ENV.items())
    (tree / "etc/environment").write_text(proxy)  # sshd sessions (pam_env)
    (tree / "etc/profile.d/smolvm-network.sh").write_text("".join(f"export {line}" for line in proxy.splitlines(True)))


def kernel_version(tree: Path) -> str:
    versions = sorted(
        p.name for p in (tree / "lib/modules").iterdir() if (tree / "boot" / f"vmlinuz-{p.name}").exists()
    )
    if not versions:
        raise ImageError("the image tree has no kernel: delete the cache and run 'smolvm image build --force'")
    return versions[-1]


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """modules.dep as {module path: [the paths it needs]}."""
    deps = {}
    for line in text.splitlines():
        path, sep, rest = line.partition(":")
        if sep:
            deps[path] = rest.split()
    return deps


def module_name(path: str) -> str:
    return Path(path).name.split(".ko")[0]


def module_load_order(modules_dep: str, wanted: tuple[str, ...], builtin: str = "") -> list[str]:
    """Paths (relative to the modules dir) of ``wanted`` and what they need, dependencies first.

    ``modules_dep`` is the text of the kernel's modules.dep, whose order of
    dependencies changes between kernel builds, so it is read, not assumed;
    ``builtin`` that of its modules.builtin: a module built into the kernel
    (ext4 in Debian's cloud kernel, a module in its generic one) needs no loading.
    """
    deps = parse_modules_dep(modules_dep)
    by_name: dict[str, str] = {}
    for path in deps:
        name = module_name(path)
        by_name[name] = by_name[name.replace("-", "_")] = path
    built_in = {module_name(line.strip()).replace("-", "_") for line in builtin.splitlines() if line.strip()}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        if name.replace("-", "_") in built_in:
            continue
        found = by_name.get(name) or by_name.get(name.replace("-", "_"))
        if found is None:
            raise ImageError(f"kernel module {name} is not in this kernel's modules.dep")
        visit(found)
    return order


def _module_bytes(path: Path) -> bytes:
    if path.suffix == ".xz":
        import lzma

        return lzma.decompress(path.read_bytes())
    if path.suffix == ".zst":
        try:
            proc = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=False)
        except FileNotFoundError:
            raise HostError("zstd is not installed: install the 'zstd' package to build this kernel's image") from None
        if proc.returncode != 0:
            raise ImageError(f"decompressing {path.name} failed: {proc.stderr.decode(errors='replace')[-300:]}")
        return proc.stdout
    return path.read_bytes()


INITRAMFS_FSTAB = """\
devpts /dev/pts devpts gid=5,mode=620,ptmxmode=666 0 0
tmpfs /dev/shm tmpfs mode=1777,nosuid,nodev 0 0
tmpfs /newroot/run tmpfs mode=755,nosuid,nodev 0 0
sysfs /newroot/sys sysfs defaults 0 0
cgroup2 /newroot/sys/fs/cgroup cgroup2 nosuid,nodev,noexec,favordynmods 0 0
"""


def build_initramfs(tree: Path, kver: str, dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in ("bin", "dev", "proc", "newroot", "etc", f"lib/modules/{kver}"):
            (root / d).mkdir(parents=True)
        busybox = tree / "bin/busybox"
        if not busybox.exists():
            busybox = tree / "usr/bin/busybox"
        shutil.copy2(busybox, root / "bin/busybox")
        moddir = tree / "lib/modules" / kver
        modules_dep = (moddir / "modules.dep").read_text()
        builtin = (moddir / "modules.builtin").read_text() if (moddir / "modules.builtin").exists() else ""
        deps = parse_modules_dep(modules_dep)
        lines = []
        for rel in module_load_order(modules_dep, recipe.MODULES, builtin):
            name = module_name(rel)
            (root / "lib/modules" / kver / f"{name}.ko").write_bytes(_module_bytes(moddir / rel))
            lines.append(f"{name}.ko: " + " ".join(f"{module_name(d)}.ko" for d in deps.get(rel, [])))
        # busybox modprobe resolves dependencies from this (module files by base name);
        # it is told to load every module in it, dependencies first
        (root / "lib/modules" / kver / "modules.dep").write_text("\n".join(lines) + "\n")
        (root / "modules.load").write_text(" ".join(module_name(line.split(":")[0]) for line in lines) + "\n")
        (root / "etc/fstab").write_text(INITRAMFS_FSTAB)
        init = root / "init"
        init.write_bytes(recipe.guest_file("initramfs-init"))
        init.chmod(0o755)
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        listing = "\n".join(["."] + names) + "\n"
        packed = subprocess.run(
            ["cpio", "--create", "--format=newc", "--quiet", "--owner=0:0"],
            input=listing.encode(),
            cwd=root,
            capture_output=True,
        )
        if packed.returncode != 0:
            raise ImageError(f"packing the initramfs failed: {packed.stderr.decode(errors='replace')[-500:]}")
        dest.write_bytes(gzip.compress(packed.stdout, compresslevel=6, mtime=0))


def build_image(name: str = "default", *, force: bool = False, progress: Progress | None = None) -> ImageVersion:
    """Build the image unless the current one already matches its recipe."""
    report = progress or (lambda _msg, _frac: None)
    distro, suite = recipe.host_release()
    want = recipe.recipe_hash(distro, suite)
    store = ImageStore()
    if not force and store.is_current(name, want):
        report("image is up to date", 1.0)
        return store.load(name)
    if os.geteuid() != 0:
        raise HostError("building the guest image needs root once (mmdebstrap, chroot): run 'sudo smolvm setup'")
    for tool in ("mmdebstrap", "mkfs.ext4", "qemu-img", "cpio"):
        if shutil.which(tool) is None:
            raise HostError(f"{tool} is not installed: run 'smolvm setup' as root to install it")
    if force:
        shutil.rmtree(images_dir() / "cache" / f"tree-{recipe.tree_key(distro, suite)}", ignore_errors=True)
    tree = build_tree(distro, suite, report)
    report("installing the guest agent", 0.6)
    _install_guest_files(tree)
    kver = kernel_version(tree)
    store.root.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(dir=store.root, prefix=".build-"))
    try:
        report("building the initramfs", 0.65)
        bzimage = (tree / "boot" / f"vmlinuz-{kver}").read_bytes()
        elf = pvh_kernel(bzimage)
        (build_dir / "kernel").write_bytes(elf or bzimage)
        build_initramfs(tree, kver, build_dir / "initrd.img")
        report("making the root filesystem", 0.7)
        raw = build_dir / "rootfs.ext4"
        _run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-L",
                "smolvm-root",
                "-d",
                str(tree),
                "-E",
                "root_owner=0:0",
                str(raw),
                f"{recipe.DISK_SIZE_MIB}M",
            ],
            "mkfs.ext4",
        )
        report("converting the root filesystem to qcow2", 0.85)
        _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(build_dir / "rootfs.qcow2")], "qemu-img convert")
        raw.unlink()
        (build_dir / "rootfs.qcow2").chmod(0o444)
        report("recording sha256 sums", 0.95)
        manifest = {
            "name": name,
            "recipe": want,
            "distro": distro,
            "suite": suite,
            "kernel_version": kver,
            "kernel_format": "elf-pvh" if elf else "bzimage",
            "disk_size_mib": recipe.DISK_SIZE_MIB,
            "protocol_version": _protocol_version(),
            "built_at": time.time(),
        }
        image = store.install(name, build_dir, manifest)
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise
    report("image ready", 1.0)
    return image


def _protocol_version() -> int:
    from .. import protocol

    return protocol.VERSION

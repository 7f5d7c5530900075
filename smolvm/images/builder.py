"""Custom images without Docker: steps run in a builder sandbox, one cached layer each.

``Image.from_image("default").run("...").copy("./app", "/app").env({...})`` is a
recipe; ``build(name)`` makes it an image in the store. The builder sandbox boots
once from the disk of the longest prefix of steps already built (the cache), runs
the rest, and after each step that changes the disk freezes that disk as the step's
layer and goes on writing to a new one (an external snapshot: ``freeze_root_disk``),
so every step gets its own layer without a boot of its own. A step that fails stops
the build with its output; the layers of the steps before it stay cached, and no
image is touched. The finished image is an image version like the default one:
the base's kernel and initrd, and for its root disk the top layer, which reads
through the others to the base image's disk.

Steps and what they leave: ``run`` (a command, with ``/bin/sh -c`` as Docker's RUN),
``copy`` (a host file or tree), ``env`` (kept in the guest, where every command sees
it: ``set_env_vars``), ``workdir`` (made, and the directory commands run in) change
the disk; ``user``, ``cmd``, ``entrypoint``, ``label``, ``expose`` and ``arg`` only the
image's config.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import tarfile
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from .. import templates
from ..exceptions import BuildError, ImageError, OperationTimeoutError, SmolVMError, ValidationError
from ..types import ImageInfo, InternetSettings, VMConfig
from . import layers
from .store import ImageStore, ImageVersion, check_name

if TYPE_CHECKING:
    from ..sandbox import SmolVM

Report = Callable[[str], object]
DISK_STEPS = ("run", "copy", "env", "workdir")
CREDENTIALS = re.compile(r"(://)[^/@\s]+@")  # user:token@ in a URL
CONFIG_STEPS = ("user", "cmd", "entrypoint", "label", "expose", "arg")
STEP_TIMEOUT = 1800.0
BUILD_MEMORY = None  # the builder's memory: a sandbox's default, whose template it resumes (memory= for more)
OUTPUT_TAIL = 4000  # characters of a failed step's output in its error


@dataclass(frozen=True)
class Step:
    kind: str
    value: Any  # json-able: a command, a path, a mapping, a list
    source: str | None = None  # copy: the host path
    where: str = ""  # "Dockerfile line 4" or "step 3", for errors

    @property
    def disk(self) -> bool:
        return self.kind in DISK_STEPS

    def describe(self) -> str:
        if self.kind == "copy":
            text = f"{self.source} -> {self.value['dest']}"
        elif self.kind == "arg":  # build args may be secrets: their names only
            text = " ".join(sorted(self.value))
        elif self.kind == "run":
            text = CREDENTIALS.sub(r"\1***@", self.value)
        else:
            text = self.value if isinstance(self.value, str) else json.dumps(self.value)
        shown = f"{self.kind.upper()} {text}"
        return shown if len(shown) <= 100 else shown[:97] + "..."

    def key(self, parent: str) -> str:
        """The cache key of this step after ``parent``: a copy's is also its files' contents."""
        content = tree_hash(Path(self.source)) if self.kind == "copy" and self.source else None
        text = json.dumps([parent, self.kind, self.value, content], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Config:
    """What the steps so far leave in the image's config (the disk holds the rest)."""

    env: dict[str, str] = field(default_factory=dict)
    args: dict[str, str] = field(default_factory=dict)  # build-time only, as Docker's ARG
    workdir: str | None = None
    user: str | None = None
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    labels: dict[str, str] = field(default_factory=dict)
    expose: list[str] = field(default_factory=list)

    def after(self, step: Step) -> Config:
        kind, value = step.kind, step.value
        if kind == "env":
            return replace(self, env={**self.env, **value})
        if kind == "arg":
            return replace(self, args={**self.args, **value})
        if kind == "workdir":
            return replace(self, workdir=value)
        if kind == "user":
            return replace(self, user=value)
        if kind == "cmd":
            return replace(self, cmd=list(value))
        if kind == "entrypoint":
            return replace(self, entrypoint=list(value))
        if kind == "label":
            return replace(self, labels={**self.labels, **value})
        if kind == "expose":
            return replace(self, expose=[*self.expose, *value])
        return self

    def saved(self) -> dict[str, Any]:
        """The image's config, as its manifest keeps it (build args are not kept)."""
        return {
            "env": self.env, "workdir": self.workdir, "user": self.user, "cmd": self.cmd,
            "entrypoint": self.entrypoint, "labels": self.labels, "expose": self.expose,
        }  # fmt: skip


def tree_hash(path: Path) -> str:
    """What a copy of ``path`` depends on: each entry's name, type, mode and content (or
    link target), not times, so a fresh checkout of the same files hits the cache."""
    digest = hashlib.sha256()

    def add(entry: Path, name: str) -> None:
        # Each field's length before it, so no two trees give the same stream.
        st = entry.lstat()
        link = os.readlink(entry).encode("utf-8", "surrogateescape") if entry.is_symlink() else b""
        size = st.st_size if entry.is_file() and not link else len(link)
        digest.update(b"%d:%s %o %d:" % (len(name.encode("utf-8", "surrogateescape")),
                                         name.encode("utf-8", "surrogateescape"), st.st_mode, size))  # fmt: skip
        if link:
            digest.update(link)
        elif entry.is_file():
            with open(entry, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)

    path = path.resolve()  # what the copy reads: a link's target, not the link
    digest.update(b"dir" if path.is_dir() else b"file")
    if not path.is_dir():
        add(path, path.name)
        return digest.hexdigest()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted([*dirs, *files]):
            entry = Path(root, name)
            add(entry, str(entry.relative_to(path)))
    return digest.hexdigest()


def _guest_path(path: str, workdir: str | None, where: str) -> str:
    """An absolute guest path: a relative one is under the working directory (``/`` without one)."""
    if not isinstance(path, str) or not path or "\0" in path or "\n" in path:
        raise ValidationError(f"{where}: {path!r} is not a guest path")
    joined = PurePosixPath(workdir or "/") / path
    return str(joined) + ("/" if path.endswith("/") and str(joined) != "/" else "")


class Image:
    """A recipe for a custom image: a base and steps, each method returning a new recipe.

    >>> img = Image.from_image("default").run("echo hi > /etc/motd").env({"APP_ENV": "dev"})
    >>> img.build("mine")  # doctest: +SKIP
    """

    def __init__(self, base: str = "default", steps: Sequence[Step] = ()) -> None:
        self.base = check_name(base)
        self.steps: tuple[Step, ...] = tuple(steps)

    @classmethod
    def from_image(cls, name: str) -> Image:
        """Start from an image in the store (``default``, or one built or imported)."""
        return cls(name)

    @classmethod
    def from_dockerfile(
        cls, path: str | os.PathLike[str], *, build_args: Mapping[str, str] | None = None,
        context: str | os.PathLike[str] | None = None,
    ) -> Image:  # fmt: skip
        """The recipe a Dockerfile describes (see smolvm/images/dockerfile.py); ``context``:
        the directory its COPY paths are in, by default the Dockerfile's own."""
        from .dockerfile import parse

        return parse(Path(path), build_args or {}, Path(context) if context is not None else None)

    def _with(self, kind: str, value: Any, source: str | None = None) -> Image:
        return Image(self.base, [*self.steps, Step(kind, value, source, f"step {len(self.steps) + 1}")])

    def run(self, *commands: str) -> Image:
        """Run each command (with ``/bin/sh -c``) in the image, as its own step."""
        img = self
        for command in commands:
            if not isinstance(command, str) or not command.strip():
                raise ValidationError(f"run() takes shell commands, not {command!r}")
            img = img._with("run", command)
        return img

    def copy(self, src: str | os.PathLike[str], dest: str) -> Image:
        """Copy a host file or directory tree into the image (a tree's contents go into ``dest``)."""
        source = Path(src).absolute()
        if not source.exists():
            raise ValidationError(f"copy(): {src} does not exist on this host")
        _guest_path(dest, None, "copy()")
        return self._with("copy", {"dest": dest}, str(source))

    def env(self, values: Mapping[str, str]) -> Image:
        """Variables every later step and every command in the image's sandboxes see."""
        from ..commands import check_env

        return self._with("env", check_env(values))

    def workdir(self, path: str) -> Image:
        """The directory later steps and the image's commands run in (made if missing)."""
        return self._with("workdir", _guest_path(path, None, "workdir()").rstrip("/") or "/")

    def user(self, name: str) -> Image:
        """The user later ``run`` steps run as (it must exist in the image by then)."""
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise ValidationError(f"user() takes a user name or uid, not {name!r}")
        return self._with("user", name)

    def apt_install(self, *packages: str) -> Image:
        """Install Debian packages from the image's apt sources (the host's mirror in the
        default image), in one step; apt's lists are removed after, to keep the layer small."""
        names = _names(packages, DEB_NAME, "apt_install()", "Debian package names such as 'nodejs' or 'curl=7.88.1-10'")
        return self._with(
            "run",
            "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "
            f"{shlex.join(names)} && rm -rf /var/lib/apt/lists/*",
        )

    def pip_install(self, *packages: str, index_url: str | None = None) -> Image:
        """Install Python packages with the image's pip, in one step (into the system's
        Python, as a Dockerfile's ``RUN pip install`` would). ``index_url``: a package index
        of your own instead of the one pip is configured with (a plain-HTTP one is trusted)."""
        names = _names(packages, PIP_REQUIREMENT, "pip_install()", "requirements such as 'numpy' or 'pandas>=2'")
        argv = ["python3", "-m", "pip", "install", "-q", "--no-cache-dir", "--break-system-packages",
                "--disable-pip-version-check", "--root-user-action=ignore"]  # fmt: skip
        if index_url is not None:
            url = urllib.parse.urlsplit(index_url)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ValidationError(f"pip_install(): index_url must be an http(s) URL, not {index_url!r}")
            argv += ["--index-url", index_url] + (["--trusted-host", url.hostname] if url.scheme == "http" else [])
        return self._with("run", shlex.join([*argv, *names]))

    def cmd(self, argv: Sequence[str]) -> Image:
        """The image's default command, kept in its config (as Docker's CMD)."""
        return self._with("cmd", _argv(argv, "cmd()"))

    def entrypoint(self, argv: Sequence[str]) -> Image:
        return self._with("entrypoint", _argv(argv, "entrypoint()"))

    def build(
        self, name: str, *, no_cache: bool = False, progress: Report | None = None,
        step_timeout: float = STEP_TIMEOUT, memory: int | None = BUILD_MEMORY,
        internet_settings: InternetSettings | Mapping[str, Any] | None = None,
    ) -> ImageInfo:  # fmt: skip
        """Build the image and file it under ``name`` (an image of that name gets a new
        version; sandboxes made from the old one keep it). Steps whose layers are cached
        are not run again (``no_cache=True``: all are). ``progress`` gets a line for each
        step and the steps' output as it comes. ``internet_settings``: the builder
        sandbox's egress policy, as any sandbox's (by default public addresses only; a
        package mirror or index behind a private address needs its exact name allowed)."""
        report = progress or (lambda _line: None)
        return Build(self, check_name(name), no_cache, report, step_timeout, memory, internet_settings).run()


DEB_NAME = re.compile(r"\A[a-z0-9][a-z0-9+.-]{0,99}(?:=[A-Za-z0-9.+:~-]{1,100})?\Z")
PIP_REQUIREMENT = re.compile(
    r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,99}(?:\[[A-Za-z0-9,._-]{1,100}\])?(?:[<>=!~]{1,3}[A-Za-z0-9.*+!-]{1,50}(?:,[<>=!~]{1,3}[A-Za-z0-9.*+!-]{1,50}){0,5})?\Z"
)


def _names(items: Sequence[str], pattern: re.Pattern[str], what: str, example: str) -> list[str]:
    if not items or not all(isinstance(i, str) and pattern.match(i) for i in items):
        raise ValidationError(f"{what} takes {example}, not {list(items)!r}")
    return list(items)


def _argv(argv: Sequence[str], what: str) -> list[str]:
    if isinstance(argv, str) or not argv or not all(isinstance(a, str) for a in argv):
        raise ValidationError(f"{what} takes a list of strings such as ['python3', 'app.py'], not {argv!r}")
    return list(argv)


@dataclass
class Build:
    image: Image
    name: str
    no_cache: bool
    report: Report
    step_timeout: float
    memory: int | None
    internet_settings: InternetSettings | Mapping[str, Any] | None = None
    built: int = 0

    def run(self) -> ImageInfo:
        if self.name == "default":
            raise ValidationError("the default image is made by 'smolvm setup': give your image another name")
        store = ImageStore()
        base = store.load(self.image.base)
        steps = self.image.steps
        # The chain of keys: a fresh start for --no-cache, so no old layer matches.
        key = f"image:{base.name}/{base.dir.name}" + (f"/{secrets.token_hex(8)}" if self.no_cache else "")
        keys = []
        for step in steps:
            key = step.key(key)
            keys.append(key)
        start, parent = self._cached(steps, keys, base)
        config = Config(**_base_config(base))
        for step in steps[:start]:
            config = config.after(step)
        for number in range(start):
            self.report(f"[{number + 1}/{len(steps)}] cached: {steps[number].describe()}")
        top_key = parent[1]
        if any(step.disk for step in steps[start:]):
            top_key, config = self._build_rest(base, steps, keys, start, parent, config)
        else:
            for step in steps[start:]:
                config = config.after(step)
        return self._install(store, base, top_key, config, cached=start, total=len(steps))

    @staticmethod
    def _cached(steps: Sequence[Step], keys: list[str], base: ImageVersion) -> tuple[int, tuple[Path, str | None]]:
        """How many steps are built already, and the disk (and its layer's key) they end on."""
        for count in range(len(steps), -1, -1):
            disk_steps = [i for i in range(count) if steps[i].disk]
            if not disk_steps:
                top = _base_layer(base)  # a built base: its top layer, not a path in its version
                return count, (layers.disk_of(top) if top else base.rootfs, top)
            layer = layers.find(keys[disk_steps[-1]])
            if layer is not None:
                return count, (layer.disk, layer.key)
        raise AssertionError("unreachable: no steps is always built")

    def _build_rest(
        self, base: ImageVersion, steps: Sequence[Step], keys: list[str], start: int,
        parent: tuple[Path, str | None], config: Config,
    ) -> tuple[str | None, Config]:  # fmt: skip
        """Boot a builder on the cached disk and run steps ``start``..., a layer for each
        that changes the disk. Returns the top layer's key and the config at the end."""
        from ..backends.qemu import create_overlay, freeze_root_disk
        from ..paths import sandbox_dir
        from ..sandbox import SmolVM

        stage = layers.staging()
        # Each finished disk step's key, disk file, step, and the file's stamp when frozen.
        frozen: list[tuple[str, Path, Step, tuple[int, int, int]]] = []
        parent_disk, parent_key = parent
        # On the base image itself, a saved template of its shape resumes in a fraction of a
        # boot; its disk is then folded into the first layer (below).
        template = None if parent_key is not None else _template(base, self.memory)
        self.report(f"{'resuming' if template else 'booting'} a builder sandbox ({len(steps) - start} steps to run)")
        origin = (template.disk, template.saved(), base) if template else (parent_disk, None, base)
        vm = SmolVM(memory=self.memory, fast_start=False, internet_settings=self.internet_settings, _base=origin)
        failure: BaseException | None = None
        try:
            vm.start(boot_timeout=180)
            control = vm._spec().control_socket
            current = sandbox_dir(vm.vm_id) / "disk.qcow2"
            for number in range(start, len(steps)):
                step = steps[number]
                self.report(f"[{number + 1}/{len(steps)}] {step.describe()}")
                self._apply(vm, step, config)
                config = config.after(step)
                if step.disk:
                    vm.run("sync", timeout=120)
                    following = stage / f"{len(frozen) + 1}.qcow2"
                    create_overlay(current, following, base.disk_size, unsafe=True)  # current is QEMU's
                    freeze_root_disk(control, following, len(frozen) + 1)
                    frozen.append((keys[number], current, step, _stamp(current)))
                    current = following
                    self.built += 1
        except BaseException as exc:
            failure = exc
        finally:
            try:
                vm.stop()
                parent_key = self._commit(frozen, parent_disk, parent_key, template, base)
            except BaseException as exc:
                failure = failure or exc  # a failed step's own error comes first
            finally:
                vm.delete()
                shutil.rmtree(stage, ignore_errors=True)
        if failure is not None:
            raise failure
        return parent_key, config

    @staticmethod
    def _commit(
        frozen: list[tuple[str, Path, Step, tuple[int, int, int]]], below: Path, parent_key: str | None,
        template: templates.Template | None, base: ImageVersion,
    ) -> str | None:  # fmt: skip
        """File the frozen disks as layers, in order (the steps before a failure stay
        cached); the top one's key."""
        for number, (key, disk, step, stamp) in enumerate(frozen):
            # QEMU kept every earlier disk open: one a later step's machine changed is refused.
            if _stamp(disk) != stamp:
                raise BuildError(
                    f"{step.where}: its layer changed after it was made: the build's machine was tampered with"
                )
            if number == 0 and template is not None:  # the first layer reads through the template's disk
                layers.check_header(disk, base.disk_size << 20)
                layers.rebase(disk, template.disk)
                layers.rebase(disk, below, safe=True)
            meta = {"parent_key": parent_key, "step": step.describe()}
            layer, ours = layers.commit(key, disk, below, meta, max_size=base.disk_size << 20)
            if not ours and number + 1 < len(frozen):
                raise BuildError(
                    f"{step.where}: another build filed the same step at the same moment; build again "
                    "(the steps up to it are cached now)"
                )
            below, parent_key = layer.disk, key
        return parent_key

    def _apply(self, vm: SmolVM, step: Step, config: Config) -> None:
        kind, value = step.kind, step.value
        if kind == "run":
            self._command(vm, step, value, config)
        elif kind == "copy":
            self._copy(vm, step, config)
        elif kind == "env":
            vm.set_env_vars(value)
        elif kind == "workdir":
            self._command(vm, step, f"mkdir -p {shlex.quote(value)}", replace(config, workdir=None, user=None))

    def _command(self, vm: SmolVM, step: Step, command: str, config: Config) -> None:
        try:
            result = vm.run(
                f"exec /bin/sh -c {shlex.quote(command)}", timeout=self.step_timeout, env=config.args or None,
                cwd=config.workdir, user=config.user or "root", on_stdout=self.report, on_stderr=self.report,
            )  # fmt: skip
        except OperationTimeoutError:
            raise BuildError(
                f"{step.where} ({step.describe()}) did not finish in {self.step_timeout:g} s, the step's "
                "timeout: the build stopped there (build(step_timeout=...) gives steps longer)"
            ) from None
        if not result.ok:
            tail = (result.stdout + result.stderr)[-OUTPUT_TAIL:].strip()
            raise BuildError(
                f"{step.where} ({step.describe()}) failed with exit code {result.exit_code}; the steps "
                f"before it are cached, no image was changed. Its output ended:\n{tail}"
            )

    def _copy(self, vm: SmolVM, step: Step, config: Config) -> None:
        assert step.source is not None
        source = Path(step.source)
        dest = _guest_path(step.value["dest"], config.workdir, step.where)
        unpack = bool(step.value.get("unpack")) and source.is_file() and tarfile.is_tarfile(source)
        try:
            if source.is_dir() or unpack:
                target = dest.rstrip("/") or "/"
                if unpack:
                    staged = f"/tmp/.smolvm-add-{secrets.token_hex(4)}"
                    vm.upload_file(source, staged)
                    self._command(vm, step, f"mkdir -p {shlex.quote(target)} && tar -xf {staged} -C "
                                  f"{shlex.quote(target)}; s=$?; rm -f {staged}; exit $s", _root(config))  # fmt: skip
                elif target == "/":
                    raise BuildError(f"{step.where}: copying a tree onto / is not supported; copy it into a directory")
                else:
                    vm.upload_dir(source, target)
            else:
                target = dest + source.name if dest.endswith("/") else dest
                parent = str(PurePosixPath(target).parent)
                self._command(vm, step, f"mkdir -p {shlex.quote(parent)}", _root(config))
                vm.upload_file(source, target)
        except FileNotFoundError:
            raise BuildError(f"{step.where}: {source} is gone from this host") from None
        except BuildError:
            raise
        except SmolVMError as exc:
            raise BuildError(f"{step.where} ({step.describe()}) failed: {exc}") from None
        # --chown and --chmod touch what was copied, not what was there before it.
        if source.is_dir():
            copied = [f"{target.rstrip('/')}/{name}" for name in sorted(os.listdir(source))]
        elif unpack:
            with tarfile.open(source) as tar:
                tops = {m.name.lstrip("./").split("/")[0] for m in tar.getmembers()} - {"", ".", ".."}
            copied = [f"{target.rstrip('/')}/{name}" for name in sorted(tops)]
        else:
            copied = [target]
        for flag, tool in (("chown", "chown -hR"), ("chmod", "chmod -R")):
            if step.value.get(flag) and copied:
                command = f"{tool} -- {shlex.quote(step.value[flag])} {shlex.join(copied)}"
                self._command(vm, step, command, _root(config))

    def _install(
        self, store: ImageStore, base: ImageVersion, top_key: str | None, config: Config, cached: int, total: int
    ) -> ImageInfo:
        chain = layers.chain(top_key)
        steps = [step.describe() for step in self.image.steps]
        try:
            current = store.load(self.name)
            same = {"layers": chain, "config": config.saved(), "steps": steps, "base": str(base.dir)}
            if same == {**{k: current.manifest.get(k) for k in ("layers", "config", "steps")},
                        "base": (current.manifest.get("base") or {}).get("dir")}:  # fmt: skip
                self.report(f"image {self.name}: {total} steps, all cached: unchanged")
                return info(current, cached=cached, built=self.built)
        except (ImageError, AttributeError):
            pass  # none yet, or one to replace
        version = file_version(store, self.name, base, top_key, config.saved(), steps)
        self.report(f"image {self.name}: {total} steps ({cached} cached, {self.built} built)")
        return info(version, cached=cached, built=self.built)


def file_version(
    store: ImageStore, name: str, base: ImageVersion, top_key: str | None, config: dict[str, Any], steps: list[str]
) -> ImageVersion:
    """File a new version of image ``name``: ``base``'s kernel and initrd, and as its root
    disk the layer ``top_key`` (or the base's own disk), all hard links."""
    top = layers.disk_of(top_key) if top_key else base.rootfs
    store.root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=store.root, prefix=".build-"))
    try:
        for filename in ("kernel", "initrd.img"):
            os.link(base.dir / filename, work / filename)
        os.link(top, work / "rootfs.qcow2")  # the same read-only file: its header names the layer below
        manifest = {
            **{k: v for k, v in base.manifest.items() if k not in ("files", "name", "recipe", "built_at")},
            "name": name,
            "recipe": (top_key or "base")[:16],
            "built_at": time.time(),
            "base": {"name": base.name, "dir": str(base.dir)},
            "layers": layers.chain(top_key),
            "config": config,
            "steps": steps,
        }
        return store.install(name, work, manifest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def from_sandbox(vm_id: str, name: str, report: Report | None = None) -> ImageInfo:
    """File a sandbox's disk, as it is now, as image ``name`` on the sandbox's own image.
    A running sandbox flushes its disk and is paused for the copy (a disk snapshot, deleted
    after); a stopped one is copied as it is. A paused one is refused: it cannot flush."""
    from ..exceptions import SnapshotError
    from ..paths import sandbox_dir
    from ..sandbox import SmolVM
    from ..snapshots import copy_sparse, expected_base, snapshots_dir
    from ..types import SnapshotType, VMState

    say = report or (lambda _line: None)
    if name == "default":
        raise ValidationError("the default image is made by 'smolvm setup': give your image another name")
    check_name(name)
    vm = SmolVM.from_id(vm_id)
    record = vm._refresh()
    store = ImageStore()
    base_dir = Path(record.image_dir)
    try:
        base = ImageVersion(record.config.image, base_dir, json.loads((base_dir / "manifest.json").read_text()))
    except (OSError, ValueError):
        raise ImageError(f"the image sandbox {vm_id!r} was made from is gone: it cannot become an image") from None
    if record.state == VMState.PAUSED:
        raise ValidationError(f"sandbox {vm_id!r} is paused and cannot flush its disk: resume it first")
    stage = layers.staging()
    snapshot = None
    try:
        copy = stage / "disk.qcow2"
        if record.state == VMState.RUNNING:
            say(f"flushing and copying the disk of sandbox {vm_id}")
            snapshot = vm.snapshot(SnapshotType.DISK)
            copy_sparse(snapshots_dir() / snapshot.snapshot_id / "disk.qcow2", copy)
        else:
            copy_sparse(sandbox_dir(vm_id) / "disk.qcow2", copy)
        largest = max(base.disk_size, record.config.disk_size or 0) << 20
        layers.check_header(copy, largest)  # before anything reads through it
        try:
            below = expected_base(copy, base_dir)  # the image, a template of it, or a snapshot
        except SnapshotError as exc:
            raise ImageError(str(exc)) from None
        top = _base_layer(base)
        parent = layers.disk_of(top) if top else base.rootfs
        if not os.path.samefile(below, parent):
            # A template's or a snapshot's disk is folded in: the layer then reads through
            # to the image alone (qemu-img's safe rebase copies what differs).
            say("folding the template's or snapshot's disk into the layer")
            layers.rebase(copy, parent, safe=True)
        key = hashlib.sha256(f"sandbox:{vm_id}:{record.created_at}:{secrets.token_hex(8)}".encode()).hexdigest()[:32]
        layers.commit(key, copy, parent, {"parent_key": top, "step": f"FROM SANDBOX {vm_id}"}, max_size=largest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if snapshot is not None:
            SmolVM.delete_snapshot(snapshot.snapshot_id)
    steps = [*[s for s in base.manifest.get("steps") or [] if isinstance(s, str)], f"FROM SANDBOX {vm_id}"]
    version = file_version(store, name, base, key, dict(base.manifest.get("config") or {}), steps)
    say(f"image {name}: the disk of sandbox {vm_id}")
    return info(version, built=1)


def _template(base: ImageVersion, memory: int | None) -> templates.Template | None:
    """The saved template a builder on ``base`` may resume, if its shape has one."""
    from ..backends.accel import choose_accel

    shape = VMConfig(memory=memory) if memory is not None else VMConfig()
    try:
        accel = choose_accel(base.kernel, base.initrd).accel
    except SmolVMError:
        return None
    return templates.find(base, shape.memory, shape.vcpus, accel, 0)


def _stamp(path: Path) -> tuple[int, int, int]:
    """What changes whenever a file is written (ctime cannot be set back)."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _root(config: Config) -> Config:
    """A copy's own commands run as root, whatever the USER (Docker's COPY writes as root too)."""
    return replace(config, user=None, args={})


def _base_layer(base: ImageVersion) -> str | None:
    """The top layer of a built base image, or None for one made by ``smolvm setup``."""
    chain = base.manifest.get("layers")
    return chain[0] if isinstance(chain, list) and chain and isinstance(chain[0], str) else None


def _base_config(base: ImageVersion) -> dict[str, Any]:
    saved = base.manifest.get("config")
    if not isinstance(saved, dict):
        return {}
    keep = ("env", "workdir", "user", "cmd", "entrypoint", "labels", "expose")
    return {k: saved[k] for k in keep if saved.get(k) is not None}


def info(version: ImageVersion, cached: int = 0, built: int = 0) -> ImageInfo:
    found = [layers.find(k) for k in version.manifest.get("layers", [])]
    own = [layer.disk.stat().st_blocks * 512 for layer in found if layer is not None]
    base = version.manifest.get("base") or {}
    return ImageInfo(
        name=version.name,
        base=base.get("name") if isinstance(base, dict) else None,
        created_at=float(version.manifest.get("built_at") or 0),
        size=sum(own) if own else version.rootfs.stat().st_blocks * 512,
        steps=list(version.manifest.get("steps", [])),
        cached_steps=cached,
        built_steps=built,
        config=dict(version.manifest.get("config") or {}),
    )


def layers_in_use(store: ImageStore, versions: Iterable[Path]) -> set[str]:
    """Every layer key that the given image versions' chains hold."""
    keys: set[str] = set()
    for version in versions:
        try:
            chain = json.loads((version / "manifest.json").read_text()).get("layers", [])
        except (OSError, ValueError):
            continue
        keys |= {k for k in chain if isinstance(k, str)}
    return keys

"""Custom images (smolvm/images/builder.py, dockerfile.py, layers.py): recipes and
Dockerfiles built in real builder sandboxes, one cached layer a step."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
from pathlib import Path

import pytest
from conftest import SMOLVM_BIN, needs_image

from smolvm import Image, SmolVM
from smolvm.exceptions import BuildError, ImageError, ValidationError
from smolvm.images import layers
from smolvm.images.builder import tree_hash
from smolvm.images.store import ImageStore
from smolvm.snapshots import backing_file


def dockerfile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "Dockerfile"
    path.write_text(text)
    return path


# == Dockerfiles, read without a sandbox ====================================


def test_a_dockerfile_becomes_the_steps_it_says(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "main.py").write_text("print(1)\n")
    (tmp_path / "req.txt").write_text("x\n")
    path = dockerfile(
        tmp_path,
        """# syntax=docker/dockerfile:1
ARG BASE=default
FROM ${BASE}
ARG GREETING=hi
# a comment between lines
RUN echo $GREETING \\
    && echo continued
RUN ["echo", "exec form"]
ENV APP_ENV=dev OTHER="two words"
ENV PATH_ALONE /opt/$APP_ENV
COPY --chown=root:root app /srv/app
COPY *.txt /srv/
ADD req.txt /srv/added.txt
WORKDIR /srv
WORKDIR app
USER nobody
LABEL team=agents
EXPOSE 8000
CMD ["python3", "main.py"]
ENTRYPOINT /bin/true
""",
    )
    img = Image.from_dockerfile(path, build_args={"GREETING": "hello"})
    assert img.base == "default"
    kinds = [(s.kind, s.value) for s in img.steps]
    assert kinds[0] == ("arg", {"BASE": "default"})
    assert kinds[1] == ("arg", {"GREETING": "hello"})  # --build-arg over the default
    assert kinds[2] == ("run", "echo $GREETING     && echo continued")
    assert kinds[3] == ("run", "echo 'exec form'")
    assert kinds[4] == ("env", {"APP_ENV": "dev", "OTHER": "two words"})
    assert kinds[5] == ("env", {"PATH_ALONE": "/opt/dev"})
    copies = [s for s in img.steps if s.kind == "copy"]
    assert [(Path(s.source or "").name, s.value) for s in copies] == [
        ("app", {"dest": "/srv/app", "chown": "root:root"}),
        ("req.txt", {"dest": "/srv/"}),
        ("req.txt", {"dest": "/srv/added.txt", "unpack": True}),
    ]
    rest = [
        (s.kind, s.value) for s in img.steps if s.kind in ("workdir", "user", "label", "expose", "cmd", "entrypoint")
    ]
    assert rest == [
        ("workdir", "/srv"), ("workdir", "/srv/app"), ("user", "nobody"), ("label", {"team": "agents"}),
        ("expose", ["8000"]), ("cmd", ["python3", "main.py"]), ("entrypoint", ["/bin/sh", "-c", "/bin/true"]),
    ]  # fmt: skip
    assert all(s.where.startswith("Dockerfile line ") for s in img.steps)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("FROM default\nHEALTHCHECK CMD true\n", "line 2: HEALTHCHECK is not supported"),
        ("FROM default\nFROM default\n", "line 2: a second FROM"),
        ("RUN true\n", "line 1: RUN before FROM"),
        ("# only a comment\n", "has no FROM line"),
        ("FROM default\nCOPY ../outside /x\n", "outside the build context"),
        ("FROM default\nCOPY missing.txt /x\n", "missing.txt does not exist in the build context"),
        ("FROM default\nADD https://example.invalid/a.tgz /x\n", "of a URL is not supported"),
        ("FROM default\nCOPY --from=builder /a /b\n", "--from is not supported"),
        ("FROM default\nCOPY a b c\n", "destination must end with /"),
        ('FROM default\nRUN ["unclosed"\n', "is not a JSON list of strings"),
        ("FROM default\nENV bad-name=1\n", "line 2:"),
        ("FROM Not_An_Image\n", "line 1: image name"),
    ],
)
def test_a_dockerfile_line_it_cannot_take_is_named(tmp_path: Path, text: str, message: str) -> None:
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "a").write_text("a")
    (context / "b").write_text("b")
    (tmp_path / "outside").write_text("secret")
    with pytest.raises(BuildError, match=message):
        Image.from_dockerfile(dockerfile(context, text))


def test_a_link_out_of_the_context_is_outside_it(tmp_path: Path) -> None:
    (tmp_path / "etc").symlink_to("/etc")
    with pytest.raises(BuildError, match="outside the build context"):
        Image.from_dockerfile(dockerfile(tmp_path, "FROM default\nCOPY etc/passwd /x\n"))


def test_recipes_refuse_bad_input_before_any_build(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="does not exist"):
        Image.from_image("default").copy(tmp_path / "nothing", "/x")
    with pytest.raises(ValidationError, match="shell commands"):
        Image.from_image("default").run("  ")
    with pytest.raises(ValidationError, match="list of strings"):
        Image.from_image("default").cmd("python3 app.py")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="not valid"):
        Image.from_image("Bad Name")
    for reserved in ("layers", "templates", "cache"):
        with pytest.raises(ValidationError, match="kept for the image store"):
            Image.from_image("default").build(reserved)
    with pytest.raises(ValidationError, match="smolvm setup"):
        Image.from_image("default").build("default")


def test_a_copy_is_keyed_by_its_files_contents_not_their_times(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("one")
    first = tree_hash(tmp_path / "d")
    os.utime(tmp_path / "d" / "f", (1, 1))
    assert tree_hash(tmp_path / "d") == first
    (tmp_path / "d" / "f").write_text("two")
    assert tree_hash(tmp_path / "d") != first
    (tmp_path / "d" / "f").write_text("one")
    (tmp_path / "d" / "f").chmod(0o755)
    assert tree_hash(tmp_path / "d") != first
    # Names and contents cannot run into each other: one file holding what looks like a
    # second entry is not two files.
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a").write_bytes(b"\0b\0100644\0X")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a").write_bytes(b"")
    (tmp_path / "two" / "b").write_bytes(b"X")
    assert tree_hash(tmp_path / "one") != tree_hash(tmp_path / "two")
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "f").write_text("two")
    assert tree_hash(tmp_path / "alone") != tree_hash(tmp_path / "d" / "f")  # a directory is not its one file


# == layers: what a builder's QEMU wrote is checked =========================


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def test_a_layer_names_the_base_smolvm_chose_whatever_its_header_said(tmp_path: Path) -> None:
    parent = tmp_path / "parent.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(parent), "16M")
    hostile = tmp_path / "hostile.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/passwd", str(hostile), "16M")
    root = tmp_path / "layers"
    root.mkdir()
    layer, _ = layers.commit("k1", hostile, parent, {"parent_key": None}, root)
    assert backing_file(layer.disk) == str(parent)
    assert layer.disk.stat().st_mode & 0o777 == 0o444
    assert layers.find("k1", root) == layer and layer.meta()["parent"] == str(parent)


def test_a_second_build_filing_the_same_layer_keeps_the_first_and_says_so(tmp_path: Path) -> None:
    parent = tmp_path / "parent.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(parent), "16M")
    root = tmp_path / "layers"
    root.mkdir()
    mine, theirs = tmp_path / "mine.qcow2", tmp_path / "theirs.qcow2"
    for disk in (mine, theirs):
        qemu_img("create", "-q", "-f", "qcow2", "-b", str(parent), "-F", "qcow2", str(disk))
    first, ours = layers.commit("k", mine, parent, {}, root)
    again, second = layers.commit("k", theirs, parent, {}, root)
    assert ours and not second and again == first
    assert sorted(p.name for p in root.iterdir()) == ["k"]  # the loser's staging is gone


def test_a_disk_reads_through_only_a_plain_path_to_one_of_smolvms_disks(tmp_path: Path) -> None:
    from smolvm.exceptions import SnapshotError
    from smolvm.snapshots import expected_base

    image_dir = tmp_path / "img"
    image_dir.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", str(image_dir / "rootfs.qcow2"), "16M")
    disk = tmp_path / "disk.qcow2"
    for name in (str(image_dir / "rootfs.qcow2"), f"{image_dir}/../img/rootfs.qcow2",
                 f"nbd:127.0.0.1:10809:exportname={image_dir}/rootfs.qcow2", "rootfs.qcow2"):  # fmt: skip
        disk.unlink(missing_ok=True)
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "qcow2", str(disk), "16M")
        if name.startswith("/") and ".." not in name:
            assert expected_base(disk, image_dir) == Path(name)
        else:
            with pytest.raises(SnapshotError, match="none of SmolVM's"):
                expected_base(disk, image_dir)


def test_a_layer_with_an_external_data_file_or_no_qcow2_at_all_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "layer.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}", str(data), "16M")
    with pytest.raises(ImageError, match="features SmolVM never writes"):
        layers.check_header(data)
    junk = tmp_path / "junk.qcow2"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(ImageError, match="not a qcow2 disk"):
        layers.check_header(junk)


def test_prune_keeps_what_images_hold_and_fresh_staging(tmp_path: Path) -> None:
    for name in ("kept", "dropped", ".new-fresh"):
        (tmp_path / name).mkdir()
    removed = layers.prune({"kept"}, tmp_path)
    assert removed == [tmp_path / "dropped"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".new-fresh", "kept"]


# == real builds =============================================================


@needs_image
def test_a_recipe_builds_an_image_whose_sandboxes_have_it_all_and_a_rebuild_runs_only_what_changed(
    tmp_path: Path, scratch_images: list[str]
) -> None:
    scratch_images.append("t-recipe")
    (tmp_path / "app" / "empty").mkdir(parents=True)
    (tmp_path / "app" / "main.py").write_text("import os; print('app', os.getcwd(), os.environ['APP_ENV'])\n")
    (tmp_path / "app" / "link").symlink_to("main.py")
    (tmp_path / "notes.txt").write_text("notes\n")
    default = ImageStore().load("default")
    fresh = f"echo built > /etc/built-marker # {secrets.token_hex(4)}"  # no earlier run's cache
    prefix = (  # recipes are values: each method returns a new one
        Image.from_image("default")
        .run(fresh)
        .copy(tmp_path / "app", "/srv/app")
        .copy(tmp_path / "notes.txt", "/srv/docs/")
    )
    recipe = prefix.env({"APP_ENV": "dev"}).workdir("/srv/app").cmd(["python3", "main.py"])
    lines: list[str] = []
    info = recipe.build("t-recipe", progress=lines.append)
    assert (info.cached_steps, info.built_steps) == (0, 5)  # the CMD changes no disk
    assert info.config["workdir"] == "/srv/app" and info.config["cmd"] == ["python3", "main.py"]
    assert any("[2/6] COPY" in line for line in lines)
    with SmolVM(image="t-recipe") as vm:
        assert vm.run("cat /etc/built-marker /srv/docs/notes.txt").output == "built\nnotes"
        assert vm.run("python3 main.py").output == "app /srv/app dev"  # the image's workdir and env
        assert vm.run("readlink link; test -d empty && echo empty-dir").output == "main.py\nempty-dir"
        assert vm.list_env_vars() == {"APP_ENV": "dev"}
    # Nothing changed: nothing runs, and the image stays as it is.
    again = recipe.build("t-recipe")
    assert (again.cached_steps, again.built_steps) == (6, 0)
    assert len([v for v in (ImageStore().root / "t-recipe").iterdir() if not v.is_symlink()]) == 1
    # The last disk step changed: only it runs, on the cached disk of the steps before.
    third = prefix.env({"APP_ENV": "prod"}).build("t-recipe")
    assert (third.cached_steps, third.built_steps) == (3, 1)
    with SmolVM(image="t-recipe") as vm:
        assert vm.run("cat /etc/built-marker; echo $APP_ENV; pwd").output == "built\nprod\n/root"
    # The base image was only read.
    assert ImageStore().load("default", full_check=True).dir == default.dir


@needs_image
def test_a_failing_or_endless_step_stops_the_build_and_keeps_the_cache_and_the_image(
    tmp_path: Path, scratch_images: list[str]
) -> None:
    scratch_images.append("t-fail")
    good = Image.from_image("default").run(f"echo one > /one # {secrets.token_hex(4)}")
    first = good.build("t-fail")
    before = ImageStore().load("t-fail").dir
    failing = good.run("echo two > /two").run("echo to-stdout; echo to-stderr >&2; exit 3").run("echo never")
    with pytest.raises(BuildError) as caught:
        failing.build("t-fail")
    message = str(caught.value)
    assert "step 3" in message and "exit code 3" in message and "to-stdout" in message and "to-stderr" in message
    assert ImageStore().load("t-fail").dir == before  # the image that was there is untouched
    # The step before the failure was kept: fixing the failing one runs from there.
    fixed = good.run("echo two > /two").run("echo three > /three").build("t-fail")
    assert (fixed.cached_steps, fixed.built_steps) == (2, 1)
    endless = good.run("sleep 600")
    with pytest.raises(BuildError, match="did not finish in 3 s"):
        endless.build("t-fail", step_timeout=3)
    with SmolVM(image="t-fail") as vm:
        assert vm.run("cat /one /two /three").output == "one\ntwo\nthree"
    assert first.cached_steps == 0


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SMOLVM_BIN), *args], capture_output=True, text=True, timeout=600, cwd=cwd, stdin=subprocess.DEVNULL
    )


@needs_image
def test_the_cli_builds_a_dockerfile_inspects_and_removes_it(tmp_path: Path, scratch_images: list[str]) -> None:
    scratch_images.append("t-docker")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("<h1>hi</h1>\n")
    (tmp_path / "site" / "token").write_text(secrets.token_hex(4))  # no earlier run's cache
    with __import__("tarfile").open(tmp_path / "bundle.tar", "w") as tar:
        tar.add(tmp_path / "site" / "index.html", arcname="unpacked/index.html")
    dockerfile(
        tmp_path,
        "FROM default\nARG WHO=nobody\nCOPY site /srv/site\nADD bundle.tar /opt/\n"
        'RUN echo "built by $WHO" > /srv/who\nWORKDIR /srv\nCMD ["cat", "who"]\n',
    )
    built = cli("image", "build", "t-docker", "-f", str(tmp_path / "Dockerfile"), "--build-arg", "WHO=ci")
    assert built.returncode == 0, built.stderr
    assert "image t-docker: 6 steps, 1 cached, 4 built" in built.stdout  # the ARG needs no builder
    assert "[2/6] COPY" in built.stderr and "[4/6] RUN" in built.stderr  # progress, on stderr
    shown = json.loads(cli("image", "inspect", "t-docker", "--json").stdout)
    assert shown["base"] == "default" and shown["config"]["cmd"] == ["cat", "who"]
    assert shown["config"]["workdir"] == "/srv" and len(shown["steps"]) == 6
    ran = cli("run", "--image", "t-docker", "--", "cat who site/index.html /opt/unpacked/index.html")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "built by ci\n<h1>hi</h1>\n<h1>hi</h1>\n"  # in the image's WORKDIR, /srv
    default = cli("run", "--image", "t-docker")  # no command: the image's CMD
    assert default.returncode == 0 and default.stdout == "built by ci\n", default.stderr
    missing = cli("run", "--image", "t-no-such", "--", "true")
    assert missing.returncode == 1 and "there is no image named 't-no-such'" in missing.stderr
    bad = cli("image", "build", "t-docker", "-f", str(dockerfile(tmp_path, "FROM default\nVOLUME /x\n")))
    assert bad.returncode != 0 and "Dockerfile line 2: VOLUME is not supported" in bad.stderr
    assert "Traceback" not in bad.stderr
    usage = cli("image", "build", "t-docker")
    assert usage.returncode == 2 and "-f Dockerfile" in usage.stderr
    assert cli("image", "rm", "t-docker").returncode == 0
    with pytest.raises(ImageError):
        ImageStore().load("t-docker")


@needs_image
def test_a_prepared_sandbox_becomes_an_image_running_or_stopped(scratch_images: list[str]) -> None:
    scratch_images += ["t-prepared", "t-stopped"]
    token = secrets.token_hex(4)
    with SmolVM() as vm:  # resumed from the template: its disk reads through the template's
        vm.run(f"mkdir -p /work && echo {token} > /work/state && useradd -m agent")
        vm.set_env_vars({"PREPARED": "yes"})
        made = cli("image", "build", "t-prepared", "--from", vm.vm_id)
        assert made.returncode == 0, made.stderr
        assert vm.run("cat /work/state").output == token  # it ran on, untouched
        assert SmolVM.list_snapshots() == []  # the disk snapshot it took is gone
        vm.pause()
        paused = cli("image", "build", "t-paused", "--from", vm.vm_id)
        assert paused.returncode == 1 and "is paused and cannot flush its disk" in paused.stderr
        vm.resume()
        vm.run("echo after > /work/after")
        vm.stop()
        stopped = cli("image", "build", "t-stopped", "--from", vm.vm_id)
        assert stopped.returncode == 0, stopped.stderr
    with SmolVM(image="t-prepared") as copy:
        assert copy.run("cat /work/state; id -u agent >/dev/null && echo user; echo $PREPARED").output == (
            f"{token}\nuser\nyes"
        )
        assert copy.run("test -e /work/after || echo absent").output == "absent"
    with SmolVM(image="t-stopped") as copy:
        assert copy.run("cat /work/state /work/after").output == f"{token}\nafter"
    info = ImageStore().load("t-prepared")
    assert info.manifest["base"]["name"] == "default" and len(info.manifest["layers"]) == 1
    assert backing_file(layers.disk_of(info.manifest["layers"][0])) == str(ImageStore().load("default").rootfs)
    gone = cli("image", "build", "t-x", "--from", "no-such-sandbox")
    assert gone.returncode == 1 and "no-such-sandbox" in gone.stderr and "Traceback" not in gone.stderr


def test_a_user_to_run_as_is_a_name_or_a_uid() -> None:
    from smolvm.commands import _check_user

    assert _check_user("app", "agent") == "app" and _check_user("1000", "agent") == "1000"
    assert _check_user("root", "agent") is None and _check_user(None, "agent") is None
    for bad in ("", "App", "a b", "x" * 40, "-rf", "../x"):
        with pytest.raises(ValidationError, match="user must be a user name"):
            _check_user(bad, "agent")
    with pytest.raises(ValidationError, match="needs the agent channel"):
        _check_user("app", "ssh")


@needs_image
def test_an_images_user_runs_its_later_steps_and_its_sandboxes_commands(scratch_images: list[str]) -> None:
    scratch_images.append("t-user")
    recipe = (
        Image.from_image("default")
        .run(f"useradd -m app # {secrets.token_hex(4)}")
        .user("app")
        .run("id -un > /tmp/built-by; echo $HOME >> /tmp/built-by; touch ~/made-by-app")
    )
    recipe.build("t-user")
    with SmolVM(image="t-user") as vm:
        assert vm.run("cat /tmp/built-by; stat -c %U ~/made-by-app").output == "app\n/home/app\napp"
        assert vm.run("id -un; pwd; echo $HOME").output == "app\n/home/app\n/home/app"  # the image's USER
        assert vm.run("id -un; pwd", user="root").output == "root\n/root"
        assert vm.run("id -un", user="nobody").output == "nobody"
        assert vm.spawn("id -un > /tmp/bg; sleep 0.2").wait(30).exit_code == 0
        assert vm.run("cat /tmp/bg").output == "app"
        with pytest.raises(ValidationError, match="user ghost does not exist in the sandbox"):
            vm.run("true", user="ghost")
        assert vm.run("whoami").output == "app"  # the sandbox is as it was


def test_package_steps_are_one_quoted_command_each() -> None:
    img = Image.from_image("default").apt_install("curl", "nodejs=18.19.0+dfsg-6~deb12u2")
    assert img.steps[-1].value.startswith("apt-get update -q && ")
    assert (
        "--no-install-recommends curl 'nodejs=18.19.0+dfsg-6~deb12u2' && rm -rf /var/lib/apt/lists/*"
        in img.steps[-1].value
    )
    img = img.pip_install("numpy", "pandas>=2,<3", "uvicorn[standard]", index_url="http://pkgs.test:8080/simple")
    assert (
        "--index-url http://pkgs.test:8080/simple --trusted-host pkgs.test numpy 'pandas>=2,<3'" in img.steps[-1].value
    )
    for bad in ("a; rm -rf /", "$(x)", "", "-e ."):
        with pytest.raises(ValidationError):
            Image.from_image("default").apt_install(bad)
        with pytest.raises(ValidationError):
            Image.from_image("default").pip_install(bad)
    with pytest.raises(ValidationError, match="index_url"):
        Image.from_image("default").pip_install("x", index_url="file:///etc")


def local_wheel(directory: Path) -> str:
    """A pure-Python wheel written by hand, and a PEP 503 index of it; its file name."""
    import base64
    import zipfile

    files = {
        "smolvm_testpkg/__init__.py": b"VALUE = 'from-the-local-index'\n",
        "smolvm_testpkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: smolvm-testpkg\nVersion: 1.0\n",
        "smolvm_testpkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = (
        "".join(
            f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
            for name, data in files.items()
        )
        + "smolvm_testpkg-1.0.dist-info/RECORD,,\n"
    )
    wheel = "smolvm_testpkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(directory / wheel, "w") as archive:
        for name, data in {**files, "smolvm_testpkg-1.0.dist-info/RECORD": record.encode()}.items():
            archive.writestr(name, data)
    (directory / "simple" / "smolvm-testpkg").mkdir(parents=True)
    digest = hashlib.sha256((directory / wheel).read_bytes()).hexdigest()
    (directory / "simple" / "smolvm-testpkg" / "index.html").write_text(
        f'<html><body><a href="../../{wheel}#sha256={digest}">{wheel}</a></body></html>\n'
    )
    return wheel


def local_apt_repo(directory: Path) -> None:
    """A flat apt repository of one package, built with dpkg-deb."""
    package = directory / "pkg"
    (package / "DEBIAN").mkdir(parents=True)
    (package / "usr" / "share" / "smolvm-hello").mkdir(parents=True)
    (package / "usr" / "share" / "smolvm-hello" / "hello").write_text("from-the-local-apt-repository\n")
    control = "Package: smolvm-hello\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t.test>\nDescription: test\n"
    (package / "DEBIAN" / "control").write_text(control)
    repo = directory / "apt"
    repo.mkdir()
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(package), str(repo / "smolvm-hello_1.0_all.deb")],
                   check=True, capture_output=True)  # fmt: skip
    deb = (repo / "smolvm-hello_1.0_all.deb").read_bytes()
    packages = (
        control
        + f"Filename: ./smolvm-hello_1.0_all.deb\nSize: {len(deb)}\nSHA256: {hashlib.sha256(deb).hexdigest()}\n\n"
    )
    (repo / "Packages").write_text(packages)
    index = packages.encode()
    (repo / "Release").write_text(
        "Origin: test\nLabel: test\nDate: Thu, 03 Dec 2026 00:00:00 UTC\n"
        f"SHA256:\n {hashlib.sha256(index).hexdigest()} {len(index)} Packages\n"
    )


@needs_image
def test_apt_and_pip_steps_install_from_a_local_repository_and_index(tmp_path: Path, scratch_images: list[str]) -> None:
    from nethost import PORT, namespace_host

    if os.geteuid() != 0:
        pytest.skip("the test host needs a network namespace (root)")
    scratch_images.append("t-packages")
    www = tmp_path / "www"
    www.mkdir()
    local_wheel(www)
    local_apt_repo(www)
    name = "pkgs.smolvm.test"
    with namespace_host(www, "i", 214) as address:
        settings = {"allowed_domains": [name], "extra_hosts": {name: address}}
        recipe = (
            Image.from_image("default")
            .run(
                f"rm -f /etc/apt/sources.list /etc/apt/sources.list.d/*; echo 'deb [trusted=yes] "
                f"http://{name}:{PORT}/apt ./' > /etc/apt/sources.list.d/local.list # {secrets.token_hex(4)}"
            )
            .apt_install("smolvm-hello")
            .pip_install("smolvm-testpkg", index_url=f"http://{name}:{PORT}/simple")
        )
        recipe.build("t-packages", internet_settings=settings)
    with SmolVM(image="t-packages") as vm:
        assert vm.run("cat /usr/share/smolvm-hello/hello").output == "from-the-local-apt-repository"
        assert (
            vm.run("python3 -c 'import smolvm_testpkg; print(smolvm_testpkg.VALUE)'").output == "from-the-local-index"
        )
        assert vm.run("ls /var/lib/apt/lists | grep -c Packages || true").output == "0"  # lists not kept

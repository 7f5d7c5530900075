"""The ``smolvm`` command line. Errors print one clear line, never a traceback."""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import json
import os
import shlex
import socket
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import doctor as doctor_mod
from . import paths, snapshots, templates
from .exceptions import SmolVMError, ValidationError
from .filesystem import FileType
from .images.store import ImageStore, ImageVersion
from .mounts import Mount
from .sandbox import SmolVM, check_id
from .types import SnapshotInfo, SnapshotType, VMState

# emoji=False: a guest's ":warning:" is text, not a picture.
out = Console(soft_wrap=True, emoji=False)
err = Console(stderr=True, soft_wrap=True, emoji=False)  # an error stays on one line
F = TypeVar("F", bound=Callable[..., Any])

memory_option = click.option("--memory", type=int, default=None, help="Guest memory in MiB (default 512).")
vcpus_option = click.option("--vcpus", type=int, default=None, help="Number of vCPUs (default 1).")
cpu_limit_option = click.option(
    "--cpu-limit", type=float, default=None, metavar="CORES", help="Cores it may use in all (default: its vCPUs)."
)
image_option = click.option("--image", default=None, help="The image to make it of (default: default).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
mount_option = click.option(
    "--mount",
    "mount_specs",
    multiple=True,
    metavar="HOST[:GUEST][:rw]",
    help="Show a host folder in the guest (read-only unless ':rw'; GUEST defaults to HOST's path); repeatable.",
)
timeout_option = click.option(
    "--timeout",
    type=click.FloatRange(0, 10**7, min_open=True),
    default=300,
    show_default=True,
    help="Seconds before the command is killed.",
)


def visible(text: object, keep: str = "") -> str:
    """Text as it may reach a terminal: every character that is not printable (escapes,
    line breaks but those in ``keep``, bidi controls, lone surrogates) written out as
    a Python escape, so a guest string cannot move the cursor, retitle the window,
    make the terminal answer into stdin, or forge a line of ours."""
    return "".join(c if c.isprintable() or c in keep else ascii(c)[1:-1] for c in str(text))


def shown(text: object) -> str:
    """Guest text for rich's print: made visible, and its markup escaped (no live links)."""
    return escape(visible(text))


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {shown(message)}", highlight=False)  # one line, whatever it quotes
    sys.exit(code)


def run_streaming(vm: SmolVM, command: str, timeout: float, stdin: BinaryIO | None = None) -> NoReturn:
    """Run a command, print its output as it arrives, exit with its exit code."""

    def writer(stream: Any) -> Callable[[str], None]:
        def write(text: str) -> None:
            stream.write(text)
            stream.flush()

        return write

    result = vm.run(command, timeout=timeout, on_stdout=writer(sys.stdout), on_stderr=writer(sys.stderr), stdin=stdin)
    sys.exit(result.exit_code)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def lookup(name: str) -> SmolVM:
    return SmolVM.from_id(check_id(name))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="smolvm")
def cli() -> None:
    """SmolVM: disposable Linux microVMs for running untrusted code.

    \b
    Quick start:
      smolvm setup                      # once: packages and the guest image
      smolvm run -- uname -a            # one command in a fresh sandbox
      smolvm sandbox create --name dev  # a sandbox that stays
      smolvm sandbox exec dev -- python3 -V
    """


# -- one-shot ---------------------------------------------------------------
@cli.command(context_settings={"ignore_unknown_options": True})
@memory_option
@vcpus_option
@cpu_limit_option
@image_option
@timeout_option
@mount_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(
    memory: int | None,
    vcpus: int | None,
    cpu_limit: float | None,
    image: str | None,
    timeout: float,
    mount_specs: tuple[str, ...],
    command: tuple[str, ...],
) -> None:
    """Run COMMAND in a fresh sandbox, print its output, delete the sandbox.

    Exits with the command's exit code. Put the command after '--':
    smolvm run -- python3 -c 'print(6*7)'
    """
    mounts = [Mount.parse(spec) for spec in mount_specs]
    line = _shell_join(command) if command else _default_command(image)
    # Deleted on the way out, exit included.
    with SmolVM(memory=memory, vcpus=vcpus, cpu_limit=cpu_limit, image=image, mounts=mounts) as vm:
        run_streaming(vm, line, timeout)


def _default_command(image: str | None) -> str:
    """An image's ENTRYPOINT and CMD as one command line, for 'run' without a command."""
    config = ImageStore().load(image).manifest.get("config") or {} if image not in (None, "default") else {}
    argv = [*(config.get("entrypoint") or []), *(config.get("cmd") or [])]
    if not argv or not all(isinstance(a, str) for a in argv):
        raise click.UsageError("give the command to run after '--' (this image has no CMD): smolvm run -- CMD")
    return shlex.join(argv)


def _shell_join(command: tuple[str, ...]) -> str:
    """One word is a shell command line as typed; several are quoted as argv."""
    import shlex

    return command[0] if len(command) == 1 else shlex.join(command)


# -- sandboxes --------------------------------------------------------------
@cli.group()
def sandbox() -> None:
    """Create, use and remove sandboxes that persist between commands."""


@sandbox.command("create")
@click.option("--name", default=None, help="The sandbox's id (default: generated).")
@memory_option
@vcpus_option
@cpu_limit_option
@image_option
@click.option("--disk-size", type=int, default=None, help="Disk size in MiB (default: the image's, 4096).")
@click.option("--no-start", is_flag=True, help="Create it stopped.")
@click.option("--allow-domain", "domains", multiple=True, help="Reach only this domain ('*.x.org' too); repeatable.")
@click.option("--no-internet", is_flag=True, help="No network egress at all.")
@click.option("--no-host-cas", is_flag=True, help="Do not trust the host's own certificate authorities in the guest.")
@click.option(
    "--allow-host-port",
    "host_ports",
    type=int,
    multiple=True,
    help="Reach this port of the host's 127.0.0.1 as host.smolvm.internal:PORT; repeatable.",
)
@mount_option
@click.option("--timeout", type=float, default=None, help="Delete it this many seconds after it starts.")
@click.option("--idle-timeout", type=float, default=None, help="Delete it after this many seconds unused.")
@json_option
def sandbox_create(
    name: str | None,
    memory: int | None,
    vcpus: int | None,
    cpu_limit: float | None,
    image: str | None,
    disk_size: int | None,
    no_start: bool,
    domains: tuple[str, ...],
    no_internet: bool,
    host_ports: tuple[int, ...],
    mount_specs: tuple[str, ...],
    as_json: bool,
    no_host_cas: bool = False,
    timeout: float | None = None,
    idle_timeout: float | None = None,
) -> None:
    """Create a sandbox and boot it.

    By default it reaches public addresses over HTTP(S), never this host, private
    networks or the metadata address.
    """
    if no_internet and domains:
        raise ValidationError("--no-internet and --allow-domain contradict each other: give one")
    internet = {
        "allowed_domains": [] if no_internet else (list(domains) or None), "allow_host_ports": list(host_ports),
        "trust_host_cas": not no_host_cas,
    }  # fmt: skip
    mounts = [Mount.parse(spec) for spec in mount_specs]
    vm = SmolVM(
        vm_id=name, memory=memory, vcpus=vcpus, cpu_limit=cpu_limit, disk_size=disk_size, image=image,
        internet_settings=internet, mounts=mounts, timeout=timeout, idle_timeout=idle_timeout,
    )  # fmt: skip
    if not no_start:
        try:
            vm.start()
        except BaseException:
            vm.delete()
            raise
    if as_json:
        print_json(vm.info())
    else:
        out.print(f"created sandbox [bold]{vm.vm_id}[/] ({vm.status.value})")


@sandbox.command("timeout")
@click.argument("name")
@click.argument("seconds", type=float, required=False)
def sandbox_timeout(name: str, seconds: float | None) -> None:
    """Delete sandbox NAME SECONDS from now (no SECONDS: never)."""
    vm = SmolVM.from_id(name)
    vm.set_timeout(seconds)
    when = vm.expires_at()
    out.print(f"{name} is deleted " + ("never" if when is None else f"in {max(0, when - time.time()):.0f} s"))


@sandbox.command("list")
@json_option
def sandbox_list(as_json: bool) -> None:
    """List sandboxes."""
    records = SmolVM.list()
    if as_json:
        print_json([r.as_dict() for r in records])
        return
    if not records:
        out.print("no sandboxes ('smolvm sandbox create' makes one)")
        return
    table = Table("ID", "STATE", "MEMORY", "VCPUS", "ACCEL", "PID")
    colors = {VMState.RUNNING: "green", VMState.ERROR: "red", VMState.PAUSED: "yellow"}
    for r in records:
        color = colors.get(r.state, "white")
        table.add_row(
            r.id, f"[{color}]{r.state.value}[/]", f"{r.config.memory} MiB", str(r.config.vcpus), r.accel or "-",
            str(r.pid or "-"),
        )  # fmt: skip
    out.print(table)


@sandbox.command("info")
@click.argument("name")
@json_option
def sandbox_info(name: str, as_json: bool) -> None:
    """Show one sandbox."""
    info = lookup(name).info()
    if as_json:
        print_json(info)
        return
    table = Table(show_header=False, box=None)
    info["mounts"] = "; ".join(Mount.model_construct(**m).describe() for m in info["mounts"]) or None
    for key, value in info.items():
        table.add_row(f"[bold]{shown(key)}[/]", "-" if value is None else shown(value))
    out.print(table)


@sandbox.command("exec", context_settings={"ignore_unknown_options": True})
@timeout_option
@click.option("-i", "--interactive", is_flag=True, help="Pass standard input to the command.")
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def sandbox_exec(name: str, timeout: float, interactive: bool, command: tuple[str, ...]) -> None:
    """Run COMMAND in sandbox NAME, printing its output as it comes; exits with its exit code.

    smolvm sandbox exec NAME -- ls -la /

    cat data.csv | smolvm sandbox exec -i NAME -- python3 process.py
    """
    run_streaming(lookup(name), _shell_join(command), timeout, sys.stdin.buffer if interactive else None)


@sandbox.command("shell")
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def sandbox_shell(name: str, command: tuple[str, ...]) -> None:
    """Open an interactive login shell (or run COMMAND on a terminal) in sandbox NAME.

    Exits with the shell's exit status.
    """
    vm = lookup(name)
    sys.exit(vm.shell(_shell_join(command) if command else None))


@sandbox.command("ssh", context_settings={"ignore_unknown_options": True})
@click.option("--print", "print_", is_flag=True, help="Print the ssh command line instead of running it.")
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def sandbox_ssh(name: str, print_: bool, command: tuple[str, ...]) -> None:
    """Open an SSH session to sandbox NAME (or run COMMAND over SSH).

    The host made the sandbox's host key and pins it: any other key is refused.
    Starts sshd in the sandbox on first use, reachable on 127.0.0.1 only.
    """
    lines = lookup(name).ssh_commands()
    if print_:
        click.echo(lines["ssh"])
        return
    argv = shlex.split(lines["ssh"]) + ([_shell_join(command)] if command else [])
    try:
        os.execvp(argv[0], argv)
    except FileNotFoundError:
        fail("ssh is not installed on this host: install openssh-client (or run 'smolvm setup' as root)")


def change_state(name: str, action: Callable[[SmolVM], object]) -> None:
    """Look the sandbox up, act on it, and say the state it is in now."""
    vm = lookup(name)
    action(vm)
    out.print(f"sandbox [bold]{vm.vm_id}[/] is {vm.status.value}")


@sandbox.command("start")
@click.argument("name")
def sandbox_start(name: str) -> None:
    """Boot a stopped sandbox."""
    change_state(name, SmolVM.start)


@sandbox.command("stop")
@click.argument("name")
def sandbox_stop(name: str) -> None:
    """Stop a sandbox, keeping its disk."""
    change_state(name, SmolVM.stop)


@sandbox.command("pause")
@click.argument("name")
def sandbox_pause(name: str) -> None:
    """Freeze a running sandbox where it is (its memory is kept); 'resume' goes on."""
    change_state(name, SmolVM.pause)


@sandbox.command("resume")
@click.argument("name")
def sandbox_resume(name: str) -> None:
    """Let a paused sandbox run on from where it was."""
    change_state(name, SmolVM.resume)


@sandbox.command("fork")
@click.argument("name")
@click.option("--count", type=int, default=1, show_default=True, help="How many copies to make.")
@json_option
def sandbox_fork(name: str, count: int, as_json: bool) -> None:
    """Copy a running sandbox into new running ones (files, memory, processes); it runs on."""
    children = lookup(name).fork(count)
    if as_json:
        print_json([child.info() for child in children])
        return
    for child in children:
        out.print(f"created sandbox [bold]{child.vm_id}[/] (a copy of {shown(name)})")


@sandbox.command("delete")
@click.argument("names", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Delete every sandbox.")
def sandbox_delete(names: tuple[str, ...], all_: bool) -> None:
    """Delete sandboxes and everything in them."""
    if all_ == bool(names):
        raise ValidationError("name the sandboxes to delete, or pass --all (not both)")
    ids = [r.id for r in SmolVM.list()] if all_ else [check_id(n) for n in names]
    vms = [SmolVM.from_id(i) for i in ids]  # every name checked before anything is deleted
    for vm in vms:
        vm.delete()
        out.print(f"deleted [bold]{vm.vm_id}[/]")


@sandbox.command("logs")
@click.argument("name")
def sandbox_logs(name: str) -> None:
    """Print the guest console's output."""
    sys.stdout.write(visible(lookup(name).logs().replace("\r\n", "\n"), keep="\n\t"))


@sandbox.group("file")
def sandbox_file() -> None:
    """Files of a sandbox: copy in and out, list, print, remove, make directories."""


@sandbox_file.command("upload")
@click.argument("name")
@click.argument("local", type=click.Path(path_type=Path))
@click.argument("guest_path")
def file_upload(name: str, local: Path, guest_path: str) -> None:
    """Copy LOCAL on this host (a file, or a directory with all it holds) to GUEST_PATH in the sandbox."""
    vm = lookup(name)
    if local.is_dir():
        report = vm.upload_dir(local, guest_path)
        _skipped(report.skipped)
        out.print(f"uploaded {report.files} files from {shown(local)} to {shown(name)}:{shown(guest_path)}")
        return
    vm.upload_file(local, guest_path)
    out.print(f"uploaded {shown(local)} to {shown(name)}:{shown(guest_path)}")


@sandbox_file.command("download")
@click.argument("name")
@click.argument("guest_path")
@click.argument("local", type=click.Path(path_type=Path))
def file_download(name: str, guest_path: str, local: Path) -> None:
    """Copy GUEST_PATH in the sandbox (a file, or a directory with all it holds) to LOCAL
    on this host. A directory goes to a new or empty LOCAL, never merged into one."""
    vm = lookup(name)
    if vm.files.get_info(guest_path).type is FileType.DIR:
        report = vm.download_dir(guest_path, local)
        _skipped(report.skipped)
        out.print(f"downloaded {report.files} files from {shown(name)}:{shown(guest_path)} to {shown(local)}")
        return
    vm.download_file(guest_path, local)
    out.print(f"downloaded {shown(name)}:{shown(guest_path)} to {shown(local)}")


def _skipped(skipped: list[tuple[str, str]]) -> None:
    for path, why in skipped:
        err.print(f"[yellow]skipped[/] {shown(path)}: {shown(why)}", highlight=False)


@sandbox_file.command("ls")
@click.option("--depth", type=click.IntRange(1, 64), default=1, show_default=True, help="Levels to go down.")
@json_option
@click.argument("name")
@click.argument("guest_path")
def file_ls(name: str, guest_path: str, depth: int, as_json: bool) -> None:
    """List the directory GUEST_PATH in the sandbox (symlinks are shown, not followed)."""
    entries = lookup(name).files.list(guest_path, depth=depth)
    if as_json:
        print_json([{**dataclasses.asdict(e), "type": e.type.value} for e in entries])
        return
    for e in entries:  # one line each, never cut: a path is what one copies from here
        path = visible(e.path) + (f" -> {visible(e.symlink_target)}" if e.symlink_target is not None else "")
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.mtime))
        click.echo(f"{e.type.value:<7} {e.mode:04o} {e.size:>12} {when}  {path}")


@sandbox_file.command("cat")
@click.argument("name")
@click.argument("guest_path")
def file_cat(name: str, guest_path: str) -> None:
    """Print the file GUEST_PATH of the sandbox: its bytes as they are when piped, and
    with control characters made visible on a terminal."""
    chunks = lookup(name).files.read(guest_path, format="stream")
    if sys.stdout.isatty():
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        for chunk in chunks:
            sys.stdout.write(visible(decoder.decode(chunk), keep="\n\t"))
        sys.stdout.write(visible(decoder.decode(b"", final=True), keep="\n\t"))
        sys.stdout.flush()
        return
    for chunk in chunks:
        sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()


@sandbox_file.command("rm")
@click.argument("name")
@click.argument("guest_path")
def file_rm(name: str, guest_path: str) -> None:
    """Remove GUEST_PATH in the sandbox: a file, a symlink, or a directory with all it holds."""
    lookup(name).files.remove(guest_path)
    out.print(f"removed {shown(name)}:{shown(guest_path)}")


@sandbox_file.command("mkdir")
@click.argument("name")
@click.argument("guest_path")
def file_mkdir(name: str, guest_path: str) -> None:
    """Make the directory GUEST_PATH in the sandbox, with its parents."""
    created = lookup(name).files.make_dir(guest_path)
    out.print(f"{'made' if created else 'already there:'} {shown(name)}:{shown(guest_path)}")


@sandbox.group("port")
def sandbox_port() -> None:
    """Expose a sandbox's ports on this host's 127.0.0.1."""


def _port_spec(spec: str) -> tuple[int | None, int]:
    """[HOST:]GUEST as (host port or None, guest port)."""
    host, _, guest = spec.rpartition(":")
    try:
        return (int(host) if host else None), int(guest)
    except ValueError:
        raise ValidationError(f"{spec!r} is not [HOST:]GUEST, such as 8000 or 18000:8000") from None


@sandbox_port.command("expose")
@click.argument("name")
@click.argument("spec", metavar="[HOST:]GUEST")
def port_expose(name: str, spec: str) -> None:
    """Forward 127.0.0.1:HOST (a free port if not given) to port GUEST in sandbox NAME."""
    host, guest = _port_spec(spec)
    port = lookup(name).expose_local(guest, host)
    out.print(f"127.0.0.1:{port} -> {name}:{guest}")


@sandbox_port.command("list")
@click.argument("name")
@json_option
def port_list(name: str, as_json: bool) -> None:
    """The ports exposed for sandbox NAME."""
    exposed = lookup(name).list_exposed()
    if as_json:
        print_json([{"host_port": p.host_port, "guest_port": p.guest_port} for p in exposed])
        return
    for p in exposed:
        out.print(f"127.0.0.1:{p.host_port} -> {name}:{p.guest_port}")


@sandbox_port.command("close")
@click.argument("name")
@click.argument("host_port", type=int)
def port_close(name: str, host_port: int) -> None:
    """Stop forwarding 127.0.0.1:HOST_PORT into sandbox NAME."""
    lookup(name).unexpose_local(host_port)
    out.print(f"closed 127.0.0.1:{host_port}")


@sandbox.group("env")
def sandbox_env() -> None:
    """Environment variables every command in a sandbox sees."""


@sandbox_env.command("set")
@click.argument("name")
@click.argument("assignments", nargs=-1, required=True)
def env_set(name: str, assignments: tuple[str, ...]) -> None:
    """Set KEY=VALUE pairs."""
    values = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValidationError(f"{item!r} is not KEY=VALUE")
        values[key] = value
    lookup(name).set_env_vars(values)
    out.print(f"set {', '.join(values)}")


@sandbox_env.command("unset")
@click.argument("name")
@click.argument("keys", nargs=-1, required=True)
def env_unset(name: str, keys: tuple[str, ...]) -> None:
    """Remove variables."""
    removed = lookup(name).unset_env_vars(keys)
    out.print(f"removed {shown(', '.join(removed)) or 'nothing'}")


@sandbox_env.command("list")
@click.argument("name")
@json_option
def env_list(name: str, as_json: bool) -> None:
    """Show the variables."""
    values = lookup(name).list_env_vars()
    if as_json:
        print_json(values)
    else:
        for key, value in sorted(values.items()):
            click.echo(f"{visible(key)}={visible(value)}")


# -- host -------------------------------------------------------------------
@cli.command()
@click.option("--force", is_flag=True, help="Rebuild the image even if it is up to date.")
def setup(force: bool) -> None:
    """Install the system packages and build the default guest image."""
    from .host import install_packages, missing_packages, newer_qemu

    missing = missing_packages()
    if missing:
        out.print(f"installing system packages: {' '.join(missing)}")
        install_packages(missing)
    said = newer_qemu()
    if said:
        out.print(said)
    image = _build_default_image(force)
    _make_default_template(image)
    _give_back_to_sudo_user()
    out.print(f"ready: image {image.name} ({image.recipe}), kernel {image.manifest.get('kernel_version')}")


def _give_back_to_sudo_user() -> None:
    """Under sudo, the data directory belongs to the user who ran it, not to root."""
    import os

    uid, gid = os.environ.get("SUDO_UID"), os.environ.get("SUDO_GID")
    if os.geteuid() != 0 or not uid or not gid or not uid.isdigit() or not gid.isdigit() or uid == "0":
        return
    root = paths.data_dir()
    for directory, dirnames, filenames in os.walk(root):
        if directory == str(root / "images" / "cache"):
            dirnames.clear()  # the package tree keeps root's ownership: it is the guest's filesystem
        for name in [directory, *(os.path.join(directory, f) for f in filenames)]:
            os.lchown(name, int(uid), int(gid))


@cli.command()
@json_option
def doctor(as_json: bool) -> None:
    """Check that this host can run sandboxes, and say how to fix what can't."""
    checks = doctor_mod.run_checks()
    if as_json:
        print_json(doctor_mod.as_json(checks))
    else:
        marks = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}
        for c in checks:
            out.print(f"{marks[c.status]:>16}  [bold]{c.name}[/]: {c.detail}", highlight=False)
            if c.fix:
                out.print(f"{'':>6}fix: {c.fix}", highlight=False)
    if any(c.status == "fail" for c in checks):
        sys.exit(1)


def _build_default_image(force: bool) -> ImageVersion:
    """Build (or check) the default image with a progress bar, then drop versions no sandbox uses."""
    from .images.build import build_image

    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=err) as progress:
        task = progress.add_task("checking the default image", total=1.0)
        img = build_image(
            force=force, progress=lambda msg, frac: progress.update(task, description=msg, completed=frac)
        )
    store = ImageStore()
    store.prune(img.name, _images_in_use())
    templates.prune({p.name for n in store.names() for p in (store.root / n).iterdir() if not p.is_symlink()})
    return img


def _images_in_use() -> list[Path]:
    """Image versions that sandboxes and snapshots were made from, or images built on."""
    return [Path(r.image_dir) for r in SmolVM.list()] + sorted(snapshots.image_dirs()) + ImageStore().bases()


def _make_default_template(image: ImageVersion) -> None:
    """Save a booted default-shaped sandbox, which new sandboxes then resume."""
    from .backends.accel import choose_accel
    from .backends.qemu import QemuBackend
    from .types import VMConfig

    shape = VMConfig()
    accel = choose_accel(image.kernel, image.initrd).accel
    with err.status("saving a booted sandbox for fast starts"):
        templates.create(image, shape.memory, shape.vcpus, accel, QemuBackend())


@cli.group()
def image() -> None:
    """Build, list and remove guest images."""


@image.command("build")
@click.argument("name", required=False)
@click.option("-f", "--file", "dockerfile", type=click.Path(dir_okay=False), help="Build NAME from this Dockerfile.")
@click.option("--build-arg", "build_args", multiple=True, metavar="KEY=VALUE", help="A Dockerfile ARG (repeatable).")
@click.option("--no-cache", is_flag=True, help="Run every step again, cached or not.")
@click.option("--allow-domain", "domains", multiple=True, help="The builder reaches only this domain; repeatable.")
@click.option("--no-host-cas", is_flag=True, help="The builder does not trust the host's own certificate authorities.")
@click.option("--from", "sandbox_id", default=None, metavar="SANDBOX", help="Make NAME of this sandbox's disk.")
@click.option("--force", is_flag=True, help="The default image: rebuild from scratch, packages included.")
def image_build(
    name: str | None, dockerfile: str | None, build_args: tuple[str, ...], no_cache: bool, domains: tuple[str, ...],
    sandbox_id: str | None, force: bool, no_host_cas: bool = False,
) -> None:  # fmt: skip
    """Build an image from a Dockerfile (-f), of a sandbox (--from), or the default image (no NAME)."""
    if sandbox_id is not None:
        if name is None or dockerfile is not None:
            raise click.UsageError(
                "name the image, and give -f or --from, not both: smolvm image build NAME --from SANDBOX"
            )
        from .images.builder import from_sandbox

        made = from_sandbox(sandbox_id, name, report=lambda line: err.print(line, markup=False, highlight=False))
        out.print(f"image {made.name}: the disk of sandbox {sandbox_id}", markup=False)
        return
    if dockerfile is None:
        if name not in (None, "default"):
            raise click.UsageError(f"say what image {name} is: smolvm image build {name} -f Dockerfile")
        img = _build_default_image(force)
        out.print(f"image {img.name}: {img.dir}")
        return
    if name is None:
        raise click.UsageError("name the image: smolvm image build NAME -f Dockerfile")
    args = {}
    for pair in build_args:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--build-arg takes KEY=VALUE, not {pair!r}")
        args[key] = value
    from .images.builder import Image as Recipe

    recipe = Recipe.from_dockerfile(dockerfile, build_args=args)
    info = recipe.build(
        name, no_cache=no_cache, progress=lambda line: err.print(line, markup=False, highlight=False),
        internet_settings={"allowed_domains": list(domains) or None, "trust_host_cas": not no_host_cas},
    )  # fmt: skip
    out.print(f"image {info.name}: {len(info.steps)} steps, {info.cached_steps} cached, {info.built_steps} built")


@image.command("inspect")
@click.argument("name")
@json_option
def image_inspect(name: str, as_json: bool) -> None:
    """Show an image: its base, steps, config and size."""
    from .images.builder import info

    summary = {**ImageStore().load(name).summary(), **info(ImageStore().load(name)).model_dump(mode="json")}
    if as_json:
        print_json(summary)
        return
    for key in ("name", "base", "release", "kernel", "size", "path"):
        out.print(f"{key}: {summary.get(key)}", markup=False, highlight=False)
    for key, value in summary["config"].items():
        if value:
            out.print(f"{key}: {value}", markup=False, highlight=False)
    for number, step in enumerate(summary["steps"], 1):
        out.print(f"step {number}: {step}", markup=False, highlight=False)


@image.command("save")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=True))
def image_save(name: str, file: str) -> None:
    """Write an image, whole, to FILE (a tar), to load on another machine."""
    from .images import archive

    with err.status(f"saving image {name}"):
        dest = archive.save(name, Path(file))
    out.print(f"saved image {name} to {dest} ({dest.stat().st_size / 2**20:.0f} MiB)", markup=False)


@image.command("load")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--name", default=None, help="File it under this name (default: the one it was saved with).")
def image_load(file: str, name: str | None) -> None:
    """Load an image saved with 'smolvm image save', checking every file's sum."""
    from .images import archive

    with err.status(f"loading {file}"):
        img = archive.load(Path(file), name)
    out.print(f"loaded image {img.name}", markup=False)


@image.command("prune")
def image_prune() -> None:
    """Remove image versions and build-cache layers that nothing uses."""
    from .images import layers
    from .images.builder import layers_in_use

    store = ImageStore()
    removed = [p for n in store.names() for p in store.prune(n, _images_in_use())]
    versions = [v for n in store.names() for v in (store.root / n).iterdir() if not v.is_symlink() and v.is_dir()]
    gone = layers.prune(layers_in_use(store, versions))
    templates.prune({v.name for v in versions})
    out.print(f"removed {len(removed)} image versions and {len(gone)} cached layers")


@image.command("list")
@json_option
def image_list(as_json: bool) -> None:
    """List built images."""
    store = ImageStore()
    summaries = [store.load(n).summary() for n in store.names()]
    if as_json:
        print_json(summaries)
        return
    if not summaries:
        out.print("no images ('smolvm setup' builds the default one)")
        return
    table = Table("NAME", "RECIPE", "RELEASE", "KERNEL", "SIZE")
    for s in summaries:
        table.add_row(s["name"], s["recipe"], s["release"], s["kernel"], f"{s['bytes_on_disk'] / 2**20:.0f} MiB")
    out.print(table)


@image.command("rm")
@click.argument("name")
def image_rm(name: str) -> None:
    """Remove an image no sandbox uses."""
    ImageStore().remove(name, _images_in_use())
    out.print(f"removed image {name}")


@cli.group()
def snapshot() -> None:
    """Save sandboxes as they run, and make new ones from them."""


def _print_snapshot(info: SnapshotInfo, as_json: bool) -> None:
    if as_json:
        print_json(snapshots.describe(info))
    else:
        label = f" ({shown(info.name)})" if info.name else ""
        out.print(f"snapshot [bold]{info.snapshot_id}[/]{label} of {info.vm_id}: {info.type.value}, {_mib(info.size)}")


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


@snapshot.command("create")
@click.argument("name")
@click.option(
    "--type", "kind", type=click.Choice(["full", "disk"]), default="full", show_default=True,
    help="full: memory, processes and disk, restored running; disk: the disk only, restored by booting it.",
)  # fmt: skip
@click.option("--name", "label", default=None, help="A label to know it by.")
@json_option
def snapshot_create(name: str, kind: str, label: str | None, as_json: bool) -> None:
    """Snapshot sandbox NAME; it runs on."""
    _print_snapshot(lookup(name).snapshot(SnapshotType(kind), name=label), as_json)


@snapshot.command("list")
@json_option
def snapshot_list(as_json: bool) -> None:
    """List snapshots."""
    infos = SmolVM.list_snapshots()
    if as_json:
        print_json([snapshots.describe(info) for info in infos])
        return
    if not infos:
        out.print("no snapshots ('smolvm snapshot create NAME' takes one)")
        return
    table = Table("ID", "NAME", "SANDBOX", "TYPE", "SIZE", "CREATED")
    for info in infos:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.created_at))
        table.add_row(info.snapshot_id, shown(info.name or "-"), info.vm_id, info.type.value, _mib(info.size), created)
    out.print(table)


@snapshot.command("restore")
@click.argument("snapshot_id")
@click.option("--name", default=None, help="The new sandbox's id (default: generated).")
@json_option
def snapshot_restore(snapshot_id: str, name: str | None, as_json: bool) -> None:
    """Make a new running sandbox from a snapshot."""
    vm = SmolVM.from_snapshot(snapshot_id, vm_id=name)
    if as_json:
        print_json(vm.info())
    else:
        out.print(f"created sandbox [bold]{vm.vm_id}[/] from {shown(snapshot_id)} ({vm.status.value})")


@snapshot.command("delete")
@click.argument("snapshot_ids", nargs=-1, required=True)
def snapshot_delete(snapshot_ids: tuple[str, ...]) -> None:
    """Delete snapshots (a disk that restored sandboxes still use is kept until they go)."""
    for snapshot_id in snapshot_ids:  # every id checked before anything is deleted
        snapshots.StateStore().get_snapshot(snapshot_id)
    for snapshot_id in snapshot_ids:
        users = SmolVM.delete_snapshot(snapshot_id)
        kept = f"; its disk is kept for {', '.join(users)} until they are deleted" if users else ""
        out.print(f"deleted snapshot [bold]{shown(snapshot_id)}[/]{kept}")


@cli.command()
@click.option(
    "--http",
    "http_address",
    default=None,
    metavar="127.0.0.1:PORT",
    help="Serve streamable HTTP on this loopback address instead of stdio.",
)
@click.option(
    "--allow-path",
    "allowed",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, resolve_path=True, path_type=Path),
    help="A host folder the agent may copy files from and to; repeatable (default: none).",
)
@click.option("--all-sandboxes", is_flag=True, help="Let the agent use every sandbox and snapshot, not only its own.")
@click.option(
    "--max-output",
    type=click.IntRange(1000, 10**7),
    default=20_000,
    show_default=True,
    help="Characters of a command's output (each stream) or a file read handed to the agent.",
)
@click.option("--print-token", is_flag=True, help="Print the token HTTP clients send as a bearer token, and exit.")
def mcp(
    http_address: str | None, allowed: tuple[Path, ...], all_sandboxes: bool, max_output: int, print_token: bool
) -> None:
    """Serve sandboxes to an AI agent over the Model Context Protocol (stdio by default).

    Sandboxes the agent makes are deleted when its session ends, unless it asks to keep them.
    """
    from .servers.token import server_token

    if print_token:
        click.echo(server_token())
        return
    http = None if http_address is None else _loopback_address(http_address)
    try:
        from .servers import mcp_server
    except ImportError as exc:
        fail(str(exc))
    reach = mcp_server.Reach(roots=allowed, everything=all_sandboxes)
    if http is not None:
        server_token()  # made (or refused) before the server listens
        err.print(
            f"MCP on http://{http[0]}:{http[1]}/mcp; clients send 'Authorization: Bearer TOKEN' "
            "('smolvm mcp --print-token' prints it)"
        )
    mcp_server.serve(reach, http, max_output)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--print-token", is_flag=True, help="Print the token clients send as a bearer token, and exit.")
def serve(host: str, port: int, print_token: bool) -> None:
    """Serve the HTTP API (OpenAPI at /openapi.json, docs at /docs).

    Every request needs 'Authorization: Bearer TOKEN'. Sandboxes belong to the data
    directory, not to the server: stopping it deletes none.
    """
    from .servers.token import server_token

    token = server_token()  # made (or refused) before the server listens
    if print_token:
        click.echo(token)
        return
    try:
        from .servers import http_api
    except ImportError as exc:
        fail(f"the HTTP API needs FastAPI and uvicorn: pip install 'smolvm[serve]' ({exc})")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            fail(f"cannot listen on {host}:{port} ({exc.strerror}): pick another --port or --host")
    if not http_api.is_loopback(host):
        err.print(
            f"[yellow]warning:[/] {host} may be reachable from other machines, over plain HTTP: "
            "anyone who sees the token can run code in your sandboxes; prefer 127.0.0.1 and an SSH tunnel"
        )
    err.print(f"SmolVM API on http://{host}:{port} (docs at /docs; 'smolvm serve --print-token' prints the token)")
    with contextlib.suppress(KeyboardInterrupt):
        http_api.serve(host, port, token)


def _loopback_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValidationError(f"--http takes HOST:PORT, such as 127.0.0.1:8765, not {text!r}")
    host = host.strip("[]") or "127.0.0.1"
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValidationError(
            f"--http listens on loopback only (127.0.0.1, ::1), not {host}: "
            "reach it from elsewhere through an SSH tunnel"
        )
    return host, int(port)


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        fail("aborted", 130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except SmolVMError as exc:
        fail(str(exc))
    except sqlite3.Error as exc:
        fail(f"the state database failed ({exc}): check that {paths.data_dir()} is writable by you")
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        fail(f"{exc.strerror or exc}{where}")
    except KeyboardInterrupt:
        fail("interrupted", 130)


if __name__ == "__main__":
    main()

"""The facade's rooms: vm.commands, vm.ports and vm.pty do what the old methods do."""

from __future__ import annotations

import socket

import pytest

from smolvm import CommandResult, SmolVM
from smolvm.exceptions import ValidationError
from smolvm.process import Process

vm_only = pytest.mark.vm


@vm_only
def test_commands_run_in_the_foreground_and_the_background(vm: SmolVM) -> None:
    result = vm.commands.run("echo $X", env={"X": "room"})
    assert isinstance(result, CommandResult) and result.stdout == "room\n"
    proc = vm.commands.run("sleep 300", background=True)
    assert isinstance(proc, Process) and proc.poll() is None
    assert proc.pid in [p.pid for p in vm.commands.list()]
    assert vm.commands.connect(proc.pid).cmd == "sleep 300"
    assert vm.commands.kill(proc.pid) is True
    assert proc.wait(timeout=30).exit_code != 0
    assert vm.run("echo old way").stdout == "old way\n"  # the old methods are thin calls of these
    assert vm.get_process(proc.pid).pid == proc.pid
    with pytest.raises(ValidationError):
        vm.commands.run("  ")


@vm_only
def test_ports_expose_list_and_close(vm: SmolVM) -> None:
    server = vm.commands.run("python3 -m http.server 8123 --bind 0.0.0.0", background=True)
    port = vm.ports.expose(8123)
    assert [(p.host_port, p.guest_port) for p in vm.ports.list()] == [(port, 8123)]
    assert vm.list_exposed() == vm.ports.list()
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                if sock.recv(12).startswith(b"HTTP/1.0 200"):
                    break
        except OSError:
            pass
        vm.run("sleep 0.2")
    else:
        pytest.fail("the exposed port never answered")
    vm.ports.close(port)
    assert vm.ports.list() == []
    server.kill()

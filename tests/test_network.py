"""Networking: the egress policy, host protection and port exposure, all on this machine.

Real servers only: one on the host's 127.0.0.1, and a test host in a network
namespace this module makes (a private address the guest knows by a name
given through ``extra_hosts``). No traffic leaves the machine.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SMOLVM_BIN, listening_addresses
from nethost import TLS_PORT, namespace_host, sh

from smolvm import InternetSettings, SmolVM, egress, netproxy
from smolvm import protocol as P
from smolvm.backends.base import LaunchSpec
from smolvm.backends.qemu import qemu_argv, qmp
from smolvm.exceptions import ValidationError
from smolvm.netproxy import Policy, Refused, address_allowed, check_domain

TEST_NAME = "testhost.smolvm.test"

# -- pure parts -----------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["http://x.org/y", "a b.org", "user:pw@x.org", "", "   ", "x", "1.2.3.4", "a.*.org", "x.org:443", "*"]
)
def test_malformed_domains_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        check_domain(bad)
    with pytest.raises(ValidationError, match="internet_settings"):
        SmolVM(internet_settings={"allowed_domains": [bad]})


def test_domains_are_normalised() -> None:
    settings = InternetSettings(allowed_domains=["Example.ORG.", "*.example.com", "example.org"])
    assert settings.allowed_domains == ["*.example.com", "example.org"]


@pytest.mark.parametrize("port", [0, 65536, -1, True])
def test_host_ports_out_of_range(port: int) -> None:
    with pytest.raises(ValueError):
        InternetSettings(allow_host_ports=[port])


def test_policy_matches_names() -> None:
    policy = Policy(["example.org", "*.example.com"])
    assert policy.match("example.org") == "exact"
    assert policy.match("a.b.example.com") == "wildcard"
    assert policy.match("example.com") is None  # the wildcard wants a subdomain
    assert policy.match("badexample.com") is None
    assert policy.match("example.org.evil.net") is None
    assert Policy(None).match("anything.net") == "any"
    assert Policy([]).match("example.org") is None


@pytest.mark.parametrize(
    "address, private_ok, allowed",
    [
        ("93.184.215.14", False, True),
        ("127.0.0.1", True, False),
        ("169.254.169.254", True, False),  # the metadata address, never
        ("10.1.2.3", False, False),
        ("10.1.2.3", True, True),
        ("192.168.1.1", False, False),
        ("100.64.0.1", False, False),
        ("::1", True, False),
        ("::ffff:127.0.0.1", True, False),
        ("0.0.0.0", True, False),
        ("224.0.0.1", True, False),
    ],
)
def test_address_rules(address: str, private_ok: bool, allowed: bool) -> None:
    assert address_allowed(ipaddress.ip_address(address), private_ok) is allowed


def test_this_hosts_own_addresses_and_cloud_host_endpoints_are_refused() -> None:
    from smolvm.netproxy import is_this_host

    assert is_this_host(ipaddress.ip_address("127.0.0.1"))
    assert not is_this_host(ipaddress.ip_address("192.0.2.77"))  # TEST-NET: nobody's
    assert not address_allowed(ipaddress.ip_address("168.63.129.16"), private_ok=True)
    for name in os.listdir("/sys/class/net"):  # any global address of this host, were it public
        for line in subprocess.run(
            ["ip", "-o", "addr", "show", name], capture_output=True, text=True
        ).stdout.splitlines():
            address = ipaddress.ip_interface(line.split()[3]).ip
            assert not address_allowed(address, private_ok=True), address


def test_ports_beyond_the_web_only_for_exact_names() -> None:
    hosts = {"exact.test.org": "10.9.9.9", "a.wild.org": "93.184.215.14"}
    assert Policy(["exact.test.org"], hosts).addresses("exact.test.org", 8080) == ["10.9.9.9"]
    with pytest.raises(Refused, match="only 80 and 443"):
        Policy(["*.wild.org"], hosts).addresses("a.wild.org", 25)
    with pytest.raises(Refused, match="only 80 and 443"):
        Policy(None).addresses("93.184.215.14", 22)
    assert Policy(None).addresses("93.184.215.14", 443) == ["93.184.215.14"]


def test_an_exact_entry_wins_over_a_wildcard() -> None:
    policy = Policy(["*.example.org", "a.example.org"], {"a.example.org": "10.1.2.3"})
    assert policy.match("a.example.org") == "exact"
    assert policy.addresses("a.example.org", 80) == ["10.1.2.3"]


def test_addresses_by_policy() -> None:
    hosts = {"exact.test.org": "10.9.9.9", "sub.wild.org": "10.9.9.8"}
    assert Policy(["exact.test.org"], hosts).addresses("exact.test.org", 80) == ["10.9.9.9"]
    with pytest.raises(Refused, match="may not reach"):
        Policy(["*.wild.org"], hosts).addresses("sub.wild.org", 80)  # a wildcard never reaches private ranges
    with pytest.raises(Refused, match="may not reach"):
        Policy(None, hosts).addresses("exact.test.org", 80)  # nor does the default policy
    with pytest.raises(Refused, match="only the names"):
        Policy(["exact.test.org"], hosts).addresses("10.9.9.9", 80)
    with pytest.raises(Refused, match="not among"):
        Policy(["exact.test.org"], hosts).addresses("other.test.org", 80)


def test_argv_has_no_forward_and_no_command(tmp_path: Path) -> None:
    """QEMU starts nothing for the guest's connections (no guestfwd command), and no rule
    lets the guest out: the proxy joins at run time, and only for a sandbox with egress."""
    spec = LaunchSpec(
        vm_id="n", kernel=tmp_path / "k", initrd=tmp_path / "i", memory=512, vcpus=1, accel="tcg",
        home=tmp_path, runtime=tmp_path,
    )  # fmt: skip
    argv = qemu_argv(spec)
    assert argv[argv.index("-netdev") + 1] == "user,id=net0,restrict=on,ipv6=off"
    assert not any("guestfwd" in a or "hostfwd" in a or "netproxy" in a for a in argv)


def test_which_sandboxes_have_egress() -> None:
    assert egress.needed(InternetSettings())
    assert egress.needed(InternetSettings(allowed_domains=["example.org"]))
    assert egress.needed(InternetSettings(allowed_domains=[], allow_host_ports=[8000]))
    assert not egress.needed(InternetSettings(allowed_domains=[]))


# -- real servers -----------------------------------------------------------------


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def host_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """An HTTP server on the host's 127.0.0.1, serving 'host-secret'."""
    root = tmp_path_factory.mktemp("host-www")
    (root / "secret").write_text("host-secret\n")

    def handler(*args: object) -> Quiet:
        return Quiet(*args, directory=str(root))  # type: ignore[arg-type]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # type: ignore[arg-type]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture(scope="module")
def test_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for TEST_NAME, and its key."""
    directory = tmp_path_factory.mktemp("testhost-tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={TEST_NAME}",
       "-addext", f"subjectAltName=DNS:{TEST_NAME}", "-keyout", str(key), "-out", str(cert))  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def test_host(tmp_path_factory: pytest.TempPathFactory, test_certificate: tuple[Path, Path]) -> Iterator[str]:
    """A host with a private address in a network namespace made here, serving 'from-the-test-host'
    and a git repository."""
    root = tmp_path_factory.mktemp("testhost-www")
    (root / "hello").write_text("from-the-test-host\n")
    # A git repository served over plain HTTP ("dumb" protocol): git in the guest clones it via the proxy.
    work = tmp_path_factory.mktemp("testhost-repo")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    sh(*git, "init", "-q", str(work))
    (work / "README").write_text("cloned-through-the-proxy\n")
    sh(*git, "-C", str(work), "add", "README")
    sh(*git, "-C", str(work), "commit", "-q", "-m", "one")
    sh(*git, "clone", "-q", "--bare", str(work), str(root / "repo.git"))
    sh("git", "-C", str(root / "repo.git"), "update-server-info")
    with namespace_host(root, "t", 213, tls=test_certificate) as address:
        yield address


def curl(vm: SmolVM, url: str, *options: str) -> tuple[int, str]:
    """curl in the guest: (exit code, body or error)."""
    quoted = " ".join(f"'{o}'" for o in options)
    result = vm.run(f"curl -sS -m 20 {quoted} '{url}'", timeout=60)
    return result.exit_code, (result.stdout + result.stderr).strip()


def netproxies() -> list[str]:
    """Running egress proxies."""
    out = subprocess.run(["pgrep", "-af", r"^\S*python\S* -I -S \S*netproxy\.py "], capture_output=True, text=True)
    return out.stdout.splitlines()


@pytest.fixture(scope="module")
def default_vm(test_host: str) -> Iterator[SmolVM]:
    """The default policy; the test host's name known, but its address is private."""
    vm = SmolVM(internet_settings={"extra_hosts": {TEST_NAME: test_host}})
    try:
        vm.start()
        yield vm
    finally:
        vm.delete()


@pytest.mark.vm
def test_default_policy_keeps_the_host_and_private_ranges_out(
    default_vm: SmolVM, host_server: int, test_host: str
) -> None:
    vm = default_vm
    # The host's loopback: not through the proxy, not at the gateway, not at the host's alias.
    code, text = curl(vm, f"http://127.0.0.1:{host_server}/secret", "--noproxy", "")
    assert text.startswith("smolvm:") and "host-secret" not in text
    code, text = curl(vm, "http://127.0.0.1/secret", "--noproxy", "")
    assert "may not reach" in text
    for url in (f"http://10.0.2.2:{host_server}/secret", f"http://{P.HOST_ALIAS}:{host_server}/secret"):
        code, text = curl(vm, url, "--noproxy", "*")
        assert code != 0 and "host-secret" not in text
    # A private address, by name or by number; the metadata address.
    for url in (f"http://{TEST_NAME}:8080/hello", f"http://{test_host}:8080/hello", "http://169.254.169.254/"):
        code, text = curl(vm, url)
        assert text.startswith("smolvm:") and "from-the-test-host" not in text, url
    for url in (f"http://{TEST_NAME}/hello", f"http://{test_host}/hello"):
        code, text = curl(vm, url)
        assert "may not reach" in text, url
    # Straight out, without the proxy: no route, no DNS.
    code, text = curl(vm, f"http://{test_host}:8080/hello", "--noproxy", "*")
    assert code != 0 and "from-the-test-host" not in text
    lookup = vm.run("python3 -c \"import socket; socket.getaddrinfo('example.org', 80)\"", timeout=60)
    assert lookup.exit_code != 0 and "gaierror" in lookup.stderr


@pytest.mark.vm
def test_an_allowed_host_port_and_only_that(host_server: int) -> None:
    with SmolVM(internet_settings=InternetSettings(allow_host_ports=[host_server])) as vm:
        assert curl(vm, f"http://{P.HOST_ALIAS}:{host_server}/secret") == (0, "host-secret")
        code, text = curl(vm, f"http://{P.HOST_ALIAS}:{host_server + 1}/secret")
        assert code != 0 and "host-secret" not in text
        code, text = curl(vm, f"http://127.0.0.1:{host_server}/secret", "--noproxy", "")
        assert text.startswith("smolvm:") and "host-secret" not in text  # allowed at its name, not via the proxy
        # The proxy goes with its machine: on stop, and for good on delete.
        proxy = egress.pid_of(vm._spec())
        assert proxy is not None
        vm.stop()
        assert egress.pid_of(vm._spec()) is None and not egress.owns(vm._spec(), proxy)
        vm.start()
        assert curl(vm, f"http://{P.HOST_ALIAS}:{host_server}/secret") == (0, "host-secret")  # a cold boot's proxy
        proxy = egress.pid_of(vm._spec())
    assert proxy is not None and not egress.owns(vm._spec(), proxy)


@pytest.mark.vm
def test_allowlist_reaches_only_its_names(test_host: str) -> None:
    settings = InternetSettings(
        allowed_domains=[TEST_NAME], extra_hosts={TEST_NAME: test_host, "other.smolvm.test": test_host}
    )
    with SmolVM(internet_settings=settings) as vm:
        assert curl(vm, f"http://{TEST_NAME}:8080/hello") == (0, "from-the-test-host")
        # A tunnel (CONNECT, the way HTTPS goes) carries only TLS asking for the tunnel's name:
        # plain HTTP inside one could name any host.
        code, text = curl(vm, f"http://{TEST_NAME}:8080/hello", "--proxytunnel")
        assert code != 0 and "from-the-test-host" not in text
        # Programs that honour the proxy variables, with nothing configured in the guest.
        fetch = f"import urllib.request; print(urllib.request.urlopen('http://{TEST_NAME}:8080/hello').read().decode())"
        assert vm.run(f'python3 -c "{fetch}"', timeout=60).stdout == "from-the-test-host\n\n"
        cloned = vm.run(
            f"git clone -q http://{TEST_NAME}:8080/repo.git /root/repo && cat /root/repo/README", timeout=120
        )
        assert cloned.stdout == "cloned-through-the-proxy\n", cloned.stderr
        code, text = curl(vm, "http://other.smolvm.test:8080/hello")  # same address, another name
        assert "not among the domains" in text and "from-the-test-host" not in text
        code, text = curl(vm, f"http://{test_host}:8080/hello")  # the address itself
        assert "only the names it allows" in text
        code, text = curl(vm, f"https://{test_host}:8080/hello")
        assert code != 0 and "from-the-test-host" not in text


@pytest.mark.vm
def test_https_reaches_only_the_name_its_tunnel_was_for(test_host: str, test_certificate: tuple[Path, Path]) -> None:
    """Real TLS through a tunnel: the allowed name works; a ClientHello asking the same
    address for another server (a CDN's other tenant) goes nowhere."""
    settings = InternetSettings(allowed_domains=[TEST_NAME], extra_hosts={TEST_NAME: test_host})
    with SmolVM(internet_settings=settings) as vm:
        vm.upload_file(test_certificate[0], "/root/ca.pem")
        url = f"https://{TEST_NAME}:{TLS_PORT}/hello"
        assert curl(vm, url, "--cacert", "/root/ca.pem") == (0, "from-the-test-host")
        fronted = (
            "import socket, ssl\n"
            "s = socket.create_connection(%r, timeout=20)\n"
            "s.sendall(b'CONNECT %s:%d HTTP/1.1\\r\\nHost: %s\\r\\n\\r\\n')\n"
            "assert s.recv(4096).startswith(b'HTTP/1.1 200')\n"
            "context = ssl.create_default_context(cafile='/root/ca.pem')\n"
            "context.check_hostname = False\n"
            "try:\n"
            "    t = context.wrap_socket(s, server_hostname='tenant.other.test')\n"
            "    t.sendall(b'GET /hello HTTP/1.1\\r\\nHost: %s\\r\\n\\r\\n')\n"
            "    print('got', t.recv(4096))\n"
            "except (OSError, ssl.SSLError) as exc:\n"
            "    print('closed', type(exc).__name__)\n"
        ) % (P.PROXY_ADDRESS, TEST_NAME, TLS_PORT, TEST_NAME, TEST_NAME)
        vm.run(f"cat > /root/fronted.py << 'EOF'\n{fronted}EOF")
        result = vm.run("python3 /root/fronted.py", timeout=60)
        assert result.stdout.startswith("closed") and "from-the-test-host" not in result.stdout, result


@pytest.mark.vm
def test_no_egress_at_all(test_host: str) -> None:
    """Nothing to reach, so nothing runs for it on the host: no proxy, no forward; the
    guest's connection to the proxy address is answered at once by the agent."""
    settings = InternetSettings(allowed_domains=[], extra_hosts={TEST_NAME: test_host})
    with SmolVM(internet_settings=settings) as vm:
        spec = vm._spec()
        started = time.monotonic()
        code, text = curl(vm, f"http://{TEST_NAME}:8080/hello")
        assert text == "smolvm: this sandbox may reach nothing on the network" and time.monotonic() - started < 5
        assert egress.pid_of(spec) is None and not any(str(spec.net_socket) in p for p in netproxies())
        qemu = Path(f"/proc/{vm._record.pid}/cmdline").read_bytes()
        assert b"guestfwd" not in qemu and b"hostfwd" not in qemu and b"netproxy" not in qemu
        usernet = qmp(spec.control_socket, "human-monitor-command", {"command-line": "info usernet"})
        assert "HOST_FORWARD" not in usernet and "FWD" not in usernet.upper(), usernet


@pytest.mark.vm
def test_expose_local_and_its_bad_input(default_vm: SmolVM, host_server: int) -> None:
    vm = default_vm
    server = vm.spawn("python3 -m http.server 8000", cwd="/etc")
    assert wait_for(lambda: vm.run("curl -s --noproxy '*' -o /dev/null http://127.0.0.1:8000/").ok)
    port = vm.expose_local(8000)
    fetched = subprocess.run(["curl", "-sS", "-m", "20", f"http://127.0.0.1:{port}/hostname"], capture_output=True)
    assert fetched.returncode == 0 and fetched.stdout.strip() != b""
    assert [(p.host_port, p.guest_port) for p in vm.list_exposed()] == [(port, 8000)]
    # Another process sees the same, and the listener is on 127.0.0.1 alone.
    assert [(p.host_port, p.guest_port) for p in SmolVM.from_id(vm.vm_id).list_exposed()] == [(port, 8000)]
    assert listening_addresses(port) == ["0100007F"]  # 127.0.0.1, nothing else
    with pytest.raises(ValidationError, match="already in use"):
        vm.expose_local(8000, host_server)
    with pytest.raises(ValidationError, match="port number"):
        vm.expose_local(70000)
    with pytest.raises(ValidationError, match="port number"):
        vm.expose_local(8000, 0)
    vm.unexpose_local(port)
    assert vm.list_exposed() == []
    refused = subprocess.run(["curl", "-sS", "-m", "5", f"http://127.0.0.1:{port}/hostname"], capture_output=True)
    assert refused.returncode != 0
    with pytest.raises(ValidationError, match="is not exposed"):
        vm.unexpose_local(port)
    server.kill()


@pytest.mark.vm
def test_two_sandboxes_cannot_reach_each_other(default_vm: SmolVM) -> None:
    a = default_vm
    a.spawn("python3 -m http.server 8001", cwd="/etc")
    assert wait_for(lambda: a.run("curl -s --noproxy '*' -o /dev/null http://127.0.0.1:8001/").ok)
    port = a.expose_local(8001)
    try:
        with SmolVM() as b:
            for url, options in (
                (f"http://127.0.0.1:{port}/hostname", ("--noproxy", "")),  # A's forward, via the proxy
                (f"http://10.0.2.2:{port}/hostname", ("--noproxy", "*")),
            ):
                code, text = curl(b, url, *options)
                assert code != 0 or "smolvm:" in text, url
    finally:
        a.unexpose_local(port)


@pytest.mark.vm
def test_expose_on_a_stopped_sandbox() -> None:
    vm = SmolVM()
    try:
        with pytest.raises(ValidationError, match="not running|is created"):
            vm.expose_local(8000)
        assert vm.list_exposed() == []
    finally:
        vm.delete()


@pytest.mark.vm
def test_a_connection_flood_is_bounded_and_costs_the_host_nothing(default_vm: SmolVM) -> None:
    """The guest holds 64 connections to the proxy and opens 100 more, then floods it
    with 500 quick connections: one proxy process throughout, nothing started on the
    host for any of them, each refused one well under 1 ms of the proxy's CPU, and the
    proxy answers as before afterwards."""
    vm = default_vm
    spec = vm._spec()
    proxy = egress.pid_of(spec)
    assert proxy is not None
    ours = {proxy, vm._record.pid}
    script = (
        "import os, socket, time\n"
        "def wait(name):\n"
        "    while not os.path.exists(name): time.sleep(0.05)\n"
        "held = [socket.create_connection(%(proxy)r, timeout=20) for _ in range(%(cap)d)]\n"
        "open('/tmp/flood-held', 'w').close()\n"
        "wait('/tmp/flood-go')\n"
        "refused = 0\n"
        "for _ in range(100):\n"
        "    s = socket.create_connection(%(proxy)r, timeout=20)\n"
        "    refused += b'%(cap)d connections open already' in s.recv(4096)\n"
        "    s.close()\n"
        "with open('/tmp/flood-refused', 'w') as f: f.write(str(refused))\n"
        "wait('/tmp/flood-end')\n"
        "for s in held: s.close()\n"
        "quick = 0\n"
        "for _ in range(500):\n"
        "    try: socket.create_connection(%(proxy)r, timeout=5).close(); quick += 1\n"
        "    except OSError: pass\n"
        "with open('/tmp/flood-quick', 'w') as f: f.write(str(quick))\n"
    ) % {"proxy": P.PROXY_ADDRESS, "cap": netproxy.MAX_CONNECTIONS}
    vm.run(f"rm -f /tmp/flood-*; cat > /root/flood.py << 'EOF'\n{script}EOF")
    flood = vm.spawn("python3 /root/flood.py")
    assert wait_for(lambda: vm.run("test -e /tmp/flood-held").ok, timeout=120), flood.output()
    time.sleep(1)  # the last of the 64 reach the proxy
    assert sandbox_processes(spec) == ours
    before = cpu_seconds(proxy)
    vm.run("touch /tmp/flood-go")
    assert wait_for(lambda: vm.run("test -e /tmp/flood-refused").ok, timeout=120)
    spent = cpu_seconds(proxy) - before
    assert vm.run("cat /tmp/flood-refused").stdout == "100"
    print(f"\nproxy CPU for 100 refused connections: {spent * 1000:.0f} ms")
    assert spent < 0.1, f"{spent * 1000:.0f} ms of the proxy's CPU for 100 refused connections"
    assert sandbox_processes(spec) == ours
    vm.run("touch /tmp/flood-end")
    seen: set[int] = set()
    while not vm.run("test -e /tmp/flood-quick").ok:
        seen |= sandbox_processes(spec)
    assert seen | sandbox_processes(spec) == ours, "a process was started for the guest's connections"
    assert int(vm.run("cat /tmp/flood-quick").stdout) > 400
    assert egress.pid_of(spec) == proxy
    code, text = curl(vm, "http://169.254.169.254/")
    assert "may not reach" in text  # the proxy still answers, and still refuses


@pytest.mark.vm
def test_a_restarted_agent_takes_up_the_proxy_again(default_vm: SmolVM) -> None:
    """The guest's init restarts an agent that died; the proxy's hello came long before."""
    vm = default_vm
    agent = vm.run("echo $PPID").stdout
    vm.spawn("sh -c 'sleep 1; kill -9 $PPID'")  # its parent is the agent
    time.sleep(3)
    assert wait_for(lambda: vm.run("true").ok, timeout=60)
    assert vm.run("echo $PPID").stdout != agent
    code, text = curl(vm, "http://169.254.169.254/")
    assert "may not reach" in text  # answered by the proxy, not refused for want of one


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sandbox_processes(spec: LaunchSpec) -> set[int]:
    """Live processes (zombies skipped) that name this sandbox's files, and their children."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if stat[0] != "Z":
            table[int(name)] = (int(stat[1]), cmdline)
    found = {pid for pid, (_, cmdline) in table.items() if str(spec.home).encode() in cmdline}
    return found | {pid for pid, (parent, _) in table.items() if parent in found}


@pytest.mark.vm
def test_cli_network_options_and_ports(test_host: str) -> None:
    name = f"net-{os.getpid()}"

    def smolvm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(SMOLVM_BIN), *args], capture_output=True, text=True, timeout=300)

    for bad in (
        ["--allow-domain", "http://x/y"],
        ["--allow-host-port", "70000"],
        ["--no-internet", "--allow-domain", "x.org"],
    ):
        proc = smolvm("sandbox", "create", "--name", name, *bad)
        assert proc.returncode != 0 and proc.stderr.startswith("error:"), bad
        assert "Traceback" not in proc.stderr
    assert smolvm("sandbox", "info", name).returncode == 1  # nothing was made
    proc = smolvm("sandbox", "create", "--name", name, "--allow-domain", "*.smolvm.test", "--allow-host-port", "9")
    assert proc.returncode == 0, proc.stderr
    try:
        internet = json.loads(smolvm("sandbox", "info", name, "--json").stdout)["internet"]
        assert internet == {
            "allowed_domains": ["*.smolvm.test"], "allow_host_ports": [9], "extra_hosts": {}, "trust_host_cas": True,
        }  # fmt: skip
        assert smolvm("sandbox", "port", "list", name, "--json").stdout.strip() == "[]"
        for bad in ("x", "1:2:3", "99999"):
            proc = smolvm("sandbox", "port", "expose", name, bad)
            assert proc.returncode == 1 and proc.stderr.startswith("error:"), bad
        proc = smolvm("sandbox", "port", "expose", name, "8000")
        assert proc.returncode == 0, proc.stderr
        host_port = int(proc.stdout.split()[0].rsplit(":", 1)[1])
        assert f'"host_port": {host_port}' in smolvm("sandbox", "port", "list", name, "--json").stdout
        assert smolvm("sandbox", "port", "close", name, str(host_port)).returncode == 0
        proc = smolvm("sandbox", "port", "close", name, str(host_port))
        assert proc.returncode == 1 and "not exposed" in proc.stderr
    finally:
        smolvm("sandbox", "delete", name)


def wait_for(check, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False

"""The host's certificate authorities in the guest (smolvm/cas.py, the agent's trust):
HTTPS to a test host whose certificate only the host's own CA vouches for."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import needs_image

from smolvm import InternetSettings, SmolVM, cas
from smolvm import protocol as P

NAME = "tls.smolvm.test"


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A CA of the test's own, and a certificate for NAME that it signed: (ca, cert, key)."""
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=smolvm test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
            "-keyout", str(ca_key), "-out", str(ca))  # fmt: skip
    key, request, cert = directory / "key.pem", directory / "req.csr", directory / "cert.pem"
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={NAME}", "-keyout", str(key), "-out", str(request))
    (directory / "ext").write_text(f"subjectAltName=DNS:{NAME}\n")
    openssl("x509", "-req", "-in", str(request), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-days", "1", "-extfile", str(directory / "ext"), "-out", str(cert))  # fmt: skip
    return ca, cert, key


def test_only_certificate_blocks_of_crt_files_are_taken(tmp_path: Path) -> None:
    (tmp_path / "made").mkdir()
    ca, _, key = make_ca(tmp_path / "made")
    trusted = tmp_path / "trusted"
    (trusted / "sub").mkdir(parents=True)
    (trusted / "sub" / "proxy.crt").write_bytes(ca.read_bytes().replace(b"\n", b"\r\n"))  # CRLF as some tools write
    (trusted / "mistake.crt").write_bytes(key.read_bytes())  # a key where a certificate should be
    (trusted / "other.pem").write_bytes(ca.read_bytes())  # not a .crt: update-ca-certificates skips it too
    text = cas.host_certificates(trusted)
    assert text.count("BEGIN CERTIFICATE") == 1 and "PRIVATE KEY" not in text and "\r" not in text
    assert P.PEM_CERTS.fullmatch(text)  # what the guest takes
    assert cas.host_certificates(tmp_path / "none") == ""
    for bad in ("-----BEGIN CERTIFICATE-----\n$(reboot)\n-----END CERTIFICATE-----\n", "hello", text + "x"):
        assert not P.PEM_CERTS.fullmatch(bad)


@pytest.fixture
def tls_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    from nethost import namespace_host

    if os.geteuid() != 0:
        pytest.skip("the test host needs a network namespace (root)")
    ca, cert, key = make_ca(tmp_path)
    trusted = tmp_path / "host-cas"
    trusted.mkdir()
    (trusted / "test-proxy.crt").write_bytes(ca.read_bytes())
    monkeypatch.setenv("SMOLVM_HOST_CA_DIR", str(trusted))  # as if the host trusted it
    www = tmp_path / "www"
    www.mkdir()
    (www / "hello").write_text("over-tls\n")
    with namespace_host(www, "c", 215, tls=(cert, key)) as address:
        yield address


@needs_image
def test_the_guest_trusts_the_hosts_cas_unless_told_not_to(tls_host: str) -> None:
    from nethost import TLS_PORT

    url = f"https://{NAME}:{TLS_PORT}/hello"
    on = InternetSettings(allowed_domains=[NAME], extra_hosts={NAME: tls_host})
    with SmolVM(internet_settings=on) as vm:
        assert vm.run(f"curl -sS -m 20 {url}", timeout=60).output == "over-tls"
        python = f"import urllib.request; print(urllib.request.urlopen('{url}', timeout=20).read().decode())"
        assert vm.run(f'python3 -c "{python}"', timeout=60).output == "over-tls"
        assert vm.run("echo $PIP_CERT $REQUESTS_CA_BUNDLE").output.split() == ["/run/smolvm/trust/ca-bundle.pem"] * 2
        # In /run only: the disk, and so any image or snapshot of it, has none of it.
        assert vm.run("grep -c 'BEGIN CERTIFICATE' /run/smolvm/trust/host-cas.pem").output == "1"
        assert (
            vm.run("grep -rl 'smolvm test CA' /etc/ssl /usr/local/share/ca-certificates || echo none").output == "none"
        )
    off = InternetSettings(allowed_domains=[NAME], extra_hosts={NAME: tls_host}, trust_host_cas=False)
    with SmolVM(internet_settings=off) as vm:
        failed = vm.run(f"curl -sS -m 20 {url}", timeout=60)
        assert failed.exit_code == 60 and "certificate" in failed.stderr  # curl: peer certificate cannot be verified
        assert vm.run("ls /run/smolvm/trust 2>/dev/null | wc -l; echo ${PIP_CERT:-unset}").output == "0\nunset"

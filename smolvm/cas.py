"""The certificate authorities the host trusts beyond its distribution's, for the guest.

On Debian and Ubuntu those are the ``.crt`` files under /usr/local/share/ca-certificates
(a TLS-inspecting proxy's CA is put there, as on this project's machines). At each
start a sandbox is sent them (``SmolVM.start``, the agent's ``trust``) unless its
``internet_settings.trust_host_cas`` is off; the guest keeps them in /run only (off
the disk: no image keeps them).
Only certificate blocks are taken from those files, and within bounds, so nothing
else that lies there (a key put there by mistake) reaches a guest.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from . import protocol as P

HOST_CA_DIR = Path("/usr/local/share/ca-certificates")
MAX_FILES = 256
MAX_FILE = 1 << 20
BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n([A-Za-z0-9+/=\r\n]{1,65536}?)-----END CERTIFICATE-----")


def host_directory() -> Path:
    """Where the host's own CAs are (``SMOLVM_HOST_CA_DIR`` names another place)."""
    return Path(os.environ.get("SMOLVM_HOST_CA_DIR") or HOST_CA_DIR)


def host_certificates(directory: Path | None = None) -> str:
    """The PEM certificates in ``directory``'s ``.crt`` files, one block after another
    (``""`` if there are none), bounded by what the guest takes."""
    root = directory or host_directory()
    blocks: list[str] = []
    size = 0
    try:
        files = sorted(p for p in root.rglob("*.crt") if p.is_file())[:MAX_FILES]
    except OSError:
        return ""
    for path in files:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_FILE)
        except OSError:
            continue
        for match in BLOCK.finditer(data):
            body = match.group(1).replace(b"\r", b"").decode("ascii")
            block = "-----BEGIN CERTIFICATE-----\n" + body.rstrip("\n") + "\n-----END CERTIFICATE-----\n"
            if size + len(block) > P.MAX_TRUSTED_PEM:
                return "".join(blocks)
            blocks.append(block)
            size += len(block)
    return "".join(blocks)

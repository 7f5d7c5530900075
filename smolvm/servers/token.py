"""The bearer token every SmolVM server asks for: made on first use, kept 0600 in the
data directory, so only the user (and root) can read it and reach the servers."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from ..exceptions import HostError
from ..paths import data_dir

TOKEN_FILE = "server-token"


def token_path() -> Path:
    return data_dir() / TOKEN_FILE


def server_token() -> str:
    """The token, made now if there is none. A file anyone else may read is refused:
    whoever holds the token can run code in the user's sandboxes."""
    path = token_path()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    info = path.lstat()
    if not path.is_file() or path.is_symlink():
        raise HostError(f"{path} is not a plain file: remove it, and a new token is made")
    if info.st_mode & 0o077 or info.st_uid != os.geteuid():
        raise HostError(f"{path} may be read by others: remove it, and a new token is made")
    token = path.read_text().strip()
    if len(token) < 32:
        raise HostError(f"{path} holds no usable token: remove it, and a new token is made")
    return token


def authorized(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries the token (compared in constant time)."""
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer ") :].strip().encode(), token.encode())

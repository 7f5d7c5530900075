"""Becomes a jailed QEMU under a seccomp filter that lets it change ids only to its jail's.

QEMU's own ``-sandbox elevateprivileges=deny`` cannot serve a QEMU that drops root
itself (``-run-with user=``, ``-runas``): QEMU installs its filter first and then
changes its ids, which that filter kills it for (SIGSYS, measured on 7.2 and 10). So
SmolVM runs this script in QEMU's place. It caps the address space (what ``prlimit``
does for an unjailed QEMU), loads a filter of its own through libseccomp (the library
QEMU's filter comes from, installed with QEMU), and execs QEMU, which stacks its own
filter on this one. In this filter:

- ``setuid`` and ``setgid`` succeed only to the jail's uid and gid (QEMU's drop), and
  fail with EPERM otherwise (QEMU checks that ``setuid(0)`` fails once it has dropped);
- every other call of QEMU's "elevateprivileges" set (``setreuid``, ``setresuid``,
  ``setfsuid``, their gid twins, ``setpgid``, ``setsid``) kills the process, as QEMU's
  own deny does.

Run as ``python -I -S setid_filter.py ADDRESS_SPACE UID GID QEMU [ARG...]``: standard
library only, one thread, so nothing runs between loading the filter and exec.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import sys

ALLOW = 0x7FFF0000
KILL_PROCESS = 0x80000000
CMP_NE = 1
ONLY_OWN = ("setuid", "setgid")  # argument 0 must be the jail's id
KILLED = ("setreuid", "setregid", "setresuid", "setresgid", "setfsuid", "setfsgid", "setpgid", "setsid")


def errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class ArgCmp(ctypes.Structure):  # libseccomp's struct scmp_arg_cmp
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def load(uid: int, gid: int, lib: str = "libseccomp.so.2") -> None:
    """Load the filter into this process (and what it execs). Raises OSError."""
    seccomp = ctypes.CDLL(lib, use_errno=True)
    seccomp.seccomp_init.restype = ctypes.c_void_p
    seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
    seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    seccomp.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(ArgCmp),
    ]  # fmt: skip
    seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
    seccomp.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = seccomp.seccomp_init(ALLOW)
    if not ctx:
        raise OSError(errno.ENOMEM, "seccomp_init failed")
    try:
        own = {"setuid": uid, "setgid": gid}
        for name in (*ONLY_OWN, *KILLED):
            number = seccomp.seccomp_syscall_resolve_name(name.encode())
            if number < 0:
                raise OSError(errno.ENOSYS, f"libseccomp does not know {name}")
            if name in own:
                cmp = ArgCmp(0, CMP_NE, own[name], 0)
                rc = seccomp.seccomp_rule_add_array(ctx, errno_action(errno.EPERM), number, 1, ctypes.byref(cmp))
            else:
                rc = seccomp.seccomp_rule_add_array(ctx, KILL_PROCESS, number, 0, None)
            if rc < 0:
                raise OSError(-rc, f"cannot add the seccomp rule for {name}: {os.strerror(-rc)}")
        rc = seccomp.seccomp_load(ctx)
        if rc < 0:
            raise OSError(-rc, f"cannot load the seccomp filter: {os.strerror(-rc)}")
    finally:
        seccomp.seccomp_release(ctx)


def main(argv: list[str]) -> int:
    try:
        limit, uid, gid = (int(a) for a in argv[:3])
        program = argv[3:]
        if not program:
            raise ValueError
    except ValueError:
        print("usage: setid_filter.py ADDRESS_SPACE UID GID PROGRAM [ARG...]", file=sys.stderr)
        return 2
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        load(uid, gid)
        # Python's locale coercion added LC_CTYPE to what SmolVM gave (which has none).
        env = {key: value for key, value in os.environ.items() if key != "LC_CTYPE"}
        os.execve(program[0], program, env)
    except OSError as exc:
        print(f"smolvm: cannot start {program[0]} in its jail: {exc}", file=sys.stderr)
        return 126


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

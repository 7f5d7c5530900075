"""What a command may take of the sandbox: each one in a cgroup of its own.

    /sys/fs/cgroup/            the agent, tini, the kernel's threads
    /sys/fs/cgroup/smolvm/     every command together: CPU_WEIGHT, memory.max
        cmd-PID-N/             one command (or shell, or background process)
                               and all it starts: pids.max

So a fork bomb stops at PIDS_MAX processes, a memory hog is the OOM
killer's choice inside the commands' cgroup (the agent, at oom_score_adj
-1000, never is; the hog's shell lives on to report it), busy commands
cannot starve the agent of CPU, and a timeout ends a whole command at
once (``cgroup.kill``), whatever left its process group. Root in the guest may change the limits by writing to
these files. Standard library only: the image build copies this beside
the agent. Without cgroup v2 (a kernel or image without it) commands run
unlimited and are ended by walking /proc, as before.
"""

from __future__ import annotations

import errno
import itertools
import os
import signal

ROOT = "/sys/fs/cgroup"
GROUP = ROOT + "/smolvm"
PIDS_MAX = 1024  # processes and threads of one command
CPU_WEIGHT = 10  # against 100 for the agent and the rest: the agent stays responsive under load
AGENT_RESERVE = 32 << 20  # bytes kept from commands beyond what the system uses at start, for the agent to grow


def _write(path: str, text: str) -> bool:
    try:
        with open(path, "w") as f:
            f.write(text)
        return True
    except OSError:
        return False


def _mem_for_commands() -> int:
    """What commands may use together: what is available now, less AGENT_RESERVE."""
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, value = line.partition(":")
            fields[name] = int(value.split()[0]) * 1024
    return fields.get("MemAvailable", 0) - AGENT_RESERVE


class Cgroup:
    """One command's cgroup."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.procs = os.open(path + "/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)

    def add(self, pid: int) -> None:
        """Move a command that has just started here, and make it the OOM killer's to take
        again (it inherits the agent's -1000).

        Done by the agent right after the exec, not by the child before it: a preexec
        hook makes Python fork instead of vfork, which cost 15-30 ms a command here.
        What the command starts in its first moments, before the move, stays outside
        the cgroup. These limits guard against accidents (a runaway build, a fork bomb
        in generated code), not against the guest: its root can lift them anyway."""
        try:
            os.write(self.procs, str(pid).encode())
        except OSError:
            return  # it has already exited
        _write("/proc/%d/oom_score_adj" % pid, "0")

    def members(self) -> list[int]:
        try:
            with open(self.path + "/cgroup.procs") as f:
                return [int(line) for line in f if line.strip()]
        except OSError:
            return []

    def kill(self) -> bool:
        """SIGKILL everything in it, forks in flight included; False when nothing was
        left to kill. Does not wait for a thousand processes to finish dying: the
        cgroup goes once they have (``Limits.done``)."""
        had = bool(self.members())
        if not _write(self.path + "/cgroup.kill", "1"):  # before 5.14: one by one
            for pid in self.members():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return had

    def close(self) -> bool:
        """Let go of it; True if it was removed (nothing of the command runs on)."""
        if self.procs >= 0:
            os.close(self.procs)
            self.procs = -1
        try:
            os.rmdir(self.path)
        except OSError as exc:
            return exc.errno == errno.ENOENT
        return True


class Limits:
    """The commands' cgroup tree, set up once when the agent starts."""

    def __init__(self) -> None:
        self.enabled = self._setup()
        self.ids = itertools.count(1)
        self.lingering: list[Cgroup] = []  # commands done whose children still run: removed once empty
        self.spare: Cgroup | None = None  # made ahead, so a command need not wait for a mkdir

    @staticmethod
    def _setup() -> bool:
        if not os.path.exists(ROOT + "/cgroup.controllers"):
            return False
        _write("/proc/self/oom_score_adj", "-1000")
        for controller in ("cpu", "memory", "pids"):
            _write(ROOT + "/cgroup.subtree_control", "+" + controller)
        try:
            os.mkdir(GROUP)
        except FileExistsError:
            pass
        except OSError:
            return False
        _write(GROUP + "/cpu.weight", str(CPU_WEIGHT))
        room = _mem_for_commands()
        if room > AGENT_RESERVE:
            _write(GROUP + "/memory.max", str(room))
        for controller in ("cpu", "memory", "pids"):  # cpu: commands share fairly, not per process
            _write(GROUP + "/cgroup.subtree_control", "+" + controller)
        return True

    def new(self) -> Cgroup | None:
        """A fresh cgroup for one command, or None when there are no cgroups here."""
        if not self.enabled:
            return None
        if self.spare is not None:
            cgroup, self.spare = self.spare, None
            return cgroup
        return self._make()

    def refill(self) -> None:
        """Tidy up and make the next command's cgroup, while nobody waits."""
        self.lingering = [cg for cg in self.lingering if not cg.close()]
        if self.enabled and self.spare is None:
            self.spare = self._make()

    def _make(self) -> Cgroup | None:
        path = "%s/cmd-%d-%d" % (GROUP, os.getpid(), next(self.ids))  # a restarted agent's differ
        try:
            os.mkdir(path)
            cgroup = Cgroup(path)
        except OSError:
            return None
        _write(path + "/pids.max", str(PIDS_MAX))
        return cgroup

    def done(self, cgroup: Cgroup | None) -> None:
        """The command has ended; its cgroup goes as soon as nothing of it runs."""
        if cgroup is not None and not cgroup.close():
            self.lingering.append(cgroup)

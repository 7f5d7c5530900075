"""files.watch_dir: events from the guest checked (pure), and real changes in a sandbox."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smolvm import SmolVM
from smolvm.exceptions import GuestError, GuestFileNotFoundError, ValidationError
from smolvm.filesystem import FileEvent, FileEventType

vm_only = pytest.mark.vm


# -- what the guest sends, checked ----------------------------------------------------
def test_an_event_from_the_guest_is_checked() -> None:
    event = FileEvent.from_guest({"type": "renamed", "path": "/w/b", "old_path": "/w/a", "is_dir": False}, "/w")
    assert event == FileEvent(FileEventType.RENAMED, "/w/b", False, "/w/a")
    assert FileEvent.from_guest({"type": "removed", "path": "/w", "is_dir": True}, "/w").is_dir  # the top itself


@pytest.mark.parametrize(
    "raw",
    [
        None,
        [],
        {"type": "exploded", "path": "/w/a"},
        {"type": "created", "path": "/etc/passwd"},
        {"type": "created", "path": "/w/../etc"},
        {"type": "created", "path": "/wx/a"},
        {"type": "created", "path": "/w/a\0b"},
        {"type": "created", "path": "/w/" + "a" * 5000},
        {"type": "renamed", "path": "/w/b", "old_path": "/root/.ssh/id"},
        {"type": "created", "path": 7},
    ],
)
def test_a_lying_event_is_a_guest_error(raw: object) -> None:
    with pytest.raises(GuestError):
        FileEvent.from_guest(raw, "/w")


# -- real sandboxes -------------------------------------------------------------------
def collect(events: object, until: set[tuple[str, str]], wait: float = 20) -> list[FileEvent]:
    """Events until every (type, path) in ``until`` was seen, or ``wait`` seconds."""
    seen: list[FileEvent] = []
    deadline = time.monotonic() + wait
    for event in events:  # type: ignore[attr-defined]
        seen.append(event)
        if until <= {(e.type.value, e.path) for e in seen} or time.monotonic() > deadline:
            break
    return seen


@vm_only
def test_created_modified_removed_and_renamed_are_seen(vm: SmolVM) -> None:
    vm.files.make_dir("/watched")
    events = vm.files.watch_dir("/watched", timeout=60)
    vm.run("echo a > /watched/a && echo more >> /watched/a && mv /watched/a /watched/b && rm /watched/b"
           " && mkdir /watched/d")  # fmt: skip
    seen = collect(events, {("created", "/watched/a"), ("renamed", "/watched/b"), ("created", "/watched/d")})
    kinds = [(e.type.value, e.path) for e in seen]
    assert ("created", "/watched/a") in kinds and ("modified", "/watched/a") in kinds
    renamed = next(e for e in seen if e.type == FileEventType.RENAMED)
    assert (renamed.old_path, renamed.path) == ("/watched/a", "/watched/b")
    assert kinds.index(("removed", "/watched/b")) > kinds.index(("renamed", "/watched/b"))
    assert next(e for e in seen if e.path == "/watched/d").is_dir


@vm_only
def test_a_recursive_watch_follows_new_directories_and_a_plain_one_does_not(vm: SmolVM) -> None:
    vm.run("rm -rf /tree && mkdir -p /tree/old/deeper")
    deep = vm.files.watch_dir("/tree", recursive=True, timeout=60)
    flat = vm.files.watch_dir("/tree", timeout=8)
    vm.run("touch /tree/old/deeper/x && mkdir -p /tree/new/sub && touch /tree/new/sub/y && touch /tree/top")
    seen = {(e.type.value, e.path) for e in collect(deep, {("created", "/tree/new/sub/y"), ("created", "/tree/top")})}
    assert {("created", "/tree/old/deeper/x"), ("created", "/tree/new/sub/y"), ("created", "/tree/top")} <= seen
    flat_seen = {(e.type.value, e.path) for e in flat}  # runs to its timeout
    assert ("created", "/tree/top") in flat_seen and ("created", "/tree/new") in flat_seen
    assert not any(path.startswith(("/tree/old/", "/tree/new/")) for _, path in flat_seen)


@vm_only
def test_a_directory_renamed_inside_is_followed_and_one_moved_out_is_let_go(vm: SmolVM) -> None:
    vm.run("rm -rf /mv /away && mkdir -p /mv/a/b /away")
    events = vm.files.watch_dir("/mv", recursive=True, timeout=60)
    vm.run("mv /mv/a /mv/c && touch /mv/c/b/x && mv /mv/c /away/c && sleep 1 && touch /away/c/b/y /mv/end")
    seen = [(e.type.value, e.path) for e in collect(events, {("created", "/mv/end")})]
    assert ("renamed", "/mv/c") in seen and ("created", "/mv/c/b/x") in seen  # under its new name
    assert ("created", "/mv/c/b") not in seen  # a rename is not news of what it holds
    assert ("removed", "/mv/c") in seen  # gone from the tree...
    assert not any(path.endswith("/y") for _, path in seen)  # ...and, once that is known, no longer watched


@vm_only
def test_a_watch_ends_at_its_timeout_and_leaving_early_frees_the_sandbox(vm: SmolVM) -> None:
    vm.files.make_dir("/quiet")
    started = time.monotonic()
    assert list(vm.files.watch_dir("/quiet", timeout=1.5)) == []
    assert 1.4 < time.monotonic() - started < 10
    for i in range(3):
        events = vm.files.watch_dir("/quiet", timeout=600)
        vm.run(f"touch /quiet/x{i}")
        assert next(iter(events)).path == f"/quiet/x{i}"
        events.close()  # type: ignore[attr-defined]  # left early: the watch goes with its connection
    assert vm.run("echo still here").stdout == "still here\n"
    # the guest ends the abandoned watches once it sees their hosts gone (after a grace)
    count = "ls -l /proc/$(pgrep -of 'import agent')/fd | grep -c inotify || true"
    deadline = time.monotonic() + 15
    while int(vm.run(count).stdout.strip() or 0) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert vm.run(count).stdout.strip() == "0"


@vm_only
def test_bad_watches_get_clear_errors(vm: SmolVM) -> None:
    vm.files.write("/watch-file", "x")
    with pytest.raises(ValidationError, match="not a directory"):
        vm.files.watch_dir("/watch-file")
    with pytest.raises((ValidationError, GuestFileNotFoundError)):
        vm.files.watch_dir("/no/such/dir")
    with pytest.raises(ValidationError, match="timeout"):
        vm.files.watch_dir("/", timeout=0)
    with pytest.raises(ValidationError, match="absolute"):
        vm.files.watch_dir("relative")


guest_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
paths = st.one_of(st.text(max_size=30), st.sampled_from(["/w", "/w/a", "/w/../x", "/wx", "/w/a/../../b"]))


@settings(max_examples=300, deadline=None)
@given(
    kind=st.one_of(st.sampled_from([t.value for t in FileEventType]), guest_values),
    path=st.one_of(paths, guest_values),
    old=st.one_of(st.none(), paths, guest_values),
    extra=st.dictionaries(st.text(max_size=8), guest_values, max_size=3),
)
def test_any_event_a_guest_sends_is_an_event_under_the_top_or_a_guest_error(
    kind: object, path: object, old: object, extra: dict[str, object]
) -> None:
    raw = {**extra, "type": kind, "path": path, "old_path": old}
    try:
        event = FileEvent.from_guest(raw, "/w")
    except GuestError:
        return
    for p in (event.path, event.old_path):
        if p is not None:
            assert p == "/w" or (p.startswith("/w/") and "/../" not in p + "/")

"""A Dockerfile as an image recipe (smolvm/images/builder.py).

Lines, continuations, comments and ``${VAR}`` substitution come from the
``dockerfile-parse`` library. Taken: ``FROM`` (an image in SmolVM's store; one
stage), ``RUN``, ``COPY`` and ``ADD`` of paths in the build context (``--chown``,
``--chmod``; ``ADD`` unpacks a local tar archive, as Docker's does), ``ENV``, ``ARG``,
``WORKDIR``, ``USER``, ``CMD``, ``ENTRYPOINT``, and ``LABEL`` and ``EXPOSE``, kept in
the image's config. Any other instruction, a second ``FROM``, ``ADD`` of a URL or
``COPY --from`` is refused with the line it is on, never skipped.
"""

from __future__ import annotations

import glob
import io
import json
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dockerfile_parse import DockerfileParser
from dockerfile_parse.util import WordSplitter, extract_key_values

from ..exceptions import BuildError, ValidationError
from .builder import Image, Step, _argv

MAX_SIZE = 1 << 20  # bytes of Dockerfile read


def parse(path: Path, build_args: Mapping[str, str], context: Path | None = None) -> Image:
    try:
        if path.stat().st_size > MAX_SIZE:
            raise BuildError(f"{path} is over {MAX_SIZE >> 20} MiB: that is no Dockerfile")
        text = path.read_bytes()
    except OSError as exc:
        raise BuildError(f"cannot read the Dockerfile {path}: {exc.strerror}") from None
    root = (context or path.parent).resolve()
    if not root.is_dir():
        raise BuildError(f"the build context {root} is not a directory")
    parser = DockerfileParser(fileobj=io.BytesIO(text), env_replace=False)
    try:
        instructions = parser.structure
    except Exception as exc:  # a library's, on text it cannot read
        raise BuildError(f"{path} cannot be read as a Dockerfile: {exc}") from None
    return _Reader(path, root, dict(build_args)).read(instructions)


class _Reader:
    def __init__(self, path: Path, context: Path, build_args: dict[str, str]) -> None:
        self.path = path
        self.context = context
        self.build_args = build_args
        self.args: dict[str, str] = {}
        self.env: dict[str, str] = {}
        self.image: Image | None = None

    def read(self, instructions: list[dict[str, Any]]) -> Image:
        for item in instructions:
            kind, value = item["instruction"], item["value"] or ""
            if kind == "COMMENT":
                continue
            where = f"{self.path.name} line {item['startline'] + 1}"
            try:
                self._one(kind, value.strip(), where)
            except (ValidationError, ValueError) as exc:
                raise BuildError(f"{where}: {exc}") from None
        if self.image is None:
            raise BuildError(f"{self.path} has no FROM line: start it with FROM default (or another image's name)")
        return self.image

    def _sub(self, text: str) -> str:
        return str(WordSplitter(text, args=self.args, envs=self.env).dequote())

    def _add(self, kind: str, value: Any, where: str, source: str | None = None) -> None:
        assert self.image is not None
        self.image = Image(self.image.base, [*self.image.steps, Step(kind, value, source, where)])

    def _one(self, kind: str, value: str, where: str) -> None:
        if kind == "ARG":
            name, _, default = value.partition("=")
            if not name or any(c.isspace() for c in name):
                raise BuildError(f"{where}: ARG takes NAME or NAME=default, not {value!r}")
            given = self.build_args.get(name, self._sub(default) if default else None)
            if given is not None:
                self.args[name] = given
                if self.image is not None:
                    self._add("arg", {name: given}, where)
            return
        if kind == "FROM":
            if self.image is not None:
                raise BuildError(f"{where}: a second FROM (a multi-stage build) is not supported")
            words = self._sub(value).split()
            if len(words) != 1:
                raise BuildError(f"{where}: FROM takes an image name only (FROM default), not {value!r}")
            self.image = Image.from_image(words[0])
            if self.args:  # args declared before FROM are in scope for the rest, as Docker has them
                self._add("arg", dict(self.args), where)
            return
        if self.image is None:
            raise BuildError(f"{where}: {kind} before FROM: a Dockerfile starts with FROM (ARG may come first)")
        if kind == "RUN":
            command = shlex.join(_exec_form(value, where)) if value.startswith("[") else value
            if not command.strip():
                raise BuildError(f"{where}: RUN needs a command")
            self._add("run", command, where)
        elif kind in ("COPY", "ADD"):
            self._copy(kind, value, where)
        elif kind == "ENV":
            pairs = dict(extract_key_values(env_replace=True, args=self.args, envs=self.env, instruction_value=value))
            from ..commands import check_env

            self.env.update(pairs)
            self._add("env", check_env(pairs), where)
        elif kind == "WORKDIR":
            target = self._sub(value)
            current = next((s.value for s in reversed(self.image.steps) if s.kind == "workdir"), "/")
            joined = target if target.startswith("/") else f"{current.rstrip('/')}/{target}"
            self._add("workdir", joined.rstrip("/") or "/", where)
        elif kind == "USER":
            self._add("user", self._sub(value).split(":")[0], where)
        elif kind in ("CMD", "ENTRYPOINT"):
            argv = _exec_form(value, where) if value.startswith("[") else ["/bin/sh", "-c", value]
            self._add(kind.lower(), _argv(argv, kind), where)
        elif kind == "LABEL":
            self._add("label", dict(extract_key_values(True, self.args, self.env, value)), where)
        elif kind == "EXPOSE":
            self._add("expose", self._sub(value).split(), where)
        else:
            raise BuildError(
                f"{where}: {kind} is not supported (SmolVM takes FROM, RUN, COPY, ADD, ENV, ARG, WORKDIR, "
                "USER, CMD, ENTRYPOINT, LABEL and EXPOSE): remove it or do it with RUN"
            )

    def _copy(self, kind: str, value: str, where: str) -> None:
        words = _exec_form(value, where) if value.startswith("[") else list(WordSplitter(value).split())
        options: dict[str, str] = {}
        while words and words[0].startswith("--"):
            flag, _, setting = words.pop(0)[2:].partition("=")
            if flag not in ("chown", "chmod") or not setting:
                raise BuildError(f"{where}: {kind} --{flag} is not supported (only --chown=... and --chmod=...)")
            options[flag] = self._sub(setting)
        words = [self._sub(w) for w in words]
        if len(words) < 2:
            raise BuildError(f"{where}: {kind} takes one or more sources and a destination")
        *sources, dest = words
        if len(sources) > 1 and not dest.endswith("/"):
            raise BuildError(f"{where}: with several sources, {kind}'s destination must end with / ({dest}/)")
        for source in sources:
            if "://" in source:
                raise BuildError(f"{where}: {kind} of a URL is not supported: fetch it with RUN (curl, wget)")
            matches = sorted(glob.glob(glob.escape(str(self.context)) + "/" + source)) if _glob(source) else []
            paths = [Path(m) for m in matches] or [self.context / source]
            for found in paths:
                real = found.resolve()
                if real != self.context and self.context not in real.parents:
                    raise BuildError(f"{where}: {source} is outside the build context {self.context}")
                if not real.exists():
                    raise BuildError(f"{where}: {source} does not exist in the build context {self.context}")
                target = dest if len(paths) == 1 and len(sources) == 1 else dest.rstrip("/") + "/"
                value_ = {"dest": target, **options, **({"unpack": True} if kind == "ADD" else {})}
                self._add("copy", value_, where, str(real))


def _glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _exec_form(value: str, where: str) -> list[str]:
    try:
        argv = json.loads(value)
    except ValueError:
        raise BuildError(f"{where}: {value[:80]!r} is not a JSON list of strings") from None
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise BuildError(f"{where}: {value[:80]!r} must be a JSON list of strings")
    return argv

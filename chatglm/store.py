"""The local model store: GGUFs kept by name, so a command can say ``glm-4-9b-chat`` where it would say a path.

One folder (``CHATGLM_HOME``, else platformdirs' user data folder for this package) holds
``models/<ORG>/<REPO>/<type>.gguf`` (a projector beside it as ``mmproj-<type>.gguf``, where the runtime looks for one)
and ``<type>.json``, its manifest: the source repository and revision, the hashes of the files it was made from, the
type and when it was made. An entry exists once its manifest does: the GGUF is written (atomically) first, the manifest
last, both under a lock file per name, so two writers of one name never interleave and an interrupted one leaves the
store as it was. Names are ``ORG/REPO`` or a bare ``NAME``, each part plain characters: nothing that could leave the
folder (``..``, ``/x``, ``\\``) is a name. Below both sides: it reads GGUF headers only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from chatglm.errors import InputError, OutputError
from chatglm.fsutil import atomic_output, atomic_path, describe_os_error, read_json

log = logging.getLogger(__name__)
PROJECT = __name__.partition(".")[0]
HOME_ENV = "CHATGLM_HOME"
DEFAULT_TYPE = "q4_k_m"
MANIFEST_VERSION = 1
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_NAME = re.compile(rf"{_PART}(?:/{_PART})?")
_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]{0,31}")


def home() -> Path:
    """The store's folder: ``CHATGLM_HOME``, else the user data folder (``~/.local/share/chatglm`` on Linux)."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir(PROJECT, appauthor=False))


@dataclass(frozen=True)
class Ref:
    """A parsed ``NAME[:TYPE]`` (``type`` None when the name gave none)."""

    name: str
    type: Optional[str] = None

    def __str__(self) -> str:
        return f"{self.name}:{self.type}" if self.type else self.name


def parse_ref(text: str) -> Ref:
    """``ORG/REPO[:TYPE]`` or ``NAME[:TYPE]``; anything else (``../x``, ``a/b/c``, an empty type) is one InputError."""
    name, colon, qtype = text.partition(":")
    if not _NAME.fullmatch(name) or any(part in (".", "..") or part.endswith(".") for part in name.split("/")):
        raise InputError("not a model name: expected ORG/REPO[:TYPE] or NAME[:TYPE] (letters, digits, '.', '_', "
                         "'-'; no '..')", text)
    if colon and not _TYPE.fullmatch(qtype):
        raise InputError("not a model name: the type after ':' must be letters, digits and '_' (e.g. q4_k_m)", text)
    return Ref(name, qtype.lower() if colon else None)


def looks_like_path(text: str) -> bool:
    """A model argument that can only be a path (so no store lookup is tried and its own error stands)."""
    return text.endswith(".gguf") or text.startswith((".", "/", "~")) or os.sep + os.sep in text


@dataclass
class Entry:
    """One stored model: its GGUF and manifest."""

    name: str
    type: str
    gguf: Path
    manifest: dict = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.type}"

    @property
    def projector(self) -> Optional[Path]:
        path = self.gguf.with_name(f"mmproj-{self.gguf.name}")
        return path if path.is_file() else None

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in (self.gguf, self.projector) if p is not None and p.exists())

    @property
    def modified(self) -> float:
        return self.gguf.stat().st_mtime


class Store:
    """The store at ``root`` (default :func:`home`)."""

    def __init__(self, root: Optional[os.PathLike | str] = None):
        self.root = Path(root) if root is not None else home()
        self.models = self.root / "models"

    # -- paths ------------------------------------------------------------------------------------------------
    def folder(self, name: str) -> Path:
        folder = (self.models / name).resolve()
        if not folder.is_relative_to(self.models.resolve()):  # (parse_ref refuses such names; a symlink cannot help)
            raise InputError("not a model name: it would leave the store", name)
        return folder

    def gguf_path(self, ref: Ref) -> Path:
        return self.folder(ref.name) / f"{ref.type or DEFAULT_TYPE}.gguf"

    def manifest_path(self, ref: Ref) -> Path:
        return self.folder(ref.name) / f"{ref.type or DEFAULT_TYPE}.json"

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Held while one name is written or removed (a second writer of that name waits; other names do not)."""
        locks = self.root / "locks"
        try:
            locks.mkdir(parents=True, exist_ok=True)
            fd = os.open(locks / (name.replace("/", "--") + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot lock the store ({describe_os_error(exc)})", locks) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- reading ----------------------------------------------------------------------------------------------
    def entries(self, problems: Optional[list[str]] = None) -> list[Entry]:
        """Every stored model, sorted; a manifest that cannot be read is reported in ``problems`` (one line each,
        naming the file) and left out, so one broken entry hides nothing else."""
        found = []
        if not self.models.is_dir():
            return found
        for manifest in sorted(self.models.glob("**/*.json")):
            try:
                found.append(self._entry(manifest))
            except InputError as exc:
                if problems is not None:
                    problems.append(str(exc))
        return found

    def _entry(self, manifest: Path) -> Entry:
        data = read_json(manifest, what="store manifest", max_bytes=1 << 20)
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(data.get("type"), str):
            raise InputError("not a store manifest (no name or type)", manifest)
        name = manifest.parent.relative_to(self.models).as_posix()
        gguf = manifest.with_suffix(".gguf")
        if data["name"] != name or data["type"] != manifest.stem:
            raise InputError(f"store manifest names {data['name']}:{data['type']}, not {name}:{manifest.stem}",
                             manifest)
        if not gguf.is_file():
            raise InputError(f"store entry has no GGUF ({gguf.name} is missing)", manifest)
        return Entry(name, data["type"], gguf, data)

    def find(self, ref: Ref | str) -> Entry:
        """The entry ``ref`` names: with no type, the only one stored under the name, else the default type."""
        from chatglm.known_models import repo_of

        ref = parse_ref(ref) if isinstance(ref, str) else ref
        ref = Ref(repo_of(ref.name), ref.type)
        folder = self.folder(ref.name)
        if ref.type is None:
            types = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
            if len(types) > 1 and DEFAULT_TYPE not in types:
                raise InputError(f"several types are stored ({', '.join(types)}): name one as {ref.name}:TYPE",
                                 ref.name)
            ref = Ref(ref.name, types[0] if len(types) == 1 else DEFAULT_TYPE)
        manifest = self.manifest_path(ref)
        if not manifest.is_file():
            raise InputError(f"no such model in the store ({self.root}); `chatglm list` shows what is there, "
                             "`chatglm pull` fetches one", str(ref))
        return self._entry(manifest)

    # -- writing ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _writing(self, ref: Ref) -> Iterator[Path]:
        """The name's lock held and its folder made; yields the folder."""
        if ref.type is None:
            raise InputError("a type is needed to add a model to the store", ref.name)
        folder = self.folder(ref.name)
        with self.lock(ref.name):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(f"cannot write here: {describe_os_error(exc)}", folder) from None
            yield folder

    @contextlib.contextmanager
    def adding(self, ref: Ref, manifest: dict) -> Iterator[Path]:
        """Yield the path to write ``ref``'s GGUF to; on success it is renamed into place and the manifest written,
        all under the name's lock. On failure the store is as it was."""
        with self._writing(ref):
            with atomic_path(self.gguf_path(ref)) as tmp:
                yield tmp
            self._write_manifest(ref, manifest)

    def add_file(self, ref: Ref, source: os.PathLike | str, manifest: dict, *, move: bool = False) -> Entry:
        """Put a GGUF (and its ``mmproj-`` projector, if one is beside it) into the store as ``ref``: copied, or with
        ``move`` renamed (a file already on the store's file system, e.g. converted into :meth:`scratch`)."""
        from chatglm.gguf_file import read_header

        source = Path(source)
        projector = source.with_name(f"mmproj-{source.name}")
        read_header(source)  # a file the store would refuse to show is refused now
        if projector.is_file():
            read_header(projector)
        with self._writing(ref):
            pairs = [(p, d) for p, d in ((projector, self.gguf_path(ref).with_name(f"mmproj-{ref.type}.gguf")),
                                         (source, self.gguf_path(ref))) if p.is_file()]
            for src, dst in pairs:
                if move:
                    try:
                        os.replace(src, dst)
                    except OSError as exc:
                        raise OutputError(f"cannot write here: {describe_os_error(exc)}", dst) from None
                else:
                    with atomic_path(dst) as out:
                        _copy(src, out)
            self._write_manifest(ref, manifest)
        return self.find(ref)

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        """A private folder on the store's file system (for a conversion to be moved in whole); always removed."""
        import tempfile

        try:
            self.root.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix=".partial-", dir=self.root))
        except OSError as exc:
            raise OutputError(f"cannot write here: {describe_os_error(exc)}", self.root) from None
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _write_manifest(self, ref: Ref, manifest: dict) -> None:
        data = {"version": MANIFEST_VERSION, **manifest, "name": ref.name, "type": ref.type,
                "created": manifest.get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with atomic_output(self.manifest_path(ref)) as fh:
            fh.write(json.dumps(data, indent=2, sort_keys=True).encode("utf-8") + b"\n")

    def remove(self, ref: Ref | str) -> Entry:
        """Remove an entry (manifest first, so a crash half-way leaves no entry pointing at nothing)."""
        entry = self.find(ref)
        with self.lock(entry.name):
            paths = [entry.gguf.with_suffix(".json"), entry.gguf, entry.gguf.with_name(f"mmproj-{entry.gguf.name}")]
            for path in paths:
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    raise OutputError(f"cannot remove ({describe_os_error(exc)})", path) from None
            folder = entry.gguf.parent
            while folder != self.models and folder.is_relative_to(self.models):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty
                folder = folder.parent
        return entry


def _copy(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)


def resolve(model: os.PathLike | str, store: Optional[Store] = None) -> Path:
    """A model argument as a GGUF path: a file that exists always wins; otherwise a store name (``NAME[:TYPE]``).
    Something that can only be a path is returned as it is, so the caller's own check of it speaks."""
    text = os.fspath(model)
    if os.path.exists(text) or looks_like_path(text):
        return Path(text)
    try:
        ref = parse_ref(text)
    except InputError:
        raise InputError("no such file, and not a model name (ORG/REPO[:TYPE])", text) from None
    return (store or Store()).find(ref).gguf

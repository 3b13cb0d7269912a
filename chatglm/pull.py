"""`chatglm pull`: a Hugging Face repository into the store, through huggingface_hub (its cache, resumable downloads,
``HF_TOKEN``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``). A checkpoint repository is fetched without any ``*.py`` (only
config, tokenizer, processor, chat template and weight files), checked against the hub's sizes and hashes, and
converted to the type asked; a repository of GGUFs gives the file of that type (and its projector) as it is, after the
checks `info` makes. Like :mod:`chatglm.api`, it sits above both sides: it converts, and validates as the runtime does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from chatglm.errors import ChatGLMError, InputError
from chatglm.known_models import KNOWN, repo_of
from chatglm.store import DEFAULT_TYPE, Entry, Ref, Store, parse_ref

log = logging.getLogger(__name__)
# What a conversion reads: config, tokenizer, processor, chat template and weights. Never code.
ALLOW = ["config.json", "generation_config.json", "tokenizer*", "*.model", "*.tiktoken", "vocab*", "merges.txt",
         "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json", "processor_config.json",
         "video_preprocessor_config.json", "chat_template*", "*.jinja", "*.safetensors", "*.safetensors.index.json",
         "pytorch_model*.bin", "pytorch_model*.bin.index.json"]
NEVER = ["*.py", "**/*.py"]
_SPLIT = re.compile(r"-\d{5}-of-\d{5}\.gguf$")
# A type tag of a GGUF repository (q4_k_m, iq2_xxs, ud_q4_k_xl, bf16, mxfp4_moe...) names one of ggml's block formats.
_TYPE_TAG = re.compile(r"(?:^|_)(?:i?q[1-8]|bf16|f16|f32|mxfp4|nvfp4|tq[12])(?:_|$)")


@dataclass
class HubFile:
    """What the hub says of one file: its size and hash (sha256 for LFS files, the git blob sha1 otherwise)."""

    path: str
    size: int
    sha256: Optional[str]
    blob_id: Optional[str]


def _hub_error(exc: Exception, repo: str) -> ChatGLMError:
    from huggingface_hub import errors as hf

    if isinstance(exc, hf.GatedRepoError):
        return InputError("the repository is gated: accept its terms on the hub and set HF_TOKEN", repo)
    if isinstance(exc, hf.RevisionNotFoundError):
        return InputError("no such revision on the hub", repo)
    if isinstance(exc, hf.RepositoryNotFoundError):
        return InputError("no such repository on the hub (a private one needs HF_TOKEN)", repo)
    if isinstance(exc, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):
        return InputError("not in the Hugging Face cache, and the hub cannot be reached (HF_HUB_OFFLINE is set, or "
                          "the network is down)", repo)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ChatGLMError(f"the hub failed: {first}", repo)


def _listing(repo: str, revision: Optional[str]) -> tuple[str, dict[str, HubFile]]:
    """The commit a revision names and every file in it, from the hub."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi()
    info = api.model_info(repo, revision=revision)
    files = {f.path: HubFile(f.path, f.size, f.lfs.sha256 if f.lfs else None, f.blob_id)
             for f in api.list_repo_tree(repo, recursive=True, revision=info.sha) if isinstance(f, RepoFile)}
    return info.sha, files


def _download(repo: str, revision: Optional[str], patterns: list[str], offline: bool) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, ignore_patterns=NEVER,
                                  local_files_only=offline))


def _hashes(path: Path) -> tuple[str, str]:
    """The file's sha256 and git blob sha1."""
    sha256, sha1 = hashlib.sha256(), hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            sha256.update(chunk)
            sha1.update(chunk)
    return sha256.hexdigest(), sha1.hexdigest()


def verify(folder: Path, hub: Optional[dict[str, HubFile]], repo: str) -> dict[str, str]:
    """Every downloaded file against the hub's size and hash; returns name -> sha256. A file that does not match is
    removed from the cache (so the next pull fetches it again) and refused."""
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name.endswith(".py"):
            raise InputError("a code file was downloaded, which pull never asks for", f"{repo}/{name}")
        sha256, sha1 = _hashes(path)
        want = hub.get(name) if hub is not None else None
        if want is not None and (path.stat().st_size != want.size
                                 or (want.sha256 is not None and sha256 != want.sha256)
                                 or (want.sha256 is None and want.blob_id not in (None, sha1))):
            blob = path.resolve()
            for p in {path, blob}:
                p.unlink(missing_ok=True)
            raise InputError(f"the download does not match the hub's {'sha256' if want.sha256 else 'sha1'} and size; "
                             "it was removed: pull again", f"{repo}/{name}")
        found[name] = sha256
    return found


def pick_gguf(names: list[str], qtype: Optional[str], repo: str) -> tuple[str, Optional[str], str]:
    """From a GGUF repository's files: the model file of ``qtype`` (the only one when no type is named), its projector
    (an ``mmproj*`` file, f16 first), and the type it is stored as."""
    ggufs = sorted(n for n in names if n.endswith(".gguf"))
    models = [n for n in ggufs if not os.path.basename(n).lower().startswith("mmproj")]
    projectors = sorted((n for n in ggufs if n not in models), key=lambda n: ("f16" not in n.lower(), n))
    if qtype is None and len(models) == 1:
        chosen = models
    else:
        want = (qtype or DEFAULT_TYPE).lower()
        chosen = [n for n in models if re.search(rf"(^|[-_.]){re.escape(want)}([-_.]|$)",
                                                 os.path.basename(n).lower().replace("-", "_"))]
    if not chosen:
        have = ", ".join(os.path.basename(n) for n in models) or "none"
        raise InputError(f"no GGUF of type {qtype or DEFAULT_TYPE} in the repository (it has: {have})", repo)
    if len(chosen) > 1 or _SPLIT.search(chosen[0]):
        raise InputError(f"type {qtype} matches several files ({', '.join(chosen)}); split GGUFs are not supported",
                         repo)
    stored = qtype or _type_of_file(chosen[0])
    return chosen[0], (projectors[0] if projectors else None), stored


def _type_of_file(name: str) -> str:
    from chatglm.convert.qtypes import RECIPES

    base = os.path.basename(name).lower().replace("-", "_")
    return next((t for t in sorted(RECIPES, key=len, reverse=True) if re.search(rf"(^|[_.]){t}([_.]|$)", base)),
                "gguf")


def check_type(qtype: str, *, gguf_tags: bool = False) -> None:
    """``qtype`` is one we convert to; with ``gguf_tags``, a type a GGUF repository may name files by is also taken
    (checked before any hub call, so a typo is not reported as a missing repository or cache)."""
    from chatglm.convert.qtypes import RECIPES

    if qtype not in RECIPES and not (gguf_tags and _TYPE_TAG.search(qtype)):
        raise InputError(f"unknown type {qtype!r}; one of {', '.join(RECIPES)}", qtype)


def pull(text: str, *, revision: Optional[str] = None, store: Optional[Store] = None) -> Entry:
    """Fetch ``ORG/REPO[:TYPE]`` (or a known short name) into the store and return its entry."""
    from huggingface_hub import constants

    ref = parse_ref(text)
    repo = repo_of(ref.name)
    if "/" not in repo:
        raise InputError("unknown model name: give ORG/REPO, or a short name from `chatglm pull --list-known`",
                         ref.name)
    if ref.type is not None:
        check_type(ref.type, gguf_tags=True)
    store = store or Store()
    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        if offline:
            commit, hub = revision, None
            names = [p.relative_to(f).as_posix() for f in [_download(repo, revision, ALLOW + ["*.gguf"], True)]
                     for p in f.rglob("*") if p.is_file()]
        else:
            commit, hub = _listing(repo, revision)
            names = list(hub)
        if any(n.endswith(".gguf") for n in names):
            model, projector, qtype = pick_gguf(names, ref.type, repo)
            folder = _download(repo, revision, [model] + ([projector] if projector else []), offline)
        else:
            qtype = ref.type or DEFAULT_TYPE
            check_type(qtype)
            model = projector = None
            folder = _download(repo, revision, ALLOW, offline)  # (by name, so the cache learns the ref)
    except ChatGLMError:
        raise
    except Exception as exc:  # huggingface_hub's and httpx's errors: one line
        raise _hub_error(exc, repo) from None
    if commit is not None and hub is not None and folder.name != commit:
        raise InputError(f"the revision moved during the pull (from {commit} to {folder.name}): pull again", repo)
    files = verify(folder, hub, repo)
    manifest = {"source": {"repo": repo, "revision": commit or folder.name, "endpoint": constants.ENDPOINT},
                "files": files, "format": "gguf" if model else "converted"}
    target = Ref(repo, qtype)
    with store.scratch() as scratch:
        if model:
            _check_gguf(folder / model, folder / projector if projector else None)
            staged = scratch / f"{qtype}.gguf"
            staged.symlink_to(folder / model)
            if projector:
                (scratch / f"mmproj-{qtype}.gguf").symlink_to(folder / projector)
            return store.add_file(target, staged, manifest)
        from chatglm.convert.pipeline import convert

        result = convert(folder, scratch / f"{qtype}.gguf", qtype)
        return store.add_file(target, result.path, manifest, move=True)


def _check_gguf(path: Path, projector: Optional[Path]) -> None:
    """What `info` and `run` check before a GGUF is used; a projector is read too."""
    from chatglm.gguf_file import read_header
    from chatglm.runtime.loader import not_runnable, validate

    header = read_header(path)
    problem = not_runnable(header)
    if problem:
        raise InputError(problem, path)
    validate(header)
    if projector is not None:
        read_header(projector)


def known_table() -> str:
    width = max(map(len, KNOWN))
    return "\n".join(f"{name:<{width}}  {repo}" for name, repo in KNOWN.items())

"""Versioned policies under `models/`: one directory per version and a `CURRENT` pointer.

    models/
      CURRENT          the served version's name; replaced atomically (write + fsync + rename)
      v0000/           base policy: config.json, model.safetensors, tokenizer files, meta.json
      v0001/ ...       later versions written by training cycles

A version directory is complete before its name can appear in CURRENT, so a crash at any point
leaves the pointer on a whole, loadable version: its files and the directory are fsynced before the
rename, and the models directory after it. A version is removed by first renaming it out of the
listing (`.vNNNN.removing`), so a removal cut short never leaves a half-deleted version that looks whole.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.failpoints import failpoint
from core.active import COMMITTEE_FILE
from core.durable import fsync_dir, fsync_tree
from core.precision import serving_device

POINTER = "CURRENT"
VERSION_RE = re.compile(r"^v\d{4,}$")


class RegistryBusy(RuntimeError):
    """Another process holds the registry's lock (a cycle, a rollback)."""


class ModelError(RuntimeError):
    """A model that is missing or cannot be loaded; the message is meant for the user as is."""


@dataclass
class LoadedPolicy:
    model: torch.nn.Module
    tokenizer: object
    version: str


def load_pretrained(path: Path | str, version: str = "") -> LoadedPolicy:
    device, dtype = serving_device()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    except Exception as exc:
        raise ModelError(f"cannot load a model from {path}: {str(exc).splitlines()[0][:300]}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"the tokenizer in {path} has no chat template; a chat model is needed")
    return LoadedPolicy(model=model, tokenizer=tokenizer, version=version)


class ModelRegistry:
    """The policy versions under one models directory. Also the engine's PolicySource."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def path(self, version: str) -> Path:
        return self.root / version

    def committee_path(self) -> Path:
        """The committee of reward models the last cycle fitted (core/active.py): the class's, not a version's."""
        return self.root / COMMITTEE_FILE

    def versions(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and VERSION_RE.match(p.name) and (p / "meta.json").exists())

    def current_version(self) -> str:
        try:
            version = (self.root / POINTER).read_text().strip()
        except FileNotFoundError:
            raise ModelError(f"no policy is current in {self.root}") from None
        if not VERSION_RE.match(version):
            raise ModelError(f"{self.root / POINTER} names no version: {version!r}")
        return version

    def has_current(self) -> bool:
        return (self.root / POINTER).exists()

    def set_current(self, version: str) -> None:
        if version not in self.versions():
            raise ModelError(f"no complete version {version} in {self.root}")
        tmp = self.root / f".{POINTER}.tmp"
        with open(tmp, "w") as f:
            f.write(version + "\n")
            f.flush()
            os.fsync(f.fileno())
        failpoint("switching")
        os.replace(tmp, self.root / POINTER)
        fsync_dir(self.root)  # the rename itself survives a power cut

    def rollback(self, version: str) -> str:
        """Makes an older version current again, under the lock a cycle holds: never between a
        cycle's promotion and its prune."""
        with registry_lock(self.root):
            if version not in self.versions():
                raise ModelError(f"no version {version} in {self.root}; have {', '.join(self.versions())}")
            try:
                self.set_current(version)
            except OSError as exc:  # the pointer is switched by one rename: it names the old version or the new
                raise ModelError(f"rollback to {version} stopped by a disk error ({exc}); "
                                 f"{self.current_or_none()} is still served") from exc
        return f"{version} is current again; a running app switches to it before its next reply"

    def current_or_none(self) -> str | None:
        """The current version, or None where the pointer cannot be read (in an error message)."""
        try:
            return self.current_version()
        except (OSError, ModelError):
            return None

    def remove(self, version: str) -> None:
        """Unlists the version (one atomic rename, made durable), then deletes its files."""
        doomed = self.root / f".{version}.removing"
        os.replace(self.path(version), doomed)
        fsync_dir(self.root)
        failpoint("removing")
        shutil.rmtree(doomed, ignore_errors=True)

    def clean_leftovers(self) -> list[str]:
        """Deletes what a crash left: half-written (`.partial`) and half-removed (`.removing`) versions,
        and a pointer that was written but never switched to."""
        if not self.root.is_dir():
            return []
        left = [p for p in self.root.iterdir() if p.name.startswith(".")
                and (p.is_dir() and p.name.endswith((".partial", ".removing")) or p.name == f".{POINTER}.tmp")]
        for path in left:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return sorted(p.name for p in left)

    def next_version(self, taken: Iterable[str] = ()) -> str:
        """The number after every version in this folder and every name in `taken` (the versions a DB
        has recorded: a DB kept while its models folder was replaced must not get a number twice)."""
        names = [*self.versions(), *(name.split("/")[0] for name in taken)]
        numbers = [int(v[1:]) for v in names if VERSION_RE.match(v)]
        return f"v{(max(numbers) + 1 if numbers else 0):04d}"

    def meta(self, version: str) -> dict:
        return json.loads((self.path(version) / "meta.json").read_text())

    def load(self, version: str) -> LoadedPolicy:
        return load_pretrained(self.path(version), version)

    def write_version(self, version: str, model, tokenizer, meta: dict, extra=None) -> Path:
        """Saves into a temporary directory, then renames it: a version exists whole or not at all."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(version)
        if final.exists():
            raise ModelError(f"version {version} already exists in {self.root}")
        tmp = self.root / f".{version}.partial"
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-save
        try:
            model.save_pretrained(tmp)
            failpoint("saving")
            tokenizer.save_pretrained(tmp)
            if extra is not None:  # more files that belong to the version, e.g. its reward model
                extra(tmp)
            (tmp / "meta.json").write_text(json.dumps({"version": version, **meta}, indent=2))
            fsync_tree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves no partial directory behind
            raise
        os.replace(tmp, final)
        fsync_dir(self.root)
        return final


class PinnedSource:
    """One version of a registry as an engine's PolicySource: an engine that serves it never follows
    CURRENT (a canary's engine, or an earlier version's in the arena)."""

    def __init__(self, registry: ModelRegistry, version: str) -> None:
        self.registry, self.version = registry, version

    def current_version(self) -> str:
        return self.version

    def load(self, version: str) -> LoadedPolicy:
        return self.registry.load(version)


@contextmanager
def registry_lock(models_dir: Path):
    """One process at a time changes which versions exist and which is current (a cycle, a rollback);
    an advisory lock on `.retrain.lock`, released by the kernel if its holder dies."""
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    handle = open(models_dir / ".retrain.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown pid"
        handle.close()
        raise RegistryBusy(f"another retrain is running ({holder}); wait for it to finish") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} since {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def record_versions(store, registry: ModelRegistry) -> None:
    """Adds to the DB the versions on disk that it does not know yet (the base; one promoted just
    before a crash), so that lineage in the DB always has its parents."""
    known = {v["version"] for v in store.model_versions()}
    for version in registry.versions():
        if version not in known:
            meta = registry.meta(version)
            store.add_model_version(version, "policy", str(registry.path(version)), parent=meta.get("parent"),
                                    metrics=meta.get("metrics"), lineage=meta.get("lineage") or {"source": meta.get("source")})

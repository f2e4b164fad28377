"""The artifact directory: the only coupling between compile and run.

    manifest.json   schema_version, versions, strategy/sampling/target, model facts, step I/O by role, sha256 per file
    step.onnx       the lowered decode step (+ step.onnx.data when the weights are large)
    ir.yaml         the optimised IR as a complete spec (valid input to `dgopt compile`); ir.O0.yaml before passes
    tokenizer/      the model's tokenizer files, when it has one
    draft.onnx      the draft model's step graph (uag, and speculative with strategy.fused false; a fused
                    speculative step has the draft inside step.onnx)
    draft_tokenizer/  the draft's own tokenizer (uag: the two models tokenize differently)

Written atomically: everything goes to a staging dir beside the target, the manifest last, then one rename.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .errors import ArtifactError

__all__ = ["SCHEMA_VERSION", "write_artifact", "read_manifest", "sha256_file"]

SCHEMA_VERSION = "1.0"
MANIFEST = "manifest.json"
_REQUIRED = ("schema_version", "dgopt_version", "strategy", "sampling", "target", "model", "io", "files", "step")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_artifact(out_dir: Path, fill: Callable[[Path], None], manifest: dict) -> Path:
    """`fill(staging)` writes every file except the manifest; hashes are taken here, the manifest written last, and
    the staging dir renamed over `out_dir`. On any failure nothing is left behind."""
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists() and not (out_dir / MANIFEST).is_file() and any(out_dir.iterdir()):
        raise ArtifactError(f"output dir {out_dir} exists and is not a dgopt artifact; refusing to overwrite it")
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        fill(staging)
        files = {}
        for p in sorted(staging.rglob("*")):
            if p.is_file():
                files[p.relative_to(staging).as_posix()] = sha256_file(p)
        manifest = dict(manifest, files=files)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        trash = None
        if out_dir.exists():
            trash = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(trash)
        staging.rename(out_dir)
        if trash:
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def read_manifest(art_dir: Path | str, check_hashes: bool = True) -> dict:
    art_dir = Path(art_dir)
    if not art_dir.is_dir():
        raise ArtifactError(f"artifact not found: {art_dir}")
    mpath = art_dir / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{art_dir} is not a dgopt artifact (no {MANIFEST})")
    try:
        m = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"corrupt {MANIFEST} in {art_dir}: {e}") from None
    if not isinstance(m, dict):
        raise ArtifactError(f"corrupt {MANIFEST} in {art_dir}: top level is not an object")
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        raise ArtifactError(f"corrupt {MANIFEST} in {art_dir}: missing key(s) {', '.join(missing)}")
    major = str(m["schema_version"]).split(".")[0]
    if major != SCHEMA_VERSION.split(".")[0]:
        raise ArtifactError(f"artifact schema_version {m['schema_version']} is not supported by this dgopt "
                            f"(reads {SCHEMA_VERSION.split('.')[0]}.x); recompile it")
    if not isinstance(m["files"], dict) or m["step"] not in m["files"]:
        raise ArtifactError(f"corrupt {MANIFEST} in {art_dir}: 'files' does not list the step graph '{m['step']}'")
    if check_hashes:
        for rel, digest in m["files"].items():
            p = art_dir / rel
            if not p.is_file():
                raise ArtifactError(f"artifact file missing: {rel} (listed in {MANIFEST})")
            if sha256_file(p) != digest:
                raise ArtifactError(f"artifact file {rel} does not match its sha256 in {MANIFEST} "
                                    "(tampered or corrupt); recompile the artifact")
    return m

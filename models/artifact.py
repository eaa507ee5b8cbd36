"""The model artifact: a versioned, signed directory a trained model lives in.

Layout (format 1)::

    <directory>/
        config.json                 model name/version, outcome, population, thresholds, ...
        <group>.safetensors         one per tensor group ("image_encoder", "fusion", ...)
        <document>.json             one per document ("feature_spec", "calibration", ...)
        MANIFEST.json               every file above with its sha256 and size
        MANIFEST.sig                Ed25519 signature over the exact MANIFEST.json bytes

Trust comes from the signature, integrity from the manifest: the signature
covers the manifest, the manifest covers every file, and nothing unlisted may
sit beside them. An attacker who edits a weight file and recomputes the hashes
in MANIFEST.json still cannot produce a signature that verifies with a key the
service trusts.

The service trusts the public keys listed in its configuration (paths to PEM
files, read with :func:`load_public_key`) and passes them to
:func:`load_artifact` as ``trusted_public_keys``. Passing ``None`` skips the
signature check (hashes are still checked); that is for research use only and
the service never does it.

Keys: :func:`generate_signing_key` writes a PEM private key (mode 0600) and its
``.pub`` beside it; :func:`load_signing_key` reads one back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

__all__ = [
    "ARTIFACT_FORMAT_VERSION",
    "FEATURE_SOURCES",
    "REQUIRED_CONFIG_KEYS",
    "Artifact",
    "ArtifactError",
    "clinfuse_version",
    "generate_signing_key",
    "load_artifact",
    "load_public_key",
    "load_signing_key",
    "public_key_fingerprint",
    "save_artifact",
]

ARTIFACT_FORMAT_VERSION: Final = 1

CONFIG_NAME: Final = "config.json"
MANIFEST_NAME: Final = "MANIFEST.json"
SIGNATURE_NAME: Final = "MANIFEST.sig"

#: Keys the caller must put in ``config``; ``created_at``, ``clinfuse_version`` and
#: ``artifact_format_version`` are filled in by :func:`save_artifact`.
REQUIRED_CONFIG_KEYS: Final = (
    "model_name",
    "model_version",
    "outcome",  # {"name", "definition", "horizon_days"}
    "population",
    "feature_source",  # {"kind": "fhir-spec", "spec_version": "1"} or {"kind": "manifest-columns"}
    "input_modalities",  # e.g. ["tabular", "image", "notes"]
    "decision_thresholds",  # {"high_risk": 0.3, ...}, probabilities in [0, 1]
    "note_encoder",  # encoder name, or None when notes are not an input
)
FEATURE_SOURCES: Final = ("fhir-spec", "manifest-columns")

# Group and document names become file names: keep them boring.
_NAME_RE: Final = re.compile(r"^[a-z][a-z0-9_\-]{0,63}$")
_RESERVED_NAMES: Final = frozenset({"config", "manifest"})
_KIND_BY_SUFFIX: Final = {".safetensors": "weights", ".json": "document"}


class ArtifactError(ValueError):
    """An artifact that cannot be written or trusted; the message names the file and problem."""


@dataclass(frozen=True)
class Artifact:
    """A loaded, verified artifact.

    ``public_key_fingerprint`` is the fingerprint of the trusted key whose
    signature verified, or ``None`` when the artifact was loaded without
    signature checking.
    """

    config: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]]
    documents: dict[str, Any]
    path: Path
    public_key_fingerprint: str | None


# --------------------------------------------------------------------------- keys

def generate_signing_key(path: Path) -> Ed25519PrivateKey:
    """Create an Ed25519 key: ``path`` (PEM PKCS#8, mode 0600) and ``path.pub`` (PEM).

    Refuses to overwrite an existing key, since that would orphan every
    artifact signed with it.
    """
    path = Path(path)
    pub_path = path.with_name(path.name + ".pub")
    for p in (path, pub_path):
        if p.exists():
            raise ArtifactError(f"{p} already exists; refusing to overwrite a signing key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # O_EXCL + mode at creation: the private key is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    pub_path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key


def load_signing_key(path_or_pem: Path | str | bytes, *, password: bytes | None = None
                     ) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file path, PEM text, or 32 raw bytes."""
    data = _key_bytes(path_or_pem, "signing key")
    try:
        if isinstance(path_or_pem, bytes) and len(data) == 32:
            return Ed25519PrivateKey.from_private_bytes(data)
        key = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError) as exc:
        raise ArtifactError(f"signing key {_describe(path_or_pem)}: not a readable PEM "
                            f"private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ArtifactError(f"signing key {_describe(path_or_pem)}: is a "
                            f"{type(key).__name__}, artifacts are signed with Ed25519")
    return key


def load_public_key(path_or_pem: Ed25519PublicKey | Path | str | bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from a key object, a PEM file path, PEM text, or 32 raw bytes."""
    if isinstance(path_or_pem, Ed25519PublicKey):
        return path_or_pem
    data = _key_bytes(path_or_pem, "public key")
    try:
        if isinstance(path_or_pem, bytes) and len(data) == 32:
            return Ed25519PublicKey.from_public_bytes(data)
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ArtifactError(f"public key {_describe(path_or_pem)}: not a readable PEM "
                            f"public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ArtifactError(f"public key {_describe(path_or_pem)}: is a "
                            f"{type(key).__name__}, artifacts are signed with Ed25519")
    return key


def public_key_fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey | bytes) -> str:
    """``"sha256:<hex>"`` of the raw 32-byte public key; stable across PEM re-encodings."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    pub = load_public_key(key) if isinstance(key, bytes) else key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _key_bytes(path_or_pem: Path | str | bytes, what: str) -> bytes:
    if isinstance(path_or_pem, bytes):
        return path_or_pem
    if isinstance(path_or_pem, str) and path_or_pem.lstrip().startswith("-----BEGIN"):
        return path_or_pem.encode()
    path = Path(path_or_pem)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{what} {path}: cannot read ({exc.strerror})") from None


def _describe(path_or_pem: object) -> str:
    # Never echo key material into an error message.
    if isinstance(path_or_pem, Path):
        return str(path_or_pem)
    if isinstance(path_or_pem, str) and not path_or_pem.lstrip().startswith("-----BEGIN"):
        return path_or_pem
    return "(in memory)"


# --------------------------------------------------------------------------- save

def save_artifact(
    directory: Path,
    *,
    config: dict[str, Any],
    tensors: dict[str, dict[str, torch.Tensor]],
    documents: dict[str, dict[str, Any] | list[Any]],
    signing_key: Ed25519PrivateKey | bytes | Path | None,
) -> Path:
    """Write a complete artifact to ``directory`` (which must not exist yet) and return it.

    Everything is written to a temporary sibling directory and renamed into
    place at the end, so a crash leaves either no artifact or a whole one.
    ``signing_key=None`` writes an unsigned artifact, which :func:`load_artifact`
    accepts only when called without trusted keys.

    Raises
    ------
    ArtifactError
        Missing config keys, bad names, values JSON cannot hold, an existing
        ``directory``.
    """
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ArtifactError(f"{directory} already exists; artifacts are immutable, write a "
                            "new version to a new directory")
    key = _as_signing_key(signing_key)
    full_config = _complete_config(config)

    files: dict[str, bytes] = {CONFIG_NAME: _json_bytes(full_config, CONFIG_NAME)}
    for group, named in tensors.items():
        _check_name(group, "tensor group")
        files[f"{group}.safetensors"] = _safetensors_bytes(group, named)
    for name, doc in documents.items():
        _check_name(name, "document")
        files[f"{name}.json"] = _json_bytes(doc, f"{name}.json")

    fingerprint = public_key_fingerprint(key) if key is not None else None
    manifest = {
        "artifact_format_version": ARTIFACT_FORMAT_VERSION,
        "clinfuse_version": full_config["clinfuse_version"],
        "model_name": full_config["model_name"],
        "model_version": full_config["model_version"],
        "created_at": full_config["created_at"],
        "hash_algorithm": "sha256",
        "files": [
            {"path": name, "kind": _kind(name), "size": len(data),
             "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in sorted(files.items())
        ],
        "public_key_fingerprint": fingerprint,
    }
    manifest_bytes = _json_bytes(manifest, MANIFEST_NAME)
    files[MANIFEST_NAME] = manifest_bytes
    if key is not None:
        files[SIGNATURE_NAME] = key.sign(manifest_bytes)

    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".partial", dir=parent))
    try:
        for name, data in files.items():
            _write_synced(tmp / name, data)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the service may run as another user
        _fsync_dir(tmp)
        if directory.exists():
            directory.rmdir()  # empty (checked above); rename will not replace it portably
        os.rename(tmp, directory)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _as_signing_key(key: Ed25519PrivateKey | bytes | Path | None) -> Ed25519PrivateKey | None:
    if key is None or isinstance(key, Ed25519PrivateKey):
        return key
    return load_signing_key(key)


def _complete_config(config: Mapping[str, Any]) -> dict[str, Any]:
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in config]
    if missing:
        raise ArtifactError(f"config is missing {missing}; an artifact must state "
                            f"{list(REQUIRED_CONFIG_KEYS)}")
    source = config["feature_source"]
    kind = source.get("kind") if isinstance(source, Mapping) else None
    if kind not in FEATURE_SOURCES:
        raise ArtifactError(f"config feature_source {source!r}: kind must be one of "
                            f"{list(FEATURE_SOURCES)}")
    if kind == "fhir-spec" and not source.get("spec_version"):
        raise ArtifactError("config feature_source: 'fhir-spec' needs a spec_version")
    modalities = config["input_modalities"]
    if (not isinstance(modalities, Sequence) or isinstance(modalities, str) or not modalities
            or not all(isinstance(m, str) for m in modalities)):
        raise ArtifactError(f"config input_modalities must be a non-empty list of names, "
                            f"got {modalities!r}")
    thresholds = config["decision_thresholds"]
    if not isinstance(thresholds, Mapping):
        raise ArtifactError(f"config decision_thresholds must map names to probabilities, "
                            f"got {type(thresholds).__name__}")
    bad = {k: v for k, v in thresholds.items()
           if not isinstance(v, int | float) or not 0.0 <= float(v) <= 1.0}
    if bad:
        raise ArtifactError(f"config decision_thresholds {bad}: thresholds are probabilities "
                            "in [0, 1]")
    full = dict(config)
    full.setdefault("created_at", datetime.now(UTC).isoformat(timespec="seconds"))
    full["clinfuse_version"] = clinfuse_version()
    full["artifact_format_version"] = ARTIFACT_FORMAT_VERSION
    return full


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in _RESERVED_NAMES:
        raise ArtifactError(f"{what} name {name!r}: use lower-case letters, digits, '_' or '-' "
                            f"(starting with a letter), not {sorted(_RESERVED_NAMES)}")


def _safetensors_bytes(group: str, named: Mapping[str, torch.Tensor]) -> bytes:
    if not named:
        raise ArtifactError(f"tensor group {group!r} is empty")
    bad = [k for k, v in named.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ArtifactError(f"tensor group {group!r}: {bad} are not tensors")
    # clone(): safetensors refuses tensors sharing storage (tied weights, views).
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in named.items()}
    try:
        return save_safetensors_bytes(plain, metadata={
            "format": "pt", "clinfuse_group": group,
            "clinfuse_artifact_format": str(ARTIFACT_FORMAT_VERSION)})
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"tensor group {group!r}: cannot serialise ({exc})") from None


def _json_bytes(obj: Any, name: str) -> bytes:
    try:
        text = json.dumps(_jsonable(obj, name), indent=2, sort_keys=True, allow_nan=False,
                          ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{name}: {exc}") from None
    return (text + "\n").encode("utf-8")


def _jsonable(obj: Any, where: str) -> Any:
    """Plain JSON types; NaN/inf become null since JSON has no spelling for them
    (an undefined subgroup AUROC is "not reported", not a number)."""
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ArtifactError(f"{where}: key {k!r} is not a string")
            out[k] = _jsonable(v, f"{where}.{k}")
        return out
    if isinstance(obj, list | tuple):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist(), where)
    if isinstance(obj, np.generic):
        return _jsonable(obj.item(), where)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, str | bool | int):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, datetime):
        return obj.isoformat()
    raise ArtifactError(f"{where}: {type(obj).__name__} cannot be stored as JSON")


def _kind(name: str) -> str:
    if name == CONFIG_NAME:
        return "config"
    return _KIND_BY_SUFFIX[Path(name).suffix]


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes the rename durable; some filesystems refuse fsync on directories.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def clinfuse_version() -> str:
    """The installed clinfuse version, or ``"unknown"`` when running from a bare checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clinfuse")
    except PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------- load

def load_artifact(
    directory: Path,
    *,
    trusted_public_keys: Sequence[Ed25519PublicKey | bytes | Path] | None,
) -> Artifact:
    """Verify and load an artifact.

    Checks, in order: the signature of MANIFEST.json with one of
    ``trusted_public_keys`` (skipped when it is ``None``), the format and
    clinfuse major version, then that the files present are exactly those
    listed and each one's size and sha256 match. Every file is read once and
    parsed from the bytes that were hashed, so nothing can change in between.

    Raises
    ------
    ArtifactError
        Naming the file and the problem; never a parser traceback.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no such artifact directory")
    manifest_path = directory / MANIFEST_NAME
    try:
        manifest_bytes = manifest_path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{directory}: no {MANIFEST_NAME}; not a clinfuse artifact") from None

    fingerprint = None
    if trusted_public_keys is not None:
        fingerprint = _verify_signature(directory, manifest_bytes, trusted_public_keys)
    manifest = _parse_manifest(manifest_bytes)
    if fingerprint is not None and manifest.get("public_key_fingerprint") != fingerprint:
        raise ArtifactError(f"{MANIFEST_NAME}: names signing key "
                            f"{manifest.get('public_key_fingerprint')} but was signed by "
                            f"{fingerprint}")
    _check_versions(manifest)

    entries = _manifest_entries(manifest)
    on_disk = {p.name for p in directory.iterdir()} - {MANIFEST_NAME, SIGNATURE_NAME}
    missing = sorted(set(entries) - on_disk)
    if missing:
        raise ArtifactError(f"{_label(missing[0])}: listed in {MANIFEST_NAME} but missing")
    extra = sorted(on_disk - set(entries))
    if extra:
        raise ArtifactError(f"{extra[0]}: not listed in {MANIFEST_NAME}; an artifact holds "
                            "only the files its manifest lists")

    contents: dict[str, bytes] = {}
    for name, entry in entries.items():
        path = directory / name
        if not path.is_file() or path.is_symlink():
            raise ArtifactError(f"{_label(name)}: not a regular file")
        data = path.read_bytes()
        if len(data) != entry["size"]:
            raise ArtifactError(f"{_label(name)}: size {len(data)} bytes, manifest says "
                                f"{entry['size']} (truncated or replaced)")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ArtifactError(f"{_label(name)}: sha256 mismatch")
        contents[name] = data

    if CONFIG_NAME not in contents:
        raise ArtifactError(f"{MANIFEST_NAME}: does not list {CONFIG_NAME}")
    config = _parse_json(contents.pop(CONFIG_NAME), CONFIG_NAME)
    if not isinstance(config, dict):
        raise ArtifactError(f"{CONFIG_NAME}: expected an object")
    if config.get("artifact_format_version") != manifest["artifact_format_version"]:
        raise ArtifactError(f"{CONFIG_NAME}: artifact_format_version "
                            f"{config.get('artifact_format_version')!r} disagrees with "
                            f"{MANIFEST_NAME} ({manifest['artifact_format_version']})")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    documents: dict[str, Any] = {}
    for name, data in contents.items():
        stem, suffix = name.rsplit(".", 1)
        if suffix == "safetensors":
            try:
                tensors[stem] = load_safetensors_bytes(data)
            except (SafetensorError, ValueError, RuntimeError) as exc:
                raise ArtifactError(f"{_label(name)}: unreadable safetensors ({exc})") from None
        else:
            documents[stem] = _parse_json(data, name)
    return Artifact(config=config, tensors=tensors, documents=documents, path=directory,
                    public_key_fingerprint=fingerprint)


def _verify_signature(directory: Path, manifest_bytes: bytes,
                      trusted: Sequence[Ed25519PublicKey | bytes | Path]) -> str:
    if not trusted:
        raise ArtifactError("no trusted public keys configured; list the model signing "
                            "key's .pub file in the service settings")
    try:
        signature = (directory / SIGNATURE_NAME).read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{directory}: unsigned artifact (no {SIGNATURE_NAME}) and trusted "
                            "keys are configured; sign it with save_artifact(signing_key=...)"
                            ) from None
    keys = [load_public_key(k) for k in trusted]
    for key in keys:
        try:
            key.verify(signature, manifest_bytes)
        except InvalidSignature:
            continue
        return public_key_fingerprint(key)
    claimed = _claimed_fingerprint(manifest_bytes)
    raise ArtifactError(
        f"{SIGNATURE_NAME}: signature does not verify with any trusted key (manifest names "
        f"key {claimed}; trusted: {[public_key_fingerprint(k) for k in keys]}); the manifest "
        "was altered or signed by an untrusted key")


def _claimed_fingerprint(manifest_bytes: bytes) -> str:
    # Unverified, for the error message only.
    try:
        return str(json.loads(manifest_bytes).get("public_key_fingerprint"))
    except (ValueError, AttributeError):
        return "unknown"


def _parse_json(data: bytes, name: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{_label(name)}: not valid JSON ({exc})") from None


def _parse_manifest(data: bytes) -> dict[str, Any]:
    manifest = _parse_json(data, MANIFEST_NAME)
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{MANIFEST_NAME}: expected an object")
    return manifest


def _check_versions(manifest: Mapping[str, Any]) -> None:
    fmt = manifest.get("artifact_format_version")
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise ArtifactError(f"{MANIFEST_NAME}: artifact_format_version {fmt!r} is not a "
                            "positive integer")
    if fmt > ARTIFACT_FORMAT_VERSION:
        raise ArtifactError(f"artifact format {fmt} is newer than this clinfuse supports "
                            f"({ARTIFACT_FORMAT_VERSION}); upgrade clinfuse")
    ours, theirs = clinfuse_version(), str(manifest.get("clinfuse_version", "unknown"))
    ours_major, theirs_major = _major(ours), _major(theirs)
    # Unknown on either side (a bare checkout) cannot be compared; the format check stands.
    if ours_major is not None and theirs_major is not None and ours_major != theirs_major:
        raise ArtifactError(f"artifact written by clinfuse {theirs}, this is clinfuse {ours}: "
                            "major versions differ; re-export the model with this version")


def _major(version: str) -> int | None:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _manifest_entries(manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    files = manifest.get("files")
    if not isinstance(files, list):
        raise ArtifactError(f"{MANIFEST_NAME}: 'files' must be a list")
    entries: dict[str, dict[str, Any]] = {}
    for i, entry in enumerate(files):
        if not isinstance(entry, dict):
            raise ArtifactError(f"{MANIFEST_NAME}: files[{i}] is not an object")
        name = entry.get("path")
        # A plain file name only: no directories, no "..", nothing outside the artifact.
        if (not isinstance(name, str) or Path(name).name != name or name.startswith(".")
                or Path(name).suffix not in _KIND_BY_SUFFIX
                or name in (MANIFEST_NAME, SIGNATURE_NAME)):
            raise ArtifactError(f"{MANIFEST_NAME}: files[{i}] has an invalid path {name!r}")
        if not isinstance(entry.get("size"), int) or not isinstance(entry.get("sha256"), str):
            raise ArtifactError(f"{MANIFEST_NAME}: files[{i}] ({name}) lacks size or sha256")
        if name in entries:
            raise ArtifactError(f"{MANIFEST_NAME}: {name} is listed twice")
        entries[name] = entry
    return entries


def _label(name: str) -> str:
    """'weights fusion.safetensors', 'document metrics.json', 'config config.json'."""
    suffix = Path(name).suffix
    kind = "config" if name == CONFIG_NAME else _KIND_BY_SUFFIX.get(suffix, "file")
    return f"{kind} {name}"

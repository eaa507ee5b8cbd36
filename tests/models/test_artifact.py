"""Artifact round trip, and every way a tampered or broken artifact is refused."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from models import artifact as artifact_mod
from models.artifact import (
    ARTIFACT_FORMAT_VERSION,
    ArtifactError,
    generate_signing_key,
    load_artifact,
    load_public_key,
    load_signing_key,
    public_key_fingerprint,
    save_artifact,
)
from tests.models.artifact_fakes import fake_config, fake_documents, fake_tensors


@pytest.fixture(scope="module")
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def artifact_dir(tmp_path: Path, signing_key: Ed25519PrivateKey) -> Path:
    return save_artifact(tmp_path / "model-0.3.0", config=fake_config(), tensors=fake_tensors(),
                         documents=fake_documents(), signing_key=signing_key)


def _load(directory: Path, key: Ed25519PrivateKey) -> artifact_mod.Artifact:
    return load_artifact(directory, trusted_public_keys=[key.public_key()])


def _rewrite_manifest(directory: Path) -> None:
    """What an attacker without the key can do: recompute every hash and size."""
    path = directory / "MANIFEST.json"
    manifest = json.loads(path.read_bytes())
    for entry in manifest["files"]:
        data = (directory / entry["path"]).read_bytes()
        entry["sha256"] = hashlib.sha256(data).hexdigest()
        entry["size"] = len(data)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_round_trip(artifact_dir: Path, signing_key: Ed25519PrivateKey) -> None:
    art = _load(artifact_dir, signing_key)
    expected = fake_tensors()
    assert set(art.tensors) == {"fusion", "tabular_scaler"}
    for group, named in expected.items():
        for name, tensor in named.items():
            assert torch.equal(art.tensors[group][name], tensor)
    assert art.documents["calibration"] == fake_documents()["calibration"]
    # NaN has no JSON spelling: stored as null, read back as "not reported".
    assert art.documents["metrics"]["by_group"]["age_band"]["65+"]["auroc"] is None
    assert art.config["artifact_format_version"] == ARTIFACT_FORMAT_VERSION
    assert art.config["model_name"] == "deterioration-fusion"
    assert {"created_at", "clinfuse_version"} <= set(art.config)
    assert art.public_key_fingerprint == public_key_fingerprint(signing_key)
    assert art.path == artifact_dir

    manifest = json.loads((artifact_dir / "MANIFEST.json").read_bytes())
    assert manifest["public_key_fingerprint"] == public_key_fingerprint(signing_key)
    assert {e["path"] for e in manifest["files"]} == {
        "config.json", "fusion.safetensors", "tabular_scaler.safetensors",
        "feature_spec.json", "calibration.json", "metrics.json", "training_data.json"}
    assert sorted(p.name for p in artifact_dir.parent.iterdir()) == ["model-0.3.0"]


def test_edited_weight_is_refused_by_hash(artifact_dir: Path,
                                          signing_key: Ed25519PrivateKey) -> None:
    _flip_last_byte(artifact_dir / "fusion.safetensors")
    with pytest.raises(ArtifactError, match=r"weights fusion\.safetensors: sha256 mismatch"):
        _load(artifact_dir, signing_key)


def test_edited_weight_with_recomputed_manifest_is_refused_by_signature(
        artifact_dir: Path, signing_key: Ed25519PrivateKey) -> None:
    _flip_last_byte(artifact_dir / "fusion.safetensors")
    _rewrite_manifest(artifact_dir)
    with pytest.raises(ArtifactError, match="signature does not verify with any trusted key"):
        _load(artifact_dir, signing_key)
    # Without signature checking, the forged manifest would have passed: that is the point.
    load_artifact(artifact_dir, trusted_public_keys=None)


def test_missing_file(artifact_dir: Path, signing_key: Ed25519PrivateKey) -> None:
    (artifact_dir / "calibration.json").unlink()
    with pytest.raises(ArtifactError, match=r"document calibration\.json: listed in "
                                            r"MANIFEST\.json but missing"):
        _load(artifact_dir, signing_key)


def test_extra_file(artifact_dir: Path, signing_key: Ed25519PrivateKey) -> None:
    (artifact_dir / "backdoor.safetensors").write_bytes(b"x")
    with pytest.raises(ArtifactError, match=r"backdoor\.safetensors: not listed"):
        _load(artifact_dir, signing_key)


def test_wrong_key(artifact_dir: Path) -> None:
    other = Ed25519PrivateKey.generate()
    with pytest.raises(ArtifactError, match="signature does not verify with any trusted key"):
        _load(artifact_dir, other)


def test_no_trusted_keys_and_unsigned(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    unsigned = save_artifact(tmp_path / "u", config=fake_config(), tensors=fake_tensors(),
                             documents={}, signing_key=None)
    assert load_artifact(unsigned, trusted_public_keys=None).public_key_fingerprint is None
    with pytest.raises(ArtifactError, match="unsigned artifact"):
        _load(unsigned, signing_key)
    with pytest.raises(ArtifactError, match="no trusted public keys configured"):
        load_artifact(unsigned, trusted_public_keys=[])


def test_newer_format_version(artifact_dir: Path, signing_key: Ed25519PrivateKey) -> None:
    # A genuine artifact from a future clinfuse: signed properly, but format 2.
    path = artifact_dir / "MANIFEST.json"
    manifest = json.loads(path.read_bytes())
    manifest["artifact_format_version"] = 2
    path.write_bytes(json.dumps(manifest).encode())
    (artifact_dir / "MANIFEST.sig").write_bytes(signing_key.sign(path.read_bytes()))
    with pytest.raises(ArtifactError, match=r"artifact format 2 is newer than this clinfuse "
                                            r"supports \(1\)"):
        _load(artifact_dir, signing_key)


def test_clinfuse_major_mismatch(artifact_dir: Path, signing_key: Ed25519PrivateKey,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(artifact_mod, "clinfuse_version", lambda: "7.0.0")
    with pytest.raises(ArtifactError, match="major versions differ"):
        _load(artifact_dir, signing_key)


def test_truncated_safetensors(artifact_dir: Path, signing_key: Ed25519PrivateKey) -> None:
    path = artifact_dir / "fusion.safetensors"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ArtifactError, match=r"weights fusion\.safetensors: size 40 bytes"):
        _load(artifact_dir, signing_key)
    # Even if the manifest (and signature) matched the truncated file, parsing refuses it
    # with an ArtifactError, not a safetensors traceback.
    _rewrite_manifest(artifact_dir)
    manifest = artifact_dir / "MANIFEST.json"
    (artifact_dir / "MANIFEST.sig").write_bytes(signing_key.sign(manifest.read_bytes()))
    with pytest.raises(ArtifactError, match=r"weights fusion\.safetensors: unreadable"):
        _load(artifact_dir, signing_key)


def test_save_refuses_bad_input(tmp_path: Path) -> None:
    config = fake_config()
    del config["outcome"]
    with pytest.raises(ArtifactError, match=r"config is missing \['outcome'\]"):
        save_artifact(tmp_path / "a", config=config, tensors={}, documents={}, signing_key=None)
    with pytest.raises(ArtifactError, match="kind must be one of"):
        save_artifact(tmp_path / "a", config=fake_config(feature_source={"kind": "csv"}),
                      tensors={}, documents={}, signing_key=None)
    with pytest.raises(ArtifactError, match=r"document name '\.\./x'"):
        save_artifact(tmp_path / "a", config=fake_config(), tensors={},
                      documents={"../x": {}}, signing_key=None)
    with pytest.raises(ArtifactError, match=r"metrics\.json\.when: object cannot be stored"):
        save_artifact(tmp_path / "a", config=fake_config(), tensors={},
                      documents={"metrics": {"when": object()}}, signing_key=None)
    # Nothing half-written is left behind.
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_existing_directory(artifact_dir: Path) -> None:
    with pytest.raises(ArtifactError, match="already exists"):
        save_artifact(artifact_dir, config=fake_config(), tensors={}, documents={},
                      signing_key=None)


def test_crash_mid_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = artifact_mod._write_synced

    def failing(path: Path, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(artifact_mod, "_write_synced", failing)
    with pytest.raises(OSError, match="disk full"):
        save_artifact(tmp_path / "m", config=fake_config(), tensors=fake_tensors(),
                      documents=fake_documents(), signing_key=None)
    assert list(tmp_path.iterdir()) == []


def test_key_files(tmp_path: Path) -> None:
    key_path = tmp_path / "keys" / "model-signing.pem"
    key_path.parent.mkdir()
    key = generate_signing_key(key_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    pub_path = tmp_path / "keys" / "model-signing.pem.pub"
    fingerprint = public_key_fingerprint(key)
    assert public_key_fingerprint(load_signing_key(key_path)) == fingerprint
    assert public_key_fingerprint(load_signing_key(key_path.read_text())) == fingerprint
    assert public_key_fingerprint(load_public_key(pub_path)) == fingerprint
    with pytest.raises(ArtifactError, match="refusing to overwrite"):
        generate_signing_key(key_path)
    with pytest.raises(ArtifactError, match="not a readable PEM private key"):
        load_signing_key(pub_path)

    # Signing with a key path, trusting the .pub path: what the service configuration does.
    art_dir = save_artifact(tmp_path / "m", config=fake_config(), tensors=fake_tensors(),
                            documents={}, signing_key=key_path)
    art = load_artifact(art_dir, trusted_public_keys=[Ed25519PrivateKey.generate().public_key(),
                                                      pub_path])
    assert art.public_key_fingerprint == fingerprint

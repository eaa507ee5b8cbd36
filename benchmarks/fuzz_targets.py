"""The five fuzzed readers, their seed corpora, and what counts as an acceptable outcome.

Each :class:`Target` loads its seeds from the shared real samples (read in place, with
:data:`~benchmarks.fuzz_mutations.MARKER` planted in patient-name fields), writes one
mutated input per case into a scratch folder, and calls the reader the command line
uses on it. :func:`run_case` classifies what happened:

``ok``
    The reader returned.
``refused``
    It raised the project's own error for bad input (``accepted``), naming the file,
    without the planted marker.
``traceback``
    Any other exception (KeyError, RecursionError, MemoryError, a library's own error...).
``unlocated`` / ``leak``
    An accepted error that does not name the input, or whose text (or a warning on a
    returned record) contains the marker, i.e. a patient's value.

``harness``
    The mutator itself failed to make the input (a bug here, not in the reader).

``hang`` and ``crash`` are assigned by :mod:`benchmarks.fuzz_isolation`, which runs cases
in a separate process under a time and memory bound.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import tempfile
import time
import traceback
import weakref
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.fuzz_image_mutations import (
    mutate_dicom,
    mutate_nifti_header,
    plant_dicom_marker,
    plant_nifti_marker,
)
from benchmarks.fuzz_mutations import (
    MARKER,
    mutate_csv,
    mutate_hl7,
    mutate_json,
    mutate_ndjson,
    mutate_yaml,
)

__all__ = ["FORMATS", "SHARED", "Outcome", "Target", "case_rng", "make_target", "run_case"]

#: Same location rule as tests/shared_data.py.
SHARED = Path(os.environ.get("CLINFUSE_SHARED_DATA", "/work/shared/data"))
FORMATS = ("fhir", "hl7v2", "dicom", "nifti", "manifest")
FAILURES = ("traceback", "hang", "crash", "unlocated", "leak", "harness")

Thunk = Callable[[], list[str]]


@dataclass
class Outcome:
    """What one mutated input did."""

    index: int
    kind: str
    mutation: str
    error_type: str | None = None
    #: The error's location (its first line), or a traceback's innermost frames.
    where: str | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def case_rng(fmt: str, seed: int, index: int) -> random.Random:
    """The generator for one input: string seeds hash with SHA-512, stable across runs."""
    return random.Random(f"clinfuse-fuzz/{fmt}/{seed}/{index}")


class Target:
    """A reader under fuzz: seeds, one case per call, and its accepted error types."""

    name = ""
    accepted: tuple[type[BaseException], ...] = ()

    def prepare(self) -> None:
        """Load the seed corpus (once per worker)."""

    def case(self, rng: random.Random, folder: Path) -> tuple[str, Thunk]:
        """Write one mutated input under ``folder``; return its description and the call."""
        raise NotImplementedError

    def located(self, exc: BaseException, folder: Path) -> bool:
        """Does the error name the input (the file or folder it came from)?"""
        return getattr(exc, "source", None) is not None and str(folder) in str(exc)


def _files(sub: str, pattern: str = "*") -> list[Path]:
    root = SHARED / sub
    if not root.is_dir():
        raise FileNotFoundError(f"shared samples not found at {root}")
    return sorted(p for p in root.rglob(pattern) if p.is_file())


def _pick(rng: random.Random, seeds: list[Any], weights: list[float] | None = None) -> Any:
    return rng.choices(seeds, weights=weights)[0] if weights else rng.choice(seeds)


def _warnings_of(records: list[Any]) -> list[str]:
    return [str(w) for r in records for w in getattr(r, "warnings", [])]


# --------------------------------------------------------------------------- FHIR


def _plant_fhir(node: Any) -> Any:
    if isinstance(node, dict):
        if node.get("resourceType") == "Patient" and "name" in node:
            node["name"] = [{"use": "official", "family": MARKER, "given": [MARKER]}]
        for value in node.values():
            _plant_fhir(value)
    elif isinstance(node, list):
        for value in node:
            _plant_fhir(value)
    return node


class FhirTarget(Target):
    """``clinfuse records``: :func:`fhir_adapters.sources.read_file` on JSON and NDJSON."""

    name = "fhir"

    def prepare(self) -> None:
        from fhir_adapters.errors import IngestError

        self.accepted = (IngestError,)
        self.json_seeds: list[bytes] = []
        resources: list[dict[str, Any]] = []
        for path in _files("fhir", "*.json"):
            try:
                doc = _plant_fhir(json.loads(path.read_bytes()))
            except ValueError:
                continue
            self.json_seeds.append(json.dumps(doc).encode())
            if isinstance(doc, dict) and doc.get("resourceType") not in (None, "Bundle"):
                resources.append(doc)
            elif isinstance(doc, dict) and "synthea" in str(path) and len(resources) < 2_000:
                resources.extend(e["resource"] for e in doc.get("entry", [])[:150]
                                 if isinstance(e, dict) and "resource" in e)
        # The shared data hold no bulk export: NDJSON seeds are its resources one per line.
        self.ndjson_seeds = [
            b"\n".join(json.dumps(r).encode() for r in resources[start:start + size]) + b"\n"
            for start, size in ((0, 40), (40, 80), (160, 200), (len(resources) - 150, 150))]
        # Synthea bundles are ~1.4 MB; draw them less often so the run stays broad.
        self.json_weights = [0.25 if len(s) > 300_000 else 1.0 for s in self.json_seeds]

    def case(self, rng: random.Random, folder: Path) -> tuple[str, Thunk]:
        from fhir_adapters.sources import read_file

        if rng.random() < 0.7:
            seed = _pick(rng, self.json_seeds, self.json_weights)
            data, what = mutate_json(seed, rng, rng.choice(self.json_seeds))
            suffix = rng.choice((".json", ".json", ".json", ""))
        else:
            seed = rng.choice(self.ndjson_seeds)
            data, what = mutate_ndjson(seed, rng, rng.choice(self.ndjson_seeds))
            suffix = rng.choice((".ndjson", ".ndjson", ".jsonl", "", ".ndjson.gz"))
        if suffix.endswith(".gz"):
            data = gzip.compress(data, mtime=0)
        path = folder / f"input{suffix}"
        path.write_bytes(data)
        return f"{path.name}: {what}", lambda: _warnings_of(read_file(path))


# --------------------------------------------------------------------------- HL7 v2


def _plant_hl7(text: str) -> str:
    segments = text.replace("\r\n", "\r").replace("\n", "\r").split("\r")
    for i, segment in enumerate(segments):
        fields = segment.split("|")
        if fields[0] in ("PID", "NK1") and len(fields) > 5:
            fields[5] = f"{MARKER}^{MARKER}"
            segments[i] = "|".join(fields)
    return "\r".join(segments)


class Hl7Target(Target):
    """The HL7 v2 reader behind ``clinfuse records``: fast parser, FHIR mapping, records."""

    name = "hl7v2"

    def prepare(self) -> None:
        from fhir_adapters.errors import IngestError

        self.accepted = (IngestError,)
        self.seeds = [_plant_hl7(p.read_bytes().decode("utf-8", "replace")).encode()
                      for p in _files("hl7v2", "*.hl7")]

    def case(self, rng: random.Random, folder: Path) -> tuple[str, Thunk]:
        from fhir_adapters.sources import read_file

        data, what = mutate_hl7(rng.choice(self.seeds), rng, rng.choice(self.seeds))
        path = folder / rng.choice(("input.hl7", "input.hl7", "input"))
        path.write_bytes(data)
        return f"{path.name}: {what}", lambda: _warnings_of(read_file(path))


# --------------------------------------------------------------------------- DICOM

# Small series: one file of each is mutated, the others are linked in unchanged.
_SERIES = ("dicom2nifti_testdata/hitachi/anatomical/001",
           "dicom2nifti_testdata/generic/rgb/001",
           "dicom2nifti_testdata/generic/compressed_rle/001",
           "dicom2nifti_testdata/generic/compressed_jpeg/001",
           "dicom2nifti_testdata/generic/compressed_j2k/001",
           "dicom2nifti_testdata/generic/compressed_jpegls/001",
           "dicom2nifti_testdata/generic/anatomical/001_implicit",
           "pydicom_test_files/dicomdirtests/98892001/CT5N",
           "pydicom_test_files/dicomdirtests/98892003/MR700",
           "pydicom_test_files/dicomdirtests/77654033/CT2")


class DicomTarget(Target):
    """``clinfuse dicom2nifti``: :func:`pipelines.imaging.convert.dicom_to_nifti` on a file,
    a series folder (one file mutated) or a zip of the series."""

    name = "dicom"

    def prepare(self) -> None:
        from pipelines.imaging.volume import ImageError

        self.accepted = (ImageError,)
        paths = [p for p in _files("dicom") if not p.name.endswith((".nii", ".nii.gz"))]
        self.files = {p: plant_dicom_marker(p.read_bytes()) for p in paths}
        self.singles = [p for p in paths if p.stat().st_size < 600_000]
        self.series = [sorted(p for p in (SHARED / "dicom" / s).iterdir() if p.is_file())
                       for s in _SERIES if (SHARED / "dicom" / s).is_dir()]

    def case(self, rng: random.Random, folder: Path) -> tuple[str, Thunk]:
        from pipelines.imaging.convert import dicom_to_nifti

        out = folder / "out.nii"
        roll = rng.random()
        if roll < 0.55 or not self.series:
            seed = rng.choice(self.singles)
            data, what = mutate_dicom(self.files[seed], rng, self.files[rng.choice(self.singles)])
            src = folder / seed.name
            src.write_bytes(data)
            return f"{seed.relative_to(SHARED)}: {what}", lambda: _run(dicom_to_nifti, src, out)
        files = rng.choice(self.series)
        victim = rng.randrange(len(files))
        data, what = mutate_dicom(self.files[files[victim]], rng,
                                  self.files[files[(victim + 1) % len(files)]])
        series = folder / "series"
        series.mkdir()
        name = f"{files[victim].parent.relative_to(SHARED)} file {victim}: {what}"
        if roll < 0.95:
            for k, path in enumerate(files):
                if k == victim:
                    (series / path.name).write_bytes(data)
                else:
                    (series / path.name).symlink_to(path)
            return name, lambda: _run(dicom_to_nifti, series, out)
        archive = folder / "series.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for k, path in enumerate(files):
                zf.writestr(path.name, data if k == victim else self.files[path])
        return name + " (zipped)", lambda: _run(dicom_to_nifti, archive, out)


def _run(convert: Callable[..., Any], src: Path, out: Path) -> list[str]:
    convert(src, out)
    return []


# --------------------------------------------------------------------------- NIfTI


class NiftiTarget(Target):
    """:func:`pipelines.imaging.nifti.load_nifti` on .nii, .nii.gz and .hdr/.img pairs."""

    name = "nifti"

    def prepare(self) -> None:
        from pipelines.imaging.volume import ImageError

        self.accepted = (ImageError,)
        # (file name, uncompressed bytes, gzipped?)
        self.seeds: list[tuple[str, bytes, bool]] = []
        for path in _files("nifti"):
            name = path.name
            raw = path.read_bytes()
            if name.endswith(".gz"):
                self.seeds.append((name[:-3], plant_nifti_marker(gzip.decompress(raw)), True))
            elif name.endswith((".nii", ".hdr")):
                self.seeds.append((name, plant_nifti_marker(raw), False))

    def case(self, rng: random.Random, folder: Path) -> tuple[str, Thunk]:
        from pipelines.imaging.nifti import load_nifti

        name, raw, gzipped = rng.choice(self.seeds)
        data, what = mutate_nifti_header(raw, rng, rng.choice(self.seeds)[1])
        path = folder / name
        if name.endswith(".hdr"):
            # The samples ship headers without their images: give the pair an image whose
            # size follows the unmutated header, so a mutated dim disagrees with it.
            path.write_bytes(data)
            path.with_suffix(".img").write_bytes(bytes(_pair_image_size(raw)))
        elif gzipped or rng.random() < 0.2:
            packed = bytearray(gzip.compress(data, compresslevel=1, mtime=0))
            if rng.random() < 0.15:  # a damaged stream: truncated or with a flipped byte
                cut = rng.randrange(10, len(packed))
                if rng.random() < 0.5:
                    packed = packed[:cut]
                else:
                    packed[cut] ^= 0xFF
                what += "; gzip stream damaged"
            path = folder / (name + ".gz")
            path.write_bytes(bytes(packed))
        else:
            path.write_bytes(data)
        return f"{path.name}: {what}", lambda: _loaded(load_nifti, path)


def _pair_image_size(header: bytes) -> int:
    import numpy as np

    from benchmarks.fuzz_image_mutations import nifti_header_layout

    layout = nifti_header_layout(header)
    if layout is None:
        return 0
    fields = np.frombuffer(header[:layout[1]], dtype=layout[0])[0]
    dims = [max(int(d), 1) for d in fields["dim"][1:int(fields["dim"][0]) + 1]]
    return min(int(np.prod(dims)) * max(int(fields["bitpix"]), 8) // 8, 4_000_000)


def _loaded(load: Callable[[Path], Any], path: Path) -> list[str]:
    load(path)
    return []


# --------------------------------------------------------------------------- manifest

_MANIFEST_HEADER = ["example_id", "patient_id", "label", "index_time", "image", "note_path",
                    "note", "age", "lactate", "sex", "race"]


def _manifest_rows() -> list[list[str]]:
    rows = []
    for i in range(6):
        rows.append([f"e{i}", f"{MARKER}-{i}", str(i % 2), f"2024-03-0{i + 1}T08:00:00Z",
                     f"images/{i}.png" if i % 3 else "", f"notes/{i}.txt" if i % 2 else "",
                     f"Seen today, {MARKER} reports pain." if i % 2 == 0 else "",
                     str(40 + i), "" if i == 3 else f"{1.5 + i / 10:.1f}", "FM"[i % 2],
                     ("white", "black", "asian")[i % 3]])
    return rows


class ManifestTarget(Target):
    """:func:`pipelines.manifest.read_manifest`, then the accessors that read notes and images.

    The shared data hold no manifest, so the seed is built here: six examples with images,
    note files, inline notes, features and a YAML sidecar naming sensitive columns.
    """

    name = "manifest"

    def prepare(self) -> None:
        import csv
        import io

        import yaml

        from pipelines.manifest import ManifestError

        self.accepted = (ManifestError,)
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([_MANIFEST_HEADER, *_manifest_rows()])
        self.csv_seed = out.getvalue().encode()
        self.yaml_seed = yaml.safe_dump({
            "sensitive": ["sex", "race"], "categorical": ["sex", "race"],
            "include_sensitive": False,
            "outcome": {"name": "deterioration", "horizon_hours": 48}}).encode()
        # Images and notes are never mutated: written once, linked into every case.
        self.files = Path(tempfile.mkdtemp(prefix="clinfuse-fuzz-manifest-"))
        weakref.finalize(self, shutil.rmtree, self.files, True)
        (self.files / "images").mkdir()
        (self.files / "notes").mkdir()
        for i in range(6):
            (self.files / "images" / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n")
            (self.files / "notes" / f"{i}.txt").write_text(f"Note for {MARKER}: stable.\n")

    def case(self, rng: random.Random, folder: Path) -> tuple[str, Thunk]:
        from pipelines.manifest import read_manifest

        (folder / "images").symlink_to(self.files / "images")
        (folder / "notes").symlink_to(self.files / "notes")
        csv_data, yaml_data, steps = self.csv_seed, self.yaml_seed, []
        roll = rng.random()
        if roll < 0.75:
            csv_data, what = mutate_csv(csv_data, rng)
            steps.append(what)
        if roll >= 0.6:
            yaml_data, what = mutate_yaml(yaml_data, rng)
            steps.append(what)
        path = folder / "manifest.csv"
        path.write_bytes(csv_data)
        if rng.random() < 0.95:
            path.with_suffix(".yaml").write_bytes(yaml_data)
        else:
            steps.append("no sidecar")

        def read() -> list[str]:
            manifest = read_manifest(path)
            manifest.notes()
            manifest.image_paths()
            manifest.modalities_present()
            manifest.features()
            return []

        return "; ".join(steps), read

    def located(self, exc: BaseException, folder: Path) -> bool:
        return str(folder) in str(exc)


_TARGETS: dict[str, type[Target]] = {"fhir": FhirTarget, "hl7v2": Hl7Target,
                                     "dicom": DicomTarget, "nifti": NiftiTarget,
                                     "manifest": ManifestTarget}


def make_target(fmt: str) -> Target:
    """A prepared target for ``fmt``: one of :data:`FORMATS`, or ``"module:Class"`` (the
    harness's own tests use scripted targets)."""
    if ":" in fmt:
        import importlib

        module, _, name = fmt.partition(":")
        target: Target = getattr(importlib.import_module(module), name)()
    else:
        target = _TARGETS[fmt]()
    target.prepare()
    return target


def _frames(exc: BaseException) -> str:
    """The innermost frames of a traceback, project frames first named."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/site-packages/" not in f.filename]
    shown = (ours[-1:] if ours else []) + frames[-1:]
    text = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(shown))
    return text


def run_case(target: Target, fmt: str, seed: int, index: int, scratch: Path,
             on_start: Callable[[str], None] | None = None) -> Outcome:
    """Generate input ``index`` of ``(fmt, seed)`` in a fresh scratch folder, run, classify."""
    folder = scratch / "case"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    try:
        description, thunk = target.case(case_rng(fmt, seed, index), folder)
    except Exception as exc:
        return Outcome(index, "harness", "(not generated)", type(exc).__name__, _frames(exc))
    if on_start is not None:
        on_start(description)
    started = time.perf_counter()
    try:
        texts = thunk()
    except target.accepted as exc:
        seconds = time.perf_counter() - started
        message = str(exc)
        kind = "leak" if MARKER in message else (
            "refused" if target.located(exc, folder) else "unlocated")
        where = message.replace(str(folder), "<input>").splitlines()[0][:300] if message else ""
        return Outcome(index, kind, description, type(exc).__name__,
                       where if kind != "leak" else where.replace(MARKER, "<MARKER>"), seconds)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # anything else is what the fuzzer is looking for (Rust
        # decoders' PanicException derives from BaseException)
        return Outcome(index, "traceback", description, type(exc).__name__, _frames(exc),
                       time.perf_counter() - started)
    seconds = time.perf_counter() - started
    leaked = [t for t in texts if MARKER in t]
    if leaked:
        return Outcome(index, "leak", description, "warning", leaked[0].replace(
            MARKER, "<MARKER>")[:300], seconds)
    return Outcome(index, "ok", description, seconds=seconds)

"""The ``clinfuse`` command line."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("clinfuse")


def _records(args: argparse.Namespace) -> int:
    from fhir_adapters.sources import read_sources

    report = read_sources([Path(p) for p in args.paths], strict=args.strict,
                          max_decompressed=args.max_decompressed << 20)
    # stdout carries only the JSON lines, so it can be piped; everything else is stderr.
    for record in report.records:
        view = record.as_of(args.as_of) if args.as_of else record
        sys.stdout.write(json.dumps(view.to_json(), ensure_ascii=False) + "\n")
    sys.stderr.writelines(line + "\n" for line in report.stderr_lines())
    return report.exit_code(strict=args.strict)


def _synth(args: argparse.Namespace) -> int:
    from pipelines.synth import generate_cohort

    summary = generate_cohort(args.patients, Path(args.out), seed=args.seed, bias=args.bias,
                              n_slices=args.slices, size=args.size, workers=args.workers,
                              progress=not args.quiet, realism=args.realism)
    sys.stdout.write(summary.to_text() + "\n")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from services.demo import prepare_service, serve_demo

    demo = prepare_service(Path(args.out), patients=args.patients, seed=args.seed)
    if not args.no_serve:
        serve_demo(demo, host=args.host, port=args.port)
    return 0


def _db_upgrade(args: argparse.Namespace) -> int:
    from services.core.config import get_settings
    from services.db import make_engine, migrate

    url = args.database_url or get_settings().database_url
    migrate(make_engine(url))
    sys.stderr.write("database schema is up to date\n")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from services.app import create_app
    from services.core.config import Settings
    from services.http_protocol import protocol_with_header_deadline
    from services.observability import configure_logging

    overrides = {k: v for k, v in {"host": args.host, "port": args.port,
                                   "database_url": args.database_url}.items() if v is not None}
    if args.dicom_port is not None:
        overrides |= {"dicom_scp_enabled": True, "dicom_port": args.dicom_port}
    if args.mllp_port is not None:
        overrides |= {"mllp_enabled": True, "mllp_port": args.mllp_port}
    if args.model is not None:
        overrides["model_path"] = Path(args.model)
    if args.trusted_key:
        overrides["model_trusted_keys"] = [Path(k) for k in args.trusted_key]
    settings = Settings(**overrides)
    configure_logging(settings.log_level)
    # Verify the model before the server starts, so a missing or corrupted artifact is
    # one clear line and exit status 2, not a lifespan traceback.
    from services.prediction import ModelLoadError, PredictionService

    try:
        PredictionService.from_settings(settings)
    except ModelLoadError as exc:
        sys.stderr.write(f"clinfuse serve: cannot start: {exc}\n")
        return 2
    tls = settings.http_tls and settings.tls_certfile is not None
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                http=protocol_with_header_deadline(settings.request_header_timeout_s),
                log_config=None, access_log=False,
                ssl_certfile=settings.tls_certfile if tls else None,
                ssl_keyfile=settings.tls_keyfile if tls else None)
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from services.core.config import Settings
    from services.db import make_engine, migrate, session_factory
    from services.dicom_store import DicomStore
    from services.dimse import Peer, fetch_dicomweb, find_studies, move_study

    settings = Settings()
    engine = make_engine(settings.database_url)
    migrate(engine)
    store = DicomStore(settings.dicom_storage_dir, session_factory(engine),
                       limits=settings.dicom_limits())
    if args.dicomweb:
        results = fetch_dicomweb(args.dicomweb, args.patient, store)
        failed = [r for r in results if not r.ok]
        sys.stderr.write(f"{len(results) - len(failed)} instance(s) stored, "
                         f"{len(failed)} failed\n")
        return 1 if failed else 0
    host, port, aet = args.dimse.rsplit(":", 2)
    peer = Peer(host, int(port), aet)
    studies = find_studies(peer, args.patient, calling_aet=settings.dicom_ae_title)
    for study in studies:
        move_study(peer, study, settings.dicom_ae_title, calling_aet=settings.dicom_ae_title)
    sys.stderr.write(f"{len(studies)} study(ies) moved to {settings.dicom_ae_title}\n")
    return 0


def _one_line(body: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """An imaging or model command whose every failure is one line on stderr and exit 1.

    The command bodies print their expected failures themselves (ImageError, ManifestError,
    ...). Anything else is a decoder or library fault whose message may quote header or
    patient values, so only its type and where it was raised are shown (the traceback
    goes to the debug log, ``--verbose``).
    """
    @functools.wraps(body)
    def run(args: argparse.Namespace) -> int:
        try:
            return body(args)
        except Exception as exc:
            from services.jobs import located_error

            log.debug("clinfuse %s failed", args.command, exc_info=True)
            if isinstance(exc, OSError) and exc.strerror:
                reason = f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
            else:
                reason = f"unexpected {located_error(exc)}"
            sys.stderr.write(f"clinfuse {args.command}: {reason}\n")
            return 1
    return run


@_one_line
def _dicom2nifti(args: argparse.Namespace) -> int:
    from pipelines.imaging.convert import main_dicom2nifti

    return main_dicom2nifti(Path(args.src), Path(args.out), resample=args.resample)


@_one_line
def _series(args: argparse.Namespace) -> int:
    from pipelines.imaging.selection import main_series

    return main_series(Path(args.src), Path(args.rules) if args.rules else None)


def _deid(args: argparse.Namespace) -> int:
    from pipelines.imaging.deid import main_deid

    return main_deid(Path(args.src), Path(args.dst), args.salt,
                     on_burned_in="flag" if args.flag_burned_in else "refuse")


@_one_line
def _train(args: argparse.Namespace) -> int:
    from pipelines.training import main_train

    return main_train(args.manifest, args.out, seed=args.seed, epochs=args.epochs,
                      device=args.device, config_path=args.config, signing_key=args.signing_key)


def _evaluate(args: argparse.Namespace) -> int:
    ways = [args.model is not None, args.cv is not None, args.train_manifest is not None]
    if sum(ways) != 1:
        sys.stderr.write("clinfuse evaluate: give one of --model (a trained artifact), --cv K "
                         "(cross-validate training) or --train-manifest (train on one "
                         "cohort, test on --manifest)\n")
        return 2
    if args.train_manifest is not None and (args.split != "grouped" or args.repeats != 1):
        sys.stderr.write("clinfuse evaluate: --train-manifest is one split; --split and "
                         "--repeats go with --cv\n")
        return 2
    if args.cv is not None or args.train_manifest is not None:
        from pipelines.cross_validation import main_evaluate_cv

        return main_evaluate_cv(args.manifest, args.out, k=args.cv or 1, repeats=args.repeats,
                                split="external" if args.train_manifest else args.split,
                                n_boot=args.n_boot, seed=args.seed, config_path=args.config,
                                device=None if args.device == "auto" else args.device,
                                cache_dir=args.cache_dir, train_manifest=args.train_manifest)
    if args.repeats != 1 or args.split != "grouped" or args.config or args.cache_dir:
        sys.stderr.write("clinfuse evaluate: --repeats, --split, --config and --cache-dir "
                         "go with --cv or --train-manifest\n")
        return 2
    from pipelines.evaluate_model import main_evaluate

    return main_evaluate(args.model, args.manifest, args.out, args.n_boot,
                         trusted_keys=args.trusted_key, device=args.device, seed=args.seed)


@_one_line
def _score(args: argparse.Namespace) -> int:
    from pipelines.scoring import main_score

    return main_score(args.model, args.manifest, args.out, trusted_keys=args.trusted_key,
                      device=args.device)


def _audit(args: argparse.Namespace) -> int:
    from audits.cli import main_audit, main_compare

    if args.scores is None and args.compare:
        if len(args.compare) != 2:
            sys.stderr.write("clinfuse audit compare: give two audit folders\n")
            return 2
        return main_compare(args.compare[0], args.compare[1])
    if args.scores is None:
        sys.stderr.write("clinfuse audit: --scores is required (or: audit compare A B)\n")
        return 2
    sensitive = [s for s in args.sensitive.split(",") if s] if args.sensitive else None
    return main_audit(args.scores, sensitive, args.out, args.run_by,
                      manifest_sidecar=args.manifest_sidecar, n_boot=args.n_boot,
                      min_group_size=args.min_group_size, multiplicity=args.multiplicity,
                      threshold=_audit_threshold(args.threshold, Path(args.scores)))


def _audit_threshold(choice: str, scores: Path) -> float | str:
    """A number, a column name, or (auto) the score file's own threshold column."""
    try:
        return float(choice)
    except ValueError:
        pass
    if choice != "auto":
        return choice
    try:
        header = scores.open(encoding="utf-8").readline().strip().split(",")
    except OSError:
        return "threshold"  # the audit reports the unreadable file itself
    # `clinfuse score` writes threshold_<name>; the high-risk one is the actionable decision.
    for name in ("threshold", "threshold_high_risk"):
        if name in header:
            return name
    return next((h for h in header if h.startswith("threshold_")), "threshold")


def _explain(args: argparse.Namespace) -> int:
    from pipelines.explain import main_explain

    return main_explain(args.model, args.manifest, args.out, example_id=args.example,
                        patient_id=args.patient, trusted_keys=args.trusted_key,
                        device=args.device)


def _service_store(database_url: str | None) -> tuple[Any, Any]:
    """Settings, and a session factory on the migrated database (``--database-url`` wins)."""
    from services.core.config import Settings
    from services.db import make_engine, migrate, session_factory

    settings = Settings(database_url=database_url) if database_url else Settings()
    engine = make_engine(settings.database_url)
    migrate(engine)
    return settings, session_factory(engine)


def _verify_access_log(args: argparse.Namespace) -> int:
    from models.artifact import load_signing_key
    from services.access_log import verify_chain

    settings, sessions = _service_store(args.database_url)
    if args.public_key:
        key: object = Path(args.public_key)
    else:
        private = settings.keys_dir / "access-log-ed25519.pem"
        if not private.exists():
            sys.stderr.write(f"clinfuse verify-access-log: no --public-key and no signing key "
                             f"at {private}; pass the checkpoint public key (PEM)\n")
            return 2
        key = load_signing_key(private).public_key()
    exported = (Path(args.checkpoint_file) if args.checkpoint_file
                else settings.access_log_checkpoint_file)
    with sessions() as session:
        report = verify_chain(session, key, exported=exported)  # type: ignore[arg-type]
    if report.ok:
        tail = ("" if report.last_checkpoint_seq is None
                else f", last checkpoint at entry {report.last_checkpoint_seq}")
        sys.stdout.write(f"access log OK: {report.entries} entries, {report.checkpoints} "
                         f"signed checkpoint(s){tail}\n")
        return 0
    sys.stdout.write(f"access log FAILED verification ({report.entries} entries, "
                     f"{report.checkpoints} checkpoint(s)):\n")
    for problem in report.problems:
        sys.stdout.write(f"  - {problem}\n")
    return 1


def _read_password(args: argparse.Namespace) -> str:
    import getpass

    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise ValueError("no terminal to prompt on; pipe the password with --password-stdin")
    first = getpass.getpass(f"password for {args.username}: ")
    if getpass.getpass("again: ") != first:
        raise ValueError("the passwords differ")
    return first


def _users_add(args: argparse.Namespace) -> int:
    from services.auth.backend_services import add_user
    from services.auth.principal import Role

    password = _read_password(args)
    _, sessions = _service_store(args.database_url)
    with sessions.begin() as session:
        add_user(session, args.username, password, Role(args.role),
                 display_name=args.display_name)
    sys.stderr.write(f"user {args.username!r} saved with role {args.role}\n")
    return 0


def _clients_add(args: argparse.Namespace) -> int:
    from services.auth.backend_services import register_client
    from services.auth.principal import Role

    try:
        jwks = json.loads(Path(args.jwks).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{args.jwks}: not JSON (line {exc.lineno})") from None
    _, sessions = _service_store(args.database_url)
    with sessions.begin() as session:
        row = register_client(session, args.client_id, jwks, Role(args.role),
                              **({"scope": args.scope} if args.scope else {}))
        scope = row.scope
    sys.stderr.write(f"client {args.client_id!r} registered: role {args.role}, "
                     f"{len(jwks['keys'])} key(s), scope {scope!r}\n")
    return 0


def _cohort_export(args: argparse.Namespace) -> int:
    from services.cohort_export import OutcomeDefinition, export_cohort

    outcome = (OutcomeDefinition.from_yaml(args.outcome) if Path(args.outcome).is_file()
               else OutcomeDefinition.from_config(args.outcome))
    settings, sessions = _service_store(args.database_url)
    with sessions() as session:
        result = export_cohort(session, None if args.no_images else settings.dicom_storage_dir,
                               Path(args.out), outcome, index_hours=args.index_hours,
                               patient_ids=args.patient_ids,
                               follow_up_until=args.follow_up_until)
    left_out = ", ".join(f"{n} {why}" for why, n in sorted(result.excluded.items())) or "none"
    sys.stdout.write(f"{result.manifest_path}: {result.rows} patient(s), {result.positives} "
                     f"with the outcome, {result.images} with a stored series; left out: "
                     f"{left_out}\n")
    return 0


_RECORDS_EPILOG = """\
stdout: one JSON line per patient, with its "warnings" (what was nulled or dropped).
stderr: each warning, each file skipped (not patient data) or rejected, with the reason,
        then a summary line.
exit codes:
  0  records were produced, with or without warnings
  1  nothing could be used: no record
  2  bad arguments
  3  --strict: records were produced, but a file was rejected
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clinfuse", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("records", help="print the patient records found in FHIR/HL7 files "
                                       "as JSON lines, one per patient",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_RECORDS_EPILOG)
    p.add_argument("paths", nargs="+", help="files or folders (FHIR JSON/NDJSON, "
                                            ".ndjson.gz, HL7 v2)")
    p.add_argument("--strict", action="store_true",
                   help="all or nothing per file: validate every FHIR resource with "
                        "fhir.resources (R4B) and reject a file (or a bulk export) for any "
                        "problem instead of dropping the bad element")
    p.add_argument("--max-decompressed", type=_positive_int, default=1024, metavar="MIB",
                   help="refuse a .gz file that decompresses to more than this (default "
                        "%(default)s MiB)")
    p.add_argument("--as-of", type=_iso_time, default=None, metavar="TIME",
                   help="print each record as of this ISO 8601 time (the leakage-safe view)")
    p.set_defaults(func=_records)

    p = sub.add_parser("synth", help="write a synthetic multimodal cohort with known truth")
    p.add_argument("--patients", type=_positive_int, default=1000)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bias", action="store_true",
                   help="plant disparities a fairness audit should find")
    p.add_argument("--slices", type=_positive_int, default=32)
    p.add_argument("--size", type=_positive_int, default=None,
                   help="CT in-plane matrix size (default 64); with --realism hard, the "
                        "radiograph's (default 256)")
    p.add_argument("--workers", type=_positive_int, default=2)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--realism", choices=("default", "hard"), default="default",
                   help="'hard': 2-D radiographs (PNG/JPEG) whose signal is texture, "
                        "non-linear EHR effects, rare note phrases, site effects "
                        "(docs/synthetic-cohort.md)")
    p.set_defaults(func=_synth)

    p = sub.add_parser("dicom2nifti", help="write the volume the loader sees as NIfTI")
    p.add_argument("src", help="DICOM file, series folder, DICOMDIR or zip; or NIfTI/PNG/JPEG")
    p.add_argument("out", help="output .nii or .nii.gz")
    p.add_argument("--resample", action="store_true",
                   help="correct gantry tilt and uneven slice spacing instead of refusing")
    p.set_defaults(func=_dicom2nifti)

    p = sub.add_parser("series", help="list the DICOM series found and the selection rules "
                                      "each matches")
    p.add_argument("src")
    p.add_argument("--rules", default=None, help="YAML selection rules (or a model config)")
    p.set_defaults(func=_series)

    p = sub.add_parser("deid", help="de-identify DICOM (PS3.15 Basic Application Level "
                                    "Confidentiality Profile)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--salt", default=None,
                   help="secret that makes UID remapping repeatable across runs")
    p.add_argument("--flag-burned-in", action="store_true",
                   help="de-identify images declaring burned-in annotation and flag them, "
                        "instead of refusing them")
    p.set_defaults(func=_deid)

    p = sub.add_parser("train", help="train the late-fusion risk model from a cohort manifest")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True, help="model artifact directory to create")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="cap on image-encoder epochs")
    p.add_argument("--device", default=None, help="auto, cpu or cuda")
    p.add_argument("--config", default=None, help="YAML model config")
    p.add_argument("--signing-key", default=None,
                   help="Ed25519 private key (PEM) that signs the artifact; without one a "
                        "demo key is generated beside the artifact")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="AUROC/AUPRC/Brier/ECE with patient-bootstrap CIs, "
                                        "ablations and calibration; with --cv K, the "
                                        "fused model and baselines cross-validated")
    p.add_argument("--model", default=None, help="a trained artifact (or use --cv)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--cv", type=_positive_int, default=None, metavar="K",
                   help="train and score in K patient-grouped folds beside simple baselines "
                        "(writes oof_scores.csv, cv.json, cv.html)")
    p.add_argument("--train-manifest", default=None,
                   help="train the fused model and the baselines on this cohort and test "
                        "them on --manifest (external validation; writes what --cv writes)")
    p.add_argument("--repeats", type=_positive_int, default=1,
                   help="with --cv: repeat the K folds R times with different seeds")
    p.add_argument("--split", choices=["grouped", "temporal"], default="grouped",
                   help="with --cv: label-stratified patient folds, or train on earlier "
                        "index times and test on later ones")
    p.add_argument("--config", default=None,
                   help="with --cv or --train-manifest: the fused model's YAML config")
    p.add_argument("--cache-dir", default=None,
                   help="with --cv: image tensor and sentence embedding cache shared by folds")
    p.add_argument("--out", default="evaluation")
    p.add_argument("--n-boot", type=_positive_int, default=1000)
    p.add_argument("--trusted-key", action="append", default=None,
                   help="public key (.pub) the artifact must be signed with; repeatable")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("score", help="score a manifest: one row per example")
    p.add_argument("--model", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True, help="scores.csv")
    p.add_argument("--trusted-key", action="append", default=None)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_score)

    p = sub.add_parser("explain", help="explain one prediction: modality Shapley values, EHR "
                                       "SHAP, image saliency, note sentences, FHIR "
                                       "RiskAssessment")
    p.add_argument("--model", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--example", default=None, help="example_id")
    which.add_argument("--patient", default=None, help="patient_id: explains the latest example")
    p.add_argument("--trusted-key", action="append", default=None)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_explain)

    p = sub.add_parser("audit", help="fairness audit of a score table; `audit compare A B` "
                                     "shows what changed between two audits")
    p.add_argument("compare", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--scores", default=None, help="scores.csv from `clinfuse score`")
    p.add_argument("--sensitive", default=None, help="comma-separated sensitive columns")
    p.add_argument("--manifest-sidecar", default=None,
                   help="manifest YAML whose `sensitive` list to use")
    p.add_argument("--out", default="audit")
    p.add_argument("--run-by", default=None, help="who ran it (default: the OS user)")
    p.add_argument("--n-boot", type=_positive_int, default=1000)
    p.add_argument("--min-group-size", type=_positive_int, default=30)
    p.add_argument("--multiplicity", choices=["bh", "holm"], default="holm",
                   help="multiple-comparison control: Holm (family-wise, the default) or "
                        "Benjamini-Hochberg (false discovery rate)")
    p.add_argument("--threshold", default="auto",
                   help="decision threshold: a number, a column, or auto (the score file's "
                        "threshold_high_risk)")
    p.set_defaults(func=_audit)

    p = sub.add_parser("demo", help="run the demo: synthetic cohort, model, ingest, then "
                                       "the API and dashboard on 127.0.0.1")
    p.add_argument("--out", default="demo-data")
    p.add_argument("--patients", type=_positive_int, default=300)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-serve", action="store_true",
                   help="prepare the cohort, model and service store, then exit")
    p.set_defaults(func=_demo)

    p = sub.add_parser("serve", help="run the service: FHIR, CDS Hooks, DICOMweb, HL7 v2, "
                                     "audits and the dashboard; with --dicom-port the C-STORE "
                                     "SCP, with --mllp-port the MLLP listener")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--database-url", default=None)
    p.add_argument("--dicom-port", type=int, default=None,
                   help="start the C-STORE SCP on this port (allowed AEs: "
                        "CLINFUSE_DICOM_ALLOWED_AETS)")
    p.add_argument("--mllp-port", type=int, default=None,
                   help="start the HL7 v2 MLLP listener on this port")
    p.add_argument("--model", default=None, help="the signed model artifact to serve "
                   "(CLINFUSE_MODEL_PATH)")
    p.add_argument("--trusted-key", action="append", default=None,
                   help="Ed25519 public key (PEM) trusted to sign models; repeatable "
                        "(CLINFUSE_MODEL_TRUSTED_KEYS)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("fetch", help="retrieve a patient's studies from a PACS into the store")
    p.add_argument("--patient", required=True, help="PatientID in the PACS")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--dicomweb", metavar="URL", help="DICOMweb root (QIDO + WADO)")
    source.add_argument("--dimse", metavar="HOST:PORT:AET",
                        help="C-FIND then C-MOVE to this service's SCP")
    p.set_defaults(func=_fetch)

    p = sub.add_parser("verify-access-log", help="check the access log's hash chain and "
                                                 "signed checkpoints (exit 1 if tampered)")
    p.add_argument("--database-url", default=None)
    p.add_argument("--public-key", default=None,
                   help="Ed25519 public key (PEM) of the checkpoints; default: derived from "
                        "the service's key in CLINFUSE_DATA_DIR/keys")
    p.add_argument("--checkpoint-file", default=None,
                   help="the exported checkpoints (JSON lines) to check the database "
                        "against; default: CLINFUSE_ACCESS_LOG_CHECKPOINT_FILE")
    p.set_defaults(func=_verify_access_log)

    p = sub.add_parser("users", help="local users of the built-in (demo) issuer")
    users = p.add_subparsers(dest="users_command", required=True)
    p = users.add_parser("add", help="create a user or reset its password and role")
    p.add_argument("username")
    p.add_argument("--role", required=True, choices=["integration", "clinician", "compliance",
                                                     "admin"])
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of stdin instead of a prompt")
    p.add_argument("--display-name", default=None)
    p.add_argument("--database-url", default=None)
    p.set_defaults(func=_users_add)

    p = sub.add_parser("clients", help="SMART Backend Services clients of the built-in issuer")
    clients = p.add_subparsers(dest="clients_command", required=True)
    p = clients.add_parser("add", help="register a client (or replace its keys and role)")
    p.add_argument("client_id")
    p.add_argument("--jwks", required=True, help="the client's public JWKS (JSON file)")
    p.add_argument("--role", required=True, choices=["integration", "clinician", "compliance",
                                                     "admin"])
    p.add_argument("--scope", default=None,
                   help="space-separated scopes it may ask for (default: the role's, "
                        "docs/security.md)")
    p.add_argument("--database-url", default=None)
    p.set_defaults(func=_clients_add)

    p = sub.add_parser("cohort", help="cohorts from the store")
    cohort = p.add_subparsers(dest="cohort_command", required=True)
    p = cohort.add_parser("export", help="write a cohort manifest (CSV + YAML, images/) from "
                                         "the stored records and imaging")
    p.add_argument("--outcome", required=True,
                   help="deterioration, mortality or icu_transfer, or a YAML outcome "
                        "definition (a manifest sidecar or model config works too)")
    p.add_argument("--out", required=True, help="folder to write manifest.csv/.yaml into")
    p.add_argument("--index-hours", type=float, default=72.0,
                   help="index time = first inpatient admission + this many hours")
    p.add_argument("--patient-ids", choices=["opaque", "identifier"], default="opaque",
                   help="opaque store ids (default) or the business identifier system|value")
    p.add_argument("--follow-up-until", type=_iso_time, default=None, metavar="TIME",
                   help="records are complete up to this time (default now); later "
                        "horizons are censored")
    p.add_argument("--no-images", action="store_true", help="do not copy DICOM series")
    p.add_argument("--database-url", default=None)
    p.set_defaults(func=_cohort_export)

    p = sub.add_parser("db-upgrade", help="create or migrate the database schema")
    p.add_argument("--database-url", default=None)
    p.set_defaults(func=_db_upgrade)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _iso_time(text: str):  # type: ignore[no-untyped-def]
    from datetime import datetime

    from fhir_adapters.record import ensure_utc

    try:
        return ensure_utc(datetime.fromisoformat(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Migration chatter says nothing a user needs; warnings still show.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        code = args.func(args)
    except (ValueError, OSError) as exc:
        # Library errors are written to be shown: located, and free of patient values.
        sys.stderr.write(f"clinfuse {args.command}: {exc}\n")
        code = 2
    raise SystemExit(code)


if __name__ == "__main__":
    main()

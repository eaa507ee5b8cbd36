"""The ``clinfuse`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("clinfuse")


def _records(args: argparse.Namespace) -> int:
    from fhir_adapters.errors import NotPatientData
    from fhir_adapters.sources import read_records

    records, errors = read_records([Path(p) for p in args.paths], strict=args.strict)
    for record in records:
        view = record.as_of(args.as_of) if args.as_of else record
        sys.stdout.write(json.dumps(view.to_json(), ensure_ascii=False) + "\n")
    failed = 0
    for error in errors:
        kind = "skipped" if isinstance(error, NotPatientData) else "rejected"
        failed += kind == "rejected"
        sys.stderr.write(f"{kind}: {error}\n")
    sys.stderr.write(f"{len(records)} patient record(s); {len(errors)} file(s) not ingested\n")
    return 1 if failed else 0


def _synth(args: argparse.Namespace) -> int:
    from pipelines.synth import generate_cohort

    summary = generate_cohort(args.patients, Path(args.out), seed=args.seed, bias=args.bias,
                              n_slices=args.slices, size=args.size, workers=args.workers,
                              progress=not args.quiet)
    sys.stdout.write(summary.to_text() + "\n")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from services.demo import run_demo

    run_demo(Path(args.out), patients=args.patients, seed=args.seed)
    return 0


def _db_upgrade(args: argparse.Namespace) -> int:
    from services.core.config import get_settings
    from services.db import make_engine, migrate

    url = args.database_url or get_settings().database_url
    migrate(make_engine(url))
    sys.stderr.write("database schema is up to date\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clinfuse", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("records", help="print the patient records found in FHIR/HL7 files "
                                       "as JSON lines, one per patient")
    p.add_argument("paths", nargs="+", help="files or folders (FHIR JSON/NDJSON, HL7 v2)")
    p.add_argument("--strict", action="store_true",
                   help="validate every FHIR resource with fhir.resources (R4B)")
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
    p.add_argument("--size", type=_positive_int, default=64, help="in-plane matrix size")
    p.add_argument("--workers", type=_positive_int, default=2)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_synth)

    p = sub.add_parser("demo", help="run the demo: synthetic cohort, ingest, features")
    p.add_argument("--out", default="demo-data")
    p.add_argument("--patients", type=_positive_int, default=300)
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=_demo)

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
    try:
        code = args.func(args)
    except (ValueError, OSError) as exc:
        # Library errors are written to be shown: located, and free of patient values.
        sys.stderr.write(f"clinfuse {args.command}: {exc}\n")
        code = 2
    raise SystemExit(code)

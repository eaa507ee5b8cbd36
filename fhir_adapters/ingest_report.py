"""What reading files and folders gave: records, skipped and rejected files, warnings.

``clinfuse records`` prints the records on stdout and everything else here on stderr; the
exit code follows from it (:meth:`IngestReport.exit_code`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fhir_adapters.errors import IngestError, Issue, NotPatientData
from fhir_adapters.record import PatientRecord

__all__ = ["EXIT_NOTHING_USABLE", "EXIT_OK", "EXIT_STRICT_DROPPED", "FileResult", "IngestReport"]

#: Exit codes of ``clinfuse records`` (2 stays argparse's: bad arguments).
EXIT_OK = 0  # records were produced, with or without warnings
EXIT_NOTHING_USABLE = 1  # no record could be produced
EXIT_STRICT_DROPPED = 3  # --strict, records produced, but some file was rejected


@dataclass
class FileResult:
    """What one file gave, or one bulk export's NDJSON files read together."""

    source: str
    records: list[PatientRecord] = field(default_factory=list)
    #: Warnings of this file that belong to no kept patient (a bad line, a dropped Patient).
    notices: list[Issue] = field(default_factory=list)
    #: Why the file gave nothing: NotPatientData (skipped) or IngestError (rejected).
    error: IngestError | None = None
    #: Files this result covers (a bulk export's NDJSON files are read as one unit).
    files: int = 1


@dataclass
class IngestReport:
    """Everything read from a set of files and folders, records merged per patient."""

    records: list[PatientRecord] = field(default_factory=list)
    skipped: list[NotPatientData] = field(default_factory=list)
    rejected: list[IngestError] = field(default_factory=list)
    notices: list[Issue] = field(default_factory=list)
    files_read: int = 0

    @property
    def warnings(self) -> list[Issue]:
        """Every warning: those on the records, then the files' notices."""
        return [w for r in self.records for w in r.warnings] + self.notices

    @property
    def errors(self) -> list[IngestError]:
        """Files not ingested: skipped (NotPatientData) and rejected, in that order."""
        return [*self.skipped, *self.rejected]

    def exit_code(self, *, strict: bool = False) -> int:
        if not self.records:
            return EXIT_NOTHING_USABLE
        if strict and self.rejected:
            return EXIT_STRICT_DROPPED
        return EXIT_OK

    def stderr_lines(self) -> list[str]:
        """Warnings, skip and reject notices, then the summary: never a patient's value."""
        lines = [f"warning: {_shown(w)}" for w in self.warnings]
        lines += [f"skipped: {_file_error(e)}" for e in self.skipped]
        lines += [f"rejected: {_file_error(e)}" for e in self.rejected]
        lines.append(self.summary())
        return lines

    def summary(self) -> str:
        return (f"{len(self.records)} patient record(s) from {self.files_read} file(s) read; "
                f"{len(self.skipped)} file(s) skipped as not patient data, "
                f"{len(self.rejected)} rejected; {len(self.warnings)} warning(s)")


def _shown(warning: Issue) -> str:
    """The warning with its location, unless its text already starts from it."""
    where = warning.where()
    if where == "input" or where in warning.diagnostics:
        return warning.diagnostics
    return f"{where}: {warning.diagnostics}"


def _file_error(error: IngestError) -> str:
    prefix = f"{error.source}: " if error.source else ""
    return prefix + "; ".join(_shown(i) for i in error.issues)

"""Write docs/configuration.md: one table of every CLINFUSE_* variable Settings declares.

    python -m scripts.settings_table > docs/configuration.md

Names, types and defaults come from pydantic's field info; descriptions from
``Field(description=...)`` or, as config.py writes them, the ``#:`` comment lines
right above a field (Sphinx's convention: a ``#:`` comment belongs to the next field
only). Settings is never instantiated, so the table does not depend on the caller's
environment. tests/deploy checks that the committed doc equals this output.
"""

from __future__ import annotations

import ast
import inspect
import json
import sys
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Union

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from services.core import config

NO_DESCRIPTION = "—"

HEADER = """\
# Configuration

<!-- Generated from services/core/config.py by
     `python -m scripts.settings_table > docs/configuration.md`; do not edit by hand. -->

clinfuse reads its configuration only from environment variables with the prefix
`{prefix}` (class `Settings` in `services/core/config.py`); nothing else reads the
environment. Names are case-insensitive. Lists are JSON (`'["A", "B"]'`), booleans
`true`/`false`, paths absolute inside the container. A misspelt `{prefix}` name is
ignored silently, so `tests/deploy` checks that every `{prefix}` name used under
`deploy/` is one of these.

Where deployments set them: `deploy/compose.yaml` (`environment:`, secrets in
`deploy/secrets/clinfuse.env`), `deploy/k8s/configmap.yaml` and `deploy/k8s/secret.yaml`,
and the image's defaults in `deploy/Dockerfile` (see [deployment](deployment.md)).
Values that are secrets: `{prefix}DATABASE_URL` (holds the database password) and
`{prefix}PSEUDONYM_SECRET`.

| variable | type | default | description |
| --- | --- | --- | --- |
"""


def field_comments(cls: type) -> dict[str, str]:
    """The ``#:`` comment block directly above each annotated field of ``cls``."""
    lines, _ = inspect.getsourcelines(cls)
    tree = ast.parse("".join(lines))
    class_def = tree.body[0]
    assert isinstance(class_def, ast.ClassDef)
    comments: dict[str, str] = {}
    for node in class_def.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        block: list[str] = []
        row = node.lineno - 2  # 0-based index of the line above the field
        while row >= 0 and lines[row].strip().startswith("#:"):
            block.insert(0, lines[row].strip()[2:].strip())
            row -= 1
        if block:
            comments[node.target.id] = " ".join(block)
    return comments


def type_name(annotation: Any) -> str:
    """A reader's name for a field type: how the value is written in the environment."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        optional = len(names) < len(args)
        return " or ".join(names) + (" (optional)" if optional else "")
    if origin in (list, tuple, set, frozenset):
        inner = ", ".join(type_name(a) for a in args) or "value"
        return f"JSON list of {inner}"
    if origin is dict:
        return "JSON object"
    if annotation is Path or (isinstance(annotation, type) and issubclass(annotation, Path)):
        return "path"
    if annotation is bool:
        return "boolean"
    if annotation is int:
        return "integer"
    if annotation is float:
        return "number"
    if annotation is str:
        return "string"
    return getattr(annotation, "__name__", str(annotation))


def default_text(info: FieldInfo) -> str:
    """The default as it would be written in the environment."""
    if info.default_factory is not None:
        value: Any = info.default_factory()  # type: ignore[call-arg]
    elif info.default is PydanticUndefined:
        return "*(required)*"
    else:
        value = info.default
    if value is None:
        return "*(unset)*"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, list | tuple | set | dict):
        return f"`{json.dumps(list(value) if not isinstance(value, dict) else value)}`"
    if isinstance(value, Path):
        return f"`{value.as_posix()}`"
    return f"`{value}`"


def env_name(prefix: str, name: str, info: FieldInfo) -> str:
    """The variable pydantic-settings reads for a field (an alias replaces prefix + name)."""
    alias = info.validation_alias if isinstance(info.validation_alias, str) else info.alias
    return (alias or f"{prefix}{name}").upper()


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def declared_variables(settings_cls: type[config.Settings] = config.Settings) -> list[str]:
    """Every environment variable name the settings class reads, in declaration order."""
    prefix = str(settings_cls.model_config.get("env_prefix", ""))
    return [env_name(prefix, name, info) for name, info in settings_cls.model_fields.items()]


def render(settings_cls: type[config.Settings] = config.Settings) -> str:
    prefix = str(settings_cls.model_config.get("env_prefix", ""))
    comments = field_comments(settings_cls)
    rows = []
    for name, info in settings_cls.model_fields.items():
        description = info.description or comments.get(name) or NO_DESCRIPTION
        rows.append(f"| `{env_name(prefix, name, info)}` | {cell(type_name(info.annotation))} "
                    f"| {cell(default_text(info))} | {cell(description)} |\n")
    return HEADER.format(prefix=prefix) + "".join(rows)


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()

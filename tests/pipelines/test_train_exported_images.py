"""``clinfuse train`` with the default config on notes plus radiographs as viewers export them.

Before the fix this hung: the notes were embedded (torch's intra-op thread pool
started), then the image loader forked a process pool whose workers waited forever
on the pool's inherited locks in their first parallel torch op (256x256 images are
large enough for one); and the RGB/RGBA/palette images were refused as "3-D".
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

import pipelines.model_inputs as model_inputs
import pipelines.note_choice as note_choice
from models.artifact import load_artifact
from pipelines.training import DEFAULT_CONFIG, main_train
from tests.pipelines.png_cohort import EXPORT_FORMATS, write_png_cohort


def test_default_config_trains_on_rgb_rgba_palette_and_grey_images_with_notes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert int(DEFAULT_CONFIG["workers"]) >= 2
    manifest = write_png_cohort(tmp_path / "cohort", 48, seed=3, size=256,
                                formats=EXPORT_FORMATS)
    assert {p.suffix for p in (tmp_path / "cohort" / "images").iterdir()} == {".png", ".jpg"}

    events: list[str] = []
    real_embed, real_pool = note_choice.embed_notes, model_inputs.ThreadPoolExecutor

    def embed_spy(*args: Any, **kwargs: Any) -> Any:
        events.append("notes embedded")
        return real_embed(*args, **kwargs)

    class PoolSpy(real_pool):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            events.append(f"image pool of {kwargs.get('max_workers')}")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(note_choice, "embed_notes", embed_spy)
    monkeypatch.setattr(model_inputs, "ThreadPoolExecutor", PoolSpy)

    err = io.StringIO()
    assert main_train(manifest, tmp_path / "model", stderr=err) == 0, err.getvalue()
    assert "Traceback" not in err.getvalue()
    # The path that hung: notes first, then a pool of the default 2 workers. The notes
    # are embedded three times: both candidate encoders on the training rows (the
    # note learner's inner CV), then the chosen one on every row.
    assert events == ["notes embedded"] * 3 + [f"image pool of {DEFAULT_CONFIG['workers']}"]

    art = load_artifact(tmp_path / "model", trusted_public_keys=None)
    assert art.config["image"]["spatial_dims"] == 2
    assert art.config["image"]["preprocess"]["channels"] == 1
    assert set(art.config["input_modalities"]) == {"image", "ehr", "note"}

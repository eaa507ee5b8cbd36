"""Clinical notes embedded per second with MiniLM: cold, warm cache, and a naive baseline.

All on the shared curated notes, in this process, CPU. Cold: split, window, encode
every distinct sentence in batches of 64, no cache. Warm: the same notes again with
every sentence in the on-disk cache. Baseline: one ``encode`` call per note
(sentence-transformers defaults), which is how a straightforward loop would do it.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from models.note_encoder import MiniLMNoteEncoder
from pipelines.notes import NoteEmbedder

# Same location rule as tests/shared_data.py.
NOTES = Path(os.environ.get("CLINFUSE_SHARED_DATA", "/work/shared/data")) / "notes" / "curated"


def run(quick: bool = False) -> dict[str, Any]:
    """Rates in notes/s and sentences/s; ``quick`` uses the first 40 notes."""
    if not NOTES.is_dir():
        raise FileNotFoundError(f"shared notes not found at {NOTES}")
    texts = [p.read_text() for p in sorted(NOTES.glob("*.txt"))]
    if quick:
        texts = texts[:40]
    encoder = MiniLMNoteEncoder().load()
    encoder.encode(["warm up the model"])

    start = time.perf_counter()
    cold = NoteEmbedder(encoder).embed_many(texts)
    cold_s = time.perf_counter() - start
    n_sentences = sum(len(e.sentences) for e in cold)
    n_distinct = len({s for e in cold for s in e.sentences})

    with tempfile.TemporaryDirectory() as tmp:
        NoteEmbedder(encoder, cache_dir=Path(tmp)).embed_many(texts)
        start = time.perf_counter()
        NoteEmbedder(encoder, cache_dir=Path(tmp)).embed_many(texts)
        warm_s = time.perf_counter() - start

    embedder = NoteEmbedder(encoder)
    start = time.perf_counter()
    for text in texts:
        sentences, _ = embedder.sentences(text)
        encoder._model.encode(sentences, show_progress_bar=False)
    baseline_s = time.perf_counter() - start

    return {
        "notes": len(texts),
        "sentences": n_sentences,
        "distinct_sentences": n_distinct,
        "torch_threads": torch.get_num_threads(),
        "cold_notes_per_s": len(texts) / cold_s,
        "cold_sentences_per_s": n_sentences / cold_s,
        "warm_cache_notes_per_s": len(texts) / warm_s,
        "baseline_notes_per_s": len(texts) / baseline_s,
        "speedup_vs_baseline": baseline_s / cold_s,
    }


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))

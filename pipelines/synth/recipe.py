"""The synth recipe: the training choices that ``clinfuse synth``'s default world names.

The default synthetic world's imaging risk is a bright lesion's volume, which the
``threshold`` network (a soft count of voxels above learned intensities, ~150
weights) measures directly. That network is tuned to this generator, so
``image.network: auto`` never picks it for other data (models.image_encoder). The
recipe names it instead, for the manifests this generator writes: ``train`` applies
it when the manifest's sidecar says ``generator: {name: clinfuse synth}`` with the
default realism and the config leaves ``image.network`` at ``auto`` with no
``image.pretrained_path``. So the demo, the tests and the committed evaluation runs on
the default world keep their results, and the artifact records the recipe as the
reason for the choice. ``--realism hard`` (texture-signal radiographs) has no recipe:
"auto" decides there as on a real cohort.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RECIPE_NAME", "recipe_image_network"]

RECIPE_NAME = "clinfuse synth default-world recipe"


def recipe_image_network(sidecar: dict[str, Any], device_type: str) -> str | None:
    """The image network the recipe names for a manifest with this sidecar, or None.

    ``threshold`` on CPU and ``densenet121`` on CUDA: what "auto" meant for this world
    before issue 18, so its documented results stand.
    """
    generator = sidecar.get("generator")
    if not isinstance(generator, dict) or generator.get("name") != "clinfuse synth":
        return None
    if generator.get("realism", "default") != "default":
        return None
    return "densenet121" if device_type == "cuda" else "threshold"

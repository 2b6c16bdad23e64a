"""Entry point: ``python -m alite_jax.main``.

Prints the model zoo: every model of the paper with its parameter count and stage-feature shapes, and
runs one forward pass of each on random images to show the models build and run on this machine.
"""

from __future__ import annotations

import time

import jax
from absl import app, flags, logging

from alite_jax.models import summary

_NUM_CLASSES = flags.DEFINE_integer("num_classes", 10, "Classifier outputs (10, 100 or 200 in the paper).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Input height and width (a multiple of 8).")
_WIDTH = flags.DEFINE_float("width", 1.0, "Channel multiplier of every model.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # hide the backend probing chatter
    start = time.perf_counter()
    print(f"JAX {jax.__version__} on {jax.devices()}")
    print(summary(_NUM_CLASSES.value, _IMAGE_SIZE.value, _WIDTH.value, run_forward=True))
    print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    app.run(main)

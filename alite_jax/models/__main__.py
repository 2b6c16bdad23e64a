"""``python -m alite_jax.models [num_classes] [image_size]``: the model zoo, each model built and run once."""

import sys

from alite_jax.models.zoo import summary

if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    print(summary(*args, run_forward=True))

"""``python -m alite_jax.models [num_classes] [image_size] [layout]``: the model zoo, each model built and
run once (layout "cifar", the default, or "imagenet")."""

import sys

from alite_jax.models.zoo import summary

if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    layout = sys.argv[3] if len(sys.argv) > 3 else "cifar"
    print(summary(*args, run_forward=True, layout=layout))

"""``python -m alite_jax.convert --from=torchvision --arch=resnet50 --checkpoint=<file> --workdir=<dir>``
``python -m alite_jax.convert --from=timm --arch=deit_tiny_patch16_224 --checkpoint=<file> --workdir=<dir>``

Converts a torchvision ResNet-50 or a timm / facebookresearch DeiT checkpoint (``torch.save`` zip
format, ``.pth``/``.pt``, or ``.safetensors``; no torch needed) into a teacher run
directory that a distillation takes as ``--config.teacher.workdir=<dir>`` (docs/convert.md).
``--evaluate`` also measures its test accuracy on ``--dataset`` when that data set is prepared here.

Exit status: 0 when the run directory is written; 2 for a user error (a file that cannot be read or does
not fit the architecture, a bad flag, a workdir holding another run): one line ``error: <what and how
to fix it>`` on stderr; 1 for a bug, with its traceback.
"""

from __future__ import annotations

import time

from absl import app, flags, logging

from alite_jax.convert.teacher_run import SOURCES, convert_checkpoint, write_teacher_run
from alite_jax.convert.timm import ARCHS as TIMM_ARCHS
from alite_jax.convert.torchvision import ARCHS
from alite_jax.errors import exit_on_user_error, exit_with_user_error, parse_flags_or_exit

_FROM = flags.DEFINE_enum("from", "torchvision", list(SOURCES), "Where the checkpoint comes from.")
_ARCH = flags.DEFINE_enum("arch", "resnet50", list(ARCHS) + list(TIMM_ARCHS),
                          "The checkpoint's architecture: resnet50 (--from=torchvision) or "
                          "deit_{tiny,small,base}_patch16_224 (--from=timm).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A .pth/.pt (torch.save) or .safetensors file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The teacher run directory to write.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "The checkpoint's classifier outputs.")
_DATASET = flags.DEFINE_string("dataset", "imagenet2012", "The data set the weights were trained on "
                               "(a TFDS name); a distillation must use the same.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "The image side the teacher takes "
                                  "(a ResNet: a multiple of 32; a DeiT: the size it was trained at).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 100, "Batch size recorded in the config and used by "
                                   "--evaluate.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "The TFDS data directory (recorded as data.data_dir).")
_EVALUATE = flags.DEFINE_bool("evaluate", False, "Also evaluate the converted teacher on --dataset's "
                              "evaluation split when it is prepared here (else say so and go on).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    if not _CHECKPOINT.value or not _WORKDIR.value:
        exit_with_user_error("give --checkpoint=<file.pth or .safetensors> and --workdir=<dir>")
    start = time.perf_counter()
    with exit_on_user_error(filesystem=True):
        model, variables = convert_checkpoint(_CHECKPOINT.value, flags.FLAGS["from"].value, _ARCH.value,
                                              _NUM_CLASSES.value, image_size=_IMAGE_SIZE.value)
        summary = write_teacher_run(
            _WORKDIR.value, model, variables, checkpoint=_CHECKPOINT.value, dataset=_DATASET.value,
            image_size=_IMAGE_SIZE.value, batch_size=_BATCH_SIZE.value, source=flags.FLAGS["from"].value,
            arch=_ARCH.value, evaluate=_EVALUATE.value, data_dir=_DATA_DIR.value)
    print(f"converted {_CHECKPOINT.value} ({summary['params']:,} parameters) into the teacher run "
          f"{_WORKDIR.value} in {time.perf_counter() - start:.0f}s; distil from it with "
          f"--config.teacher.workdir={_WORKDIR.value}", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_or_exit)

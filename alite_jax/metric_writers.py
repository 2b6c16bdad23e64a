"""Where the trainer's numbers go: one writer for console, ``metrics.jsonl`` and TensorBoard, and one
progress meter for steps/s, images/s and the ETA.

Only process 0 writes (files and TensorBoard) and prints; every process may call these. clu's metric
writers would do the same job but add a dependency pinned to its own JAX range; these are small.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from alite_jax import run_dir
from alite_jax.distributed import is_leader, say


def format_eta(seconds: float) -> str:
    """'1h02m03s'."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


class ScalarEventWriter:
    """TensorBoard scalars in an event file (``events.out.tfevents.<time>.<host>``), written with the
    ``tensorboard`` package's protos and record writer on a plain file: TensorBoard reads them as it
    reads ``tf.summary`` scalars, and no TensorFlow is imported (flax's ``SummaryWriter`` imports it, about
    4 s at every start of the trainer)."""

    def __init__(self, logdir: str):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        self.event_pb2, self.summary_pb2 = event_pb2, summary_pb2
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
        self.file = open(os.path.join(logdir, name), "wb")
        self.records = RecordWriter(self.file)
        self.records.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
                           .SerializeToString())

    def scalar(self, tag: str, value: float, step: int) -> None:
        summary = self.summary_pb2.Summary(value=[self.summary_pb2.Summary.Value(tag=tag,
                                                                                 simple_value=float(value))])
        self.records.write(self.event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)
                           .SerializeToString())

    def flush(self) -> None:
        self.records.flush()

    def close(self) -> None:
        self.records.close()


class MetricWriter:
    """Writes one row per epoch to the console, ``workdir/metrics.jsonl`` and ``workdir/tensorboard``,
    and progress lines to the console (process 0 only)."""

    def __init__(self, workdir: str):
        self.workdir, self.tensorboard = workdir, None
        if is_leader():
            self.tensorboard = ScalarEventWriter(os.path.join(workdir, "tensorboard"))

    def write_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        run_dir.append_metrics(self.workdir, row)
        if self.tensorboard is not None:
            for k, v in row.items():
                if isinstance(v, float):
                    self.tensorboard.scalar(k, v, epoch)
            self.tensorboard.flush()
        say(f"epoch {epoch}: " + " ".join(f"{k} {v:.4f}" for k, v in row.items()
                                           if isinstance(v, float) and k != "lr"))

    def write_text(self, text: str) -> None:
        say(text)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


class Progress:
    """Steps/s, images/s and ETA, timed from the first step after compilation."""

    def __init__(self, total_steps: int, batch_size: int):
        self.total_steps, self.batch_size = total_steps, batch_size
        self.start_step: int | None = None
        self.start_time = 0.0

    def started(self, step: int) -> None:
        """Marks ``step`` (finished, compiled and waited for) as the start of the timing."""
        if self.start_step is None:
            self.start_step, self.start_time = step, time.perf_counter()

    def line(self, step: int) -> str:
        if self.start_step is None or step <= self.start_step:
            return "(compiling)"
        rate = (step - self.start_step) / (time.perf_counter() - self.start_time)
        return (f"{rate:.2f} steps/s {rate * self.batch_size:.1f} images/s "
                f"ETA {format_eta((self.total_steps - step) / rate)}")

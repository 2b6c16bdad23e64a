"""Adversarial probes of a run directory (issue 32): concurrent runs, a full disk, cut and missing files,
signals during the set-up, and the command lines' user errors, each on a tiny digits run.

Every probe runs the real command lines in subprocesses and prints one row: the probe, each command's exit
status, the seconds it took, the lines it wrote on stderr and what changed on disk (or what the rerun
reported). The table is what the issue's closing note quotes, before and after. Run
``python benchmarks/run_dir_probes.py`` (about 3 minutes on 2 CPU cores); ``--repo=<checkout>`` probes
another checkout's code (e.g. a worktree of an older commit, for the "before" table). The full-disk probe
needs a small tmpfs (root, or a container that lets it mount one); without it that row says so.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from tiny_runs import write_config  # noqa: E402  (the trainer tests' own tiny run)


class Probes:
    def __init__(self, repo: str, root: str):
        self.repo, self.root, self.rows = repo, root, []

    def config(self, name: str, epochs: int = 2, images: int = 128) -> str:
        """The trainer tests' tiny digits run (tests/tiny_runs.py), dense."""
        return write_config(pathlib.Path(self.root, f"{name}.py"), "baseline", epochs=epochs, images=images)

    def command(self, module: str, *flags: str) -> list[str]:
        return [sys.executable, "-m", module, *flags]

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": self.repo, "PYTHONUNBUFFERED": "1"}

    def run(self, cmd: list[str], timeout: float = 600) -> tuple[int, float, str, str]:
        start = time.perf_counter()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, env=self.env(), cwd=self.root,
                               timeout=timeout)
            return r.returncode, time.perf_counter() - start, r.stdout, r.stderr
        except subprocess.TimeoutExpired as e:
            return -1, time.perf_counter() - start, str(e.stdout or ""), f"timed out after {timeout}s"

    def start(self, cmd: list[str]) -> subprocess.Popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env(), cwd=self.root)

    def add(self, probe: str, status: str, seconds: float, stderr: str, disk: str) -> None:
        lines = [line for line in stderr.splitlines() if line.strip()]
        last = lines[-1][:110] if lines else ""
        self.rows.append((probe, status, f"{seconds:.0f}", str(len(lines)), last, disk))
        print(f"{probe}: exit {status}, {seconds:.0f}s, {len(lines)} stderr lines; {disk}", flush=True)


def metrics_epochs(workdir: str) -> list[int]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    for line in open(path):
        try:
            rows.append(json.loads(line)["epoch"])
        except (ValueError, KeyError):
            rows.append("cut")
    return rows


def listing(workdir: str) -> str:
    if not os.path.exists(workdir):
        return "no workdir"
    names = sorted(os.listdir(workdir))
    checkpoints = os.path.join(workdir, "checkpoints")
    steps = sorted(os.listdir(checkpoints)) if os.path.isdir(checkpoints) else None
    return f"{names}; checkpoints {steps}"


def train(p: Probes, config: str, workdir: str, *flags: str) -> list[str]:
    return p.command("alite_jax.main", f"--config={config}", f"--workdir={workdir}", *flags)


def probe_concurrent(p: Probes) -> None:
    config, workdir = p.config("two", epochs=3, images=512), os.path.join(p.root, "two")
    first = p.start(train(p, config, workdir))
    time.sleep(1.0)
    code, seconds, _, err = p.run(train(p, config, workdir))
    first.communicate()
    summary = json.load(open(os.path.join(workdir, "summary.json"))) if os.path.exists(
        os.path.join(workdir, "summary.json")) else {}
    p.add("1. a second run in the same workdir", f"{first.returncode}, {code}", seconds, err,
          f"metrics epochs {metrics_epochs(workdir)}; summary epochs {summary.get('epochs')}")


def probe_full_disk(p: Probes) -> None:
    disk = os.path.join(p.root, "disk")
    os.makedirs(disk)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", disk], capture_output=True,
                             text=True)
    if mounted.returncode:
        p.rows.append(("2. a full disk (7 MB tmpfs)", "-", "-", "-", "cannot mount a tmpfs here", "-"))
        return
    try:
        config, workdir = p.config("disk"), os.path.join(disk, "run")
        code, seconds, _, err = p.run(train(p, config, workdir))
        after = listing(workdir)
        subprocess.run(["mount", "-o", "remount,size=64m", disk], check=True)
        again, _, out, _ = p.run(train(p, config, workdir))
        resumed = [line for line in out.splitlines() if line.startswith("resuming")]
        p.add("2. a full disk (7 MB tmpfs)", f"{code}, rerun {again}", seconds, err,
              f"{after}; rerun on 64 MB: {resumed[0] if resumed else 'no resume line'}")
    finally:
        subprocess.run(["umount", disk], capture_output=True)


def finished_run(p: Probes) -> tuple[str, str]:
    config, workdir = p.config("finished"), os.path.join(p.root, "finished")
    code, _, _, err = p.run(train(p, config, workdir))
    assert code == 0, err[-2000:]
    return config, workdir


def probe_cut_metrics(p: Probes, config: str, reference: str) -> None:
    workdir = os.path.join(p.root, "cut")
    shutil.copytree(reference, workdir)
    path = os.path.join(workdir, "metrics.jsonl")
    text = open(path).read().rstrip("\n")
    with open(path, "w") as f:
        f.write(text[:len(text) - len(text.rsplit("\n", 1)[1]) // 2])
    code, seconds, _, err = p.run(train(p, config, workdir))
    old = json.load(open(os.path.join(reference, "summary.json")))
    new = json.load(open(os.path.join(workdir, "summary.json")))
    p.add("3. a finished run's last metrics line cut, rerun", str(code), seconds, err,
          f"summary epochs {new['epochs']} (was {old['epochs']}), test accuracy "
          f"{'the same' if new['test_accuracy'] == old['test_accuracy'] else 'changed'}")


def probe_rerun_export(p: Probes, config: str, reference: str) -> None:
    workdir = os.path.join(p.root, "rerun")
    shutil.copytree(reference, workdir)
    proc = p.start(train(p, config, workdir))
    start, absent = time.perf_counter(), 0
    while proc.poll() is None:
        absent += not os.path.exists(os.path.join(workdir, "model"))
        time.sleep(0.002)
    _, err = proc.communicate()
    p.add("4. a finished run rerun: model/ watched every 2 ms", str(proc.returncode),
          time.perf_counter() - start, err, f"model/ absent in {absent} polls")


def probe_lost_config(p: Probes, reference: str) -> None:
    workdir = os.path.join(p.root, "lost")
    shutil.copytree(reference, workdir)
    os.remove(os.path.join(workdir, "config.json"))
    config = p.config("lost")
    code, seconds, _, err = p.run(train(p, config, workdir, "--config.optimizer.lr=0.5"))
    stored = json.load(open(os.path.join(workdir, "config.json")))["optimizer"]["lr"] if os.path.exists(
        os.path.join(workdir, "config.json")) else None
    p.add("5. config.json deleted, rerun with lr 0.5", str(code), seconds, err,
          f"config.json lr {stored}")


def probe_signal_in_setup(p: Probes, sig: signal.Signals) -> None:
    config, workdir = p.config(f"sig{int(sig)}"), os.path.join(p.root, f"sig{int(sig)}")
    start = time.perf_counter()
    proc = p.start(train(p, config, workdir))
    while not os.path.exists(workdir) and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.5)  # reading the data, building the state
    proc.send_signal(sig)
    _, err = proc.communicate()
    empty = [d for d, subdirs, files in os.walk(workdir) if not subdirs and not files]
    p.add(f"6. {sig.name} during the set-up", str(proc.returncode), time.perf_counter() - start, err,
          f"empty directories {[os.path.relpath(d, workdir) for d in empty]}")


def probe_cli_errors(p: Probes, reference: str) -> None:
    config = p.config("errors")
    a_file = os.path.join(p.root, "a_file")
    open(a_file, "w").close()
    cases = [
        ("8. --config.sparsity.densty=0.2", train(p, config, os.path.join(p.root, "e1"),
                                                  "--config.sparsity.densty=0.2")),
        ("8. --config.optimizer.lr=inf", train(p, config, os.path.join(p.root, "e2"),
                                               "--config.optimizer.lr=inf")),
        ("8. a workdir that is a file", train(p, config, a_file)),
        ("8. convert --arch=resnet5", p.command("alite_jax.convert", f"--checkpoint={a_file}",
                                                f"--workdir={os.path.join(p.root, 'e3')}", "--arch=resnet5")),
        ("8. export --out under a file", p.command("alite_jax.export", f"--workdir={reference}",
                                                   "--format=stablehlo", f"--out={a_file}/artifact")),
    ]
    for name, cmd in cases:
        code, seconds, _, err = p.run(cmd)
        p.add(name, str(code), seconds, err, "")


def probe_offline_tiny_imagenet(p: Probes) -> None:
    config = os.path.join(ROOT, "configs", "teacher_tiny_imagenet.py")
    data_dir = os.path.join(p.root, "tfds")
    code, seconds, _, err = p.run(train(p, config, os.path.join(p.root, "tiny"),
                                        f"--config.data.data_dir={data_dir}"), timeout=400)
    p.add("9. Tiny-ImageNet teacher, no network", str(code), seconds, err, "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default=ROOT, help="the checkout whose alite_jax is probed")
    parser.add_argument("--skip", default="", help="comma-separated probe numbers to leave out")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory() as root:
        p = Probes(os.path.abspath(args.repo), root)
        config, reference = finished_run(p)
        steps = [("1", lambda: probe_concurrent(p)), ("2", lambda: probe_full_disk(p)),
                 ("3", lambda: probe_cut_metrics(p, config, reference)),
                 ("4", lambda: probe_rerun_export(p, config, reference)),
                 ("5", lambda: probe_lost_config(p, reference)),
                 ("6", lambda: probe_signal_in_setup(p, signal.SIGTERM)),
                 ("6", lambda: probe_signal_in_setup(p, signal.SIGINT)),
                 ("8", lambda: probe_cli_errors(p, reference)), ("9", lambda: probe_offline_tiny_imagenet(p))]
        for number, step in steps:
            if number not in skip:
                step()
        print(f"\nalite_jax from {args.repo}\n")
        print("| probe | exit status | seconds | stderr lines | last stderr line | on disk |")
        print("|---|---|---|---|---|---|")
        for row in p.rows:
            print("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")


if __name__ == "__main__":
    main()

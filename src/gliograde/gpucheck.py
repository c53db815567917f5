"""`make gpu-check` (`python -m gliograde.gpucheck`): one command that proves the GPU path on the first GPU that comes
along, in about 8 minutes, and writes gpu-check.json.

Steps, each a subprocess with a time limit, each recorded with its figures whether it passes or not:
    doctor       versions, GPUs, the precision rule's decision, bf16 vs fp32 layer by layer at the training shapes
    pytest-gpu   `pytest -m gpu` (fp16 + GradScaler, EMA, MIL, --compile with DDP, the OOM message, host syncs, ...)
    bench        `gliograde bench --trainer --device cuda --depth 50 --size 128 --batch-size 8`: volumes/s, data
                 wait, MFU, activation peak, against the targets (reported, not judged)
    ddp-fold     a two-epoch fold under --multi-gpu on every visible GPU, with the configured global batch
    resume       a fold killed (SIGKILL) after its second epoch, resumed from last.pt to the end
    evaluate     `evaluate` of that run on the GPU and on the CPU: equal within 2e-3 in fp32 on both sides
    predict      `predict` with that run on the GPU (the run's own precision) and on the CPU (fp32): within 0.05

Without CUDA it exits 1 with one line. `--device cpu` runs the same plumbing on the CPU (gloo processes for DDP,
no pytest-gpu and no bench, 24 smaller phantoms at 16^3): what the test suite runs, so that the script itself is
known to work before a GPU is lent. Run it with the Python that holds the CUDA build of torch (the project's .venv
holds the CPU build).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EVALUATE_TOLERANCE = 2e-3  # fp32 on both sides: cuDNN's algorithms and TF32 round differently from the CPU
PREDICT_TOLERANCE = 0.05  # the GPU in the run's own precision (bf16: 8 mantissa bits) against fp32 on the CPU
# each a ceiling, not an estimate: a busy machine may take several times as long. "resume": for the killed run to
# save its epoch RESUME_AFTER, and again for the resumed run to finish
LIMITS = {"doctor": 90, "pytest-gpu": 210, "bench": 240, "ddp-fold": 120, "resume": 480, "evaluate": 90, "predict": 90}
RESUME_AFTER = 2  # the epoch after which the resume step kills the run


class StepFailed(Exception):
    def __init__(self, message: str, tail: str | None = None):
        super().__init__(message)
        self.tail = tail  # the last lines of the failed command's output


def _gliograde(*args: str) -> list[str]:
    return [sys.executable, "-m", "gliograde", *args]


def _run(cmd: list[str], limit: float, log: Path) -> str:
    """Run cmd, its output into `log`; returns the output; a non-zero exit or the time limit is a StepFailed naming
    the output's last line."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        text = _text(e.stdout) + _text(e.stderr)
        log.write_text(f"$ {' '.join(cmd)}\n{text}")
        raise StepFailed(f"did not finish within {limit:.0f} s", _tail(text)) from None
    text = out.stdout + out.stderr
    log.write_text(f"$ {' '.join(cmd)}\n{text}")
    if out.returncode != 0:
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        raise StepFailed(f"exit {out.returncode}: {lines[-1] if lines else 'no output'}", _tail(text))
    return text


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _tail(text: str, n: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


class Check:
    """The state the steps share: the work folder, the device, the common training flags."""

    def __init__(self, device: str, work: Path):
        import torch

        self.device, self.work = device, work
        self.gpus = torch.cuda.device_count() if device == "cuda" else 0
        self.data = work / "data"
        self.run_dir: Path | None = None
        # the CPU proves the plumbing only: the smallest data and volumes that still make the same files
        self.cases, self.shape, self.size = (48, (64, 64, 48), 32) if device == "cuda" else (24, (48, 48, 40), 16)

    def train_flags(self, out: str, epochs: int) -> list[str]:
        return ["--preset", "cpu-demo", "--device", self.device, "--data-root", str(self.data), "--cache-dir",
                str(self.work / "cache"), "--size", str(self.size), "--epochs", str(epochs), "--min-epochs",
                str(epochs), "--warmup-epochs", "0", "--output-dir", str(self.work / out),
                "--no-tensorboard"]  # fmt: skip

    def ensure_data(self) -> None:
        if not (self.data / "HGG").is_dir():
            _run(_gliograde("synth", "--out", str(self.data), "--cases", str(self.cases), "--shape",
                            *map(str, self.shape), "--seed", "3"), 120, self.work / "synth.log")  # fmt: skip


# ------------------------------------------------------------------------------------------------ the steps
def step_doctor(c: Check) -> dict:
    path = c.work / "doctor.json"
    try:
        quick = [] if c.device == "cuda" else ["--no-compile-check"]  # compiling on the CPU alone takes ~20 s
        _run(_gliograde("doctor", "--device", c.device, "--json", str(path), *quick), LIMITS["doctor"],
             c.work / "doctor.log")  # fmt: skip
    finally:
        report = json.loads(path.read_text()) if path.is_file() else None
    if report is None:
        raise StepFailed("doctor wrote no report")
    return {"precision": report["precision"], "diagnostic": report["precision_diagnostic"],
            "versions": report["versions"], "gpus": report["gpus"], "torch_compile": report["torch_compile"]}


def step_pytest(c: Check) -> dict:
    junit = c.work / "pytest-gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
           str(REPO / "tests")]  # fmt: skip
    failure = None
    try:
        _run(cmd, LIMITS["pytest-gpu"], c.work / "pytest-gpu.log")
    except StepFailed as e:
        failure = str(e)
    figures = {}
    if junit.is_file():
        suite = ET.parse(junit).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        figures = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        figures["failed"] = [f"{t.get('classname')}::{t.get('name')}" for t in suite.iter("testcase")
                             if t.find("failure") is not None or t.find("error") is not None]  # fmt: skip
    if failure:
        raise StepFailed(f"{failure}; {figures}")
    return figures


def step_bench(c: Check) -> dict:
    out = c.work / "bench.json"
    cmd = _gliograde("bench", "--trainer", "--device", "cuda", "--depth", "50", "--size", "128", "--batch-size", "8",
                     "--json", str(out), "--workdir", str(c.work / "bench"))  # fmt: skip
    _run(cmd, LIMITS["bench"], c.work / "bench.log")
    r = json.loads(out.read_text())
    keys = ("train_volumes_per_s", "data_wait_fraction", "mfu", "activation_peak_gib", "resident_gpu_memory_gib",
            "peak_gpu_memory_gib", "steady_optimizer_steps", "tflops", "projected_cv_s", "precision", "device")
    figures = {k: r.get(k) for k in keys}
    t = r["targets"]
    figures["targets_met"] = {
        "train_volumes_per_s": r["train_volumes_per_s"] >= t["train_volumes_per_s"],
        "data_wait_fraction": r["data_wait_fraction"] < t["data_wait_fraction"],
        "mfu": r["mfu"] is not None and r["mfu"] >= t["mfu"],
        "activation_peak_gib": r.get("activation_peak_gib") is not None
        and r["activation_peak_gib"] <= t["activation_peak_gib"],
    }
    figures["mil2d"] = r.get("mil2d")
    return figures


def step_ddp_fold(c: Check) -> dict:
    c.ensure_data()
    world = c.gpus if c.device == "cuda" else 2
    flags = [*c.train_flags("ddp", 2), "--multi-gpu", "--batch-size", str(2 * max(world, 1))]
    if c.device == "cpu":
        flags += ["--nproc", "2"]
    _run(_gliograde("train", *flags), LIMITS["ddp-fold"], c.work / "ddp-fold.log")
    run = next((c.work / "ddp" / "runs" / "fold_0").iterdir())
    metrics = json.loads((run / "metrics" / "metrics.json").read_text())
    config = json.loads((run / "config" / "config.json").read_text())
    if metrics["status"] != "complete" or len(metrics["history"]) != 2:
        raise StepFailed(f"the fold ended {metrics['status']} after {len(metrics['history'])} epoch(s)")
    if config["batch"]["global"] != 2 * max(world, 1):
        raise StepFailed(f"global batch {config['batch']['global']}, configured {2 * max(world, 1)}")
    return {"processes": config["environment"]["processes"], "batch": config["batch"],
            "precision": config["environment"]["precision"]["name"], "auc": metrics["final"]["auc"],
            "train_volumes_per_s": [h["train_volumes_per_s"] for h in metrics["history"]]}  # fmt: skip


def step_resume(c: Check) -> dict:
    c.ensure_data()
    flags = c.train_flags("resume", 4)
    log, held = c.work / "resume-killed.log", c.work / "resume-held.txt"
    code = f"from gliograde.gpucheck import train_and_hold; train_and_hold({flags!r}, {RESUME_AFTER}, {str(held)!r})"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)  # fmt: skip
    try:
        run = _wait_until_held(proc, held, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # no clean-up: what a pre-emption or a power cut leaves
        proc.wait()
    before = _last(run)
    _run(_gliograde("train", *flags, "--resume", str(run)), LIMITS["resume"], c.work / "resume.log")
    metrics = json.loads((run / "metrics" / "metrics.json").read_text())
    after = _last(run)
    history = [h["epoch"] for h in metrics["history"]]
    if metrics["status"] != "complete" or history != [1, 2, 3, 4]:
        raise StepFailed(f"after the resume: status {metrics['status']}, epochs {history}")
    if after["precision"]["name"] != before["precision"]["name"]:
        was, now = before["precision"]["name"], after["precision"]["name"]
        raise StepFailed(f"the resume changed the precision: {was} -> {now}")
    c.run_dir = run
    return {"resumed_after_epoch": int(before["epoch"]), "epochs": history, "precision": after["precision"]["name"],
            "auc": metrics["final"]["auc"]}  # fmt: skip


def _wait_until_held(proc: subprocess.Popen, held: Path, log: Path) -> Path:
    """The run folder, once the training holds after its epoch RESUME_AFTER (`held` written); a run that ends first
    or is not there within the limit is a StepFailed with the end of its log."""
    deadline = time.monotonic() + LIMITS["resume"]
    while not held.is_file():
        if proc.poll() is not None:
            raise StepFailed(f"the run ended (exit {proc.returncode}) before its epoch {RESUME_AFTER} was saved "
                             f"(log {log})", _tail(_read(log)))  # fmt: skip
        if time.monotonic() > deadline:
            limit = LIMITS["resume"]
            raise StepFailed(f"no epoch {RESUME_AFTER} saved within {limit} s (log {log})", _tail(_read(log)))
        time.sleep(0.2)
    return Path(held.read_text())


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError as e:
        return f"({path} unreadable: {e})"


def train_and_hold(argv: list[str], epoch: int, held: str) -> None:
    """`gliograde train ARGV` that, once its last.pt holds `epoch`, writes the run folder to `held` and waits there
    for the resume step's SIGKILL, so that the kill lands after that epoch however fast or slow the machine is (a
    run left to go on could finish before a poll saw the epoch). Exits on its own if the step is gone."""
    import functools

    import torch

    from gliograde.cli import main
    from gliograde.files import write_text_atomic
    from gliograde.training import trainer

    parent = os.getppid()

    def hold(at: int, run_dir: Path) -> None:
        if at < epoch:
            return
        last = Path(run_dir) / "checkpoints" / "last.pt"
        while not (last.is_file() and int(torch.load(last, map_location="cpu", weights_only=True)["epoch"]) >= epoch):
            time.sleep(0.1)  # the checkpoint writer's thread is saving it (atomically)
        write_text_atomic(held, str(run_dir))
        while os.getppid() == parent:  # held until killed; an orphan (the step gone) exits
            time.sleep(0.5)
        os._exit(1)

    trainer.train_fold = functools.partial(trainer.train_fold, on_epoch_end=hold)
    raise SystemExit(main(["train", *argv]))


def _last(run: Path) -> dict:
    import torch

    ckpt = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    return {"epoch": ckpt["epoch"], "precision": ckpt["precision"]}


def _evaluated(c: Check, device: str, precision: str):
    import numpy as np

    before = set(c.run_dir.glob("evaluation_*"))
    _run(_gliograde("evaluate", "--run", str(c.run_dir), "--device", device, "--precision", precision),
         LIMITS["evaluate"] / 3, c.work / f"evaluate-{device}-{precision}.log")  # fmt: skip
    (new,) = set(c.run_dir.glob("evaluation_*")) - before
    return np.load(new / "val_probs.npy")


def step_evaluate(c: Check) -> dict:
    import numpy as np

    if c.run_dir is None:
        raise StepFailed("no run to evaluate (the resume step failed)")
    gpu, reference = c.device, _evaluated(c, "cpu", "fp32")  # evaluated once: the CPU in fp32 is deterministic
    # --device cpu (the plumbing): fp32 on "both sides" would be this same command again; its own precision (auto)
    # is the comparison made in another process
    strict = None if gpu == "cpu" else float(np.abs(_evaluated(c, gpu, "fp32") - reference).max())
    own = float(np.abs(_evaluated(c, gpu, "auto") - reference).max())
    if strict is not None and strict > EVALUATE_TOLERANCE:
        raise StepFailed(f"fp32 on {gpu} and on the CPU differ by {strict:.2e} > {EVALUATE_TOLERANCE}")
    return {"fp32_max_abs_difference": strict, "tolerance": EVALUATE_TOLERANCE,
            "own_precision_max_abs_difference": own}  # fmt: skip


def step_predict(c: Check) -> dict:
    if c.run_dir is None:
        raise StepFailed("no run to predict with (the resume step failed)")
    got = {}
    for device in dict.fromkeys((c.device, "cpu")):
        out = c.work / f"predict-{device}"
        _run(_gliograde("predict", "--runs", str(c.run_dir), "--data-root", str(c.data), "--device", device,
                        "--out", str(out)), LIMITS["predict"] / 2, c.work / f"predict-{device}.log")  # fmt: skip
        records = json.loads((out / "predictions.json").read_text())
        records = records["predictions"] if isinstance(records, dict) else records
        got[device] = {r["case"]: r["p_hgg"] for r in records}
    cases = sorted(got["cpu"])
    diff = max(abs(got[c.device][k] - got["cpu"][k]) for k in cases)
    if diff > PREDICT_TOLERANCE:
        raise StepFailed(f"P(HGG) on {c.device} and on the CPU differ by {diff:.3f} > {PREDICT_TOLERANCE}")
    return {"cases": len(cases), "max_abs_difference": diff, "tolerance": PREDICT_TOLERANCE}


STEPS: list[tuple[str, Callable[[Check], dict], bool]] = [  # name, step, needs CUDA
    ("doctor", step_doctor, False),
    ("pytest-gpu", step_pytest, True),
    ("bench", step_bench, True),
    ("ddp-fold", step_ddp_fold, False),
    ("resume", step_resume, False),
    ("evaluate", step_evaluate, False),
    ("predict", step_predict, False),
]


def run_check(device: str, work: Path, skip: set[str]) -> dict:
    import torch

    from gliograde import runtime

    c = Check(device, work)
    started, steps = time.perf_counter(), []
    for name, step, needs_cuda in STEPS:
        if name in skip or (needs_cuda and device != "cuda"):
            steps.append({"step": name, "status": "skipped"})
            continue
        t0 = time.perf_counter()
        try:
            figures, status, detail = step(c), "passed", None
        except StepFailed as e:
            figures, status, detail, tail = None, "failed", str(e), e.tail
        except Exception as e:  # a bug of the check itself: named, and the other steps go on
            figures, status, detail, tail = None, "failed", f"{type(e).__name__}: {e}", traceback.format_exc()
        else:
            tail = None
        steps.append({"step": name, "status": status, "seconds": round(time.perf_counter() - t0, 1),
                      "detail": detail, "figures": figures, "output_tail": tail})  # fmt: skip
        print(f"gpu-check: {name:<11} {status:<7} {steps[-1]['seconds']:7.1f} s  {detail or ''}", flush=True)
    return {
        "device": device,
        "gpus": runtime.gpus(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "passed": all(s["status"] in ("passed", "skipped") for s in steps),
        "wall_s": round(time.perf_counter() - started, 1),
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default="gpu-check.json", help="the report (default ./gpu-check.json)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: the plumbing only (tests)")
    p.add_argument("--workdir", default=None, help="keep the data, runs and logs here (default: a temp folder)")
    p.add_argument("--skip", nargs="*", default=[], choices=[s[0] for s in STEPS], help="steps to leave out")
    args = p.parse_args(argv)
    try:
        import numpy  # noqa: F401
        import torch

        import gliograde.cli  # noqa: F401  (every dependency the steps' commands import)
    except ImportError as e:
        print(f"gpu-check: {sys.executable} cannot import {e.name} ({e}); run it with the Python that holds the "
              "CUDA build of torch and gliograde's requirements (make gpu-check GPU_PYTHON=...; make gpu-wheels)",
              file=sys.stderr)  # fmt: skip
        return 1
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu-check: CUDA is not available here (torch {torch.__version__}, CUDA {torch.version.cuda}); run it "
              "on a GPU machine with the CUDA build of torch", file=sys.stderr)  # fmt: skip
        return 1
    tmp = tempfile.TemporaryDirectory(prefix="gliograde-gpu-check-") if args.workdir is None else None
    work = Path(tmp.name if tmp else args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = run_check(args.device, work, set(args.skip))
    finally:
        if tmp:
            tmp.cleanup()
    from gliograde.files import json_safe

    Path(args.json).write_text(json.dumps(json_safe(report), indent=2, default=str))
    print(f"gpu-check: {'PASSED' if report['passed'] else 'FAILED'} in {report['wall_s']:.0f} s; {args.json}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

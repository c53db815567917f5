"""Checkpoints: atomic writes, weights_only reads, and the evaluation policy (best_ema > best > error; never last)."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

import torch

from gliograde.errors import GliogradeError

BEST, BEST_EMA, LAST = "best.pt", "best_ema.pt", "last.pt"


class CheckpointError(GliogradeError):
    pass


def save_checkpoint(payload: dict, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename: a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def checkpoint_payload(cfg, record: dict, epoch: int, state_dict: dict, metrics: dict, is_ema: bool = False) -> dict:
    """What every gliograde checkpoint holds: the weights, the epoch and its monitored metrics, the configuration,
    and what `evaluate` / `predict` need to rebuild the network and prepare a new case, from `record`: "arch" (the
    network's description, networks.describe_model), "logit_scale" (the loss's: P(HGG) = softmax(s x logits)) and
    "preprocess" (the cache's preprocessing parameters)."""
    return {
        "model_state_dict": state_dict,
        "epoch": epoch,
        "val_metrics": {k: v for k, v in metrics.items() if not k.startswith("_")},
        "is_ema": is_ema,
        "config": cfg.to_dict(),
        "config_identity": cfg.identity(),
        "modalities": cfg.modalities,
        "size": cfg.size,
        "preprocess": record["preprocess"],
        "arch": record["arch"],
        "logit_scale": float(record["logit_scale"]),
    }


def checkpoint_logit_scale(ckpt: dict) -> float:
    """The scale s of P(HGG) = softmax(s x logits) a checkpoint was trained with: its recorded `logit_scale`; for a
    checkpoint written before it was recorded, the rule of then from its run configuration (LDAM: its s; else 1)."""
    if "logit_scale" in ckpt:
        return float(ckpt["logit_scale"])
    saved = ckpt.get("config") or {}
    return float(saved.get("ldam_s", 30.0)) if saved.get("loss") == "ldam" else 1.0


def save_epoch(writer, folder: Path, cfg, record, epoch, model, ema, metrics, improved, resume_state: dict) -> None:
    """The checkpoint policy of an epoch: best.pt when the raw weights improved, best_ema.pt when the EMA weights did
    (each with the metrics it was selected on), and last.pt (everything a resume needs) every epoch."""
    (m, em), (is_best, ema_best) = metrics, improved
    if is_best:
        writer.submit(checkpoint_payload(cfg, record, epoch, model.state_dict(), m), folder / BEST)
    if ema_best:
        writer.submit(checkpoint_payload(cfg, record, epoch, ema.module.state_dict(), em, True), folder / BEST_EMA)
    writer.submit({**checkpoint_payload(cfg, record, epoch, model.state_dict(), m), **resume_state}, folder / LAST)


def cpu_copy(obj):
    """A deep copy with every tensor copied to host memory: what a background writer may serialize while the
    training goes on changing the originals in place (on the CPU `.cpu()` would return the same tensor)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints (atomically, fsynced: `save_checkpoint`) on one background thread, from host copies taken
    on the caller's thread, so that the training loop never waits on the disk. Pending writes are kept by path: a
    newer payload for a path not yet written (last.pt of the next epoch, on a filesystem slower than an epoch)
    replaces the older one, so host memory holds at most one pending copy per file (best.pt, best_ema.pt, last.pt)
    plus the one being written, however far the disk lags. `flush` waits for every pending write and raises the
    first failure."""

    def __init__(self):
        self._pending: OrderedDict[Path, dict] = OrderedDict()
        self._cond = threading.Condition()
        self._writing = False
        self._closing = False
        self._error: BaseException | None = None
        self.replaced = 0  # payloads superseded before they were written (the disk lagged behind)
        self._thread = threading.Thread(target=self._run, name="checkpoints", daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                path, payload = self._pending.popitem(last=False)
                self._writing = True
            try:
                if self._error is None:
                    save_checkpoint(payload, path)
            except BaseException as e:  # kept for flush(): never lost, never raised on the wrong thread
                self._error = e
            finally:
                del payload
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()

    def submit(self, payload: dict, path: str | Path) -> None:
        self.check()
        copy, path = cpu_copy(payload), Path(path)
        with self._cond:
            if path in self._pending:
                del self._pending[path]  # superseded: the newer state goes to the end, after what came before it
                self.replaced += 1
            self._pending[path] = copy
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._pending) + int(self._writing)

    def check(self) -> None:
        if self._error is not None:
            raise CheckpointError(f"writing a checkpoint failed: {type(self._error).__name__}: {self._error}")

    def flush(self) -> None:
        with self._cond:
            while self._pending or self._writing:
                self._cond.wait()
        self.check()

    def close(self) -> None:
        """Finish every pending write (on errors too: an interrupted run keeps its last complete epoch)."""
        try:
            self.flush()
        finally:
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            self._thread.join(timeout=60)
            if self._thread.is_alive():
                logging.getLogger("gliograde").warning("the checkpoint writer did not finish within 60 s")


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a gliograde checkpoint (no model_state_dict)")
    return ckpt


def select_checkpoint(checkpoints_dir: str | Path, policy: str = "auto", ema_enabled: bool = True) -> Path:
    """The checkpoint for final evaluation (training_journey_summary.md §3.5, §6.6).

    auto: best_ema.pt if EMA was on and the file exists, else best.pt, else an error. best / best_ema: that file.
    last.pt is never an answer: it is the state of the last epoch, not the model selected on validation AUC.
    """
    d = Path(checkpoints_dir)
    if policy == "auto":
        if ema_enabled and (d / BEST_EMA).is_file():
            return d / BEST_EMA
        if (d / BEST).is_file():
            return d / BEST
        raise CheckpointError(
            f"no best checkpoint in {d} (looked for {BEST_EMA if ema_enabled else ''} {BEST}); "
            "last.pt is never used for evaluation"
        )
    if policy not in ("best", "best_ema"):
        raise CheckpointError(f"--checkpoint {policy!r} is not auto, best or best_ema (last.pt is never evaluated)")
    path = d / f"{policy}.pt"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    return path

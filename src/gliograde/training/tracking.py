"""Experiment tracking: a run's epochs and final numbers to TensorBoard event files and/or MLflow.

Both backends are optional and cost nothing when off (imported only when asked for):

    pip install tensorboard          # event files in <run_dir>/tensorboard/ (tensorboard --logdir results)
    pip install mlflow-skinny        # or the full `mlflow`; a tracking server or a local file store

`mlflow_uri`: None → MLflow off; "" or "default" → a local file store, <output_dir>/mlruns (beside runs/; view it
with `mlflow ui --backend-store-uri <that folder>`); anything else → that tracking URI (http(s)://server, file:...,
databricks, ...), a plain path is taken as a file store.

A tracking failure never ends a training run: an error of a backend while logging is reported once as a warning and
that backend is switched off for the rest of the run. Only a backend asked for explicitly and not installed (MLflow)
raises, before training starts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from numbers import Real
from pathlib import Path
from urllib.parse import urlparse

from gliograde.errors import GliogradeError

log = logging.getLogger("gliograde")

EXPERIMENT = "gliograde"
PARAM_MAX_CHARS = 500
TB_INSTALL = "TensorBoard event files off: pip install tensorboard"
MLFLOW_INSTALL = "MLflow tracking was asked for (--mlflow) but MLflow is not installed: pip install mlflow-skinny"

# history keys → tidy tags; keys not named here fall to the prefix rules of scalar_tag()
_TAGS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "ema_val_loss": "loss/ema_val",
    "lr_backbone": "lr/backbone",
    "lr_head": "lr/head",
    "train_volumes_per_s": "speed/volumes_per_s",
    "data_wait_fraction": "speed/data_wait_fraction",
    "peak_gpu_memory_gib": "system/peak_gpu_memory_gib",
    "drw_active": "train/drw_active",
}
_PREFIXES = (("ema_val_", "ema/val_"), ("val_", "val/"), ("lr_", "lr/"), ("train_", "train/"))


def scalar_tag(key: str) -> str:
    """The tag of one history key: train_loss → loss/train, val_auc → val/auc, lr_head → lr/head, ..."""
    if key in _TAGS:
        return _TAGS[key]
    for prefix, tag in _PREFIXES:
        if key.startswith(prefix) and len(key) > len(prefix):
            return tag + key[len(prefix) :]
    return f"other/{key}"


def _number(value) -> float | None:
    """A finite float for a numeric value (bools as 0/1), else None (None, strings, lists, NaN, inf are skipped)."""
    if isinstance(value, Real):
        try:
            x = float(value)
        except (TypeError, ValueError, OverflowError):
            return None
        return x if math.isfinite(x) else None
    return None


def flatten_params(config: dict, prefix: str = "") -> dict[str, bool | int | float | str]:
    """A config dict as flat params: nested dicts as a.b keys, lists joined by commas, strings cut to 500 chars."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in (config or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_params(value, f"{name}."))
            continue
        if isinstance(value, (bool, int, float)) and not (isinstance(value, float) and not math.isfinite(value)):
            out[name] = value
            continue
        text = ",".join(str(v) for v in value) if isinstance(value, (list, tuple, set)) else str(value)
        out[name] = text[:PARAM_MAX_CHARS]
    return out


def _final_scalars(final: dict, prefix: str = "final/") -> dict[str, float]:
    """The numeric entries of the final record (nested dicts as final/a.b; lists and strings left out)."""
    out: dict[str, float] = {}
    for key, value in (final or {}).items():
        if isinstance(value, dict):
            out.update(_final_scalars(value, f"{prefix}{key}."))
        elif (x := _number(value)) is not None:
            out[f"{prefix}{key}"] = x
    return out


def default_mlflow_dir(run_dir: Path) -> Path:
    """<output_dir>/mlruns for a run folder <output_dir>/runs/[repeat_r/]fold_k/run_*: beside runs/."""
    run_dir = Path(run_dir).resolve()
    for parent in run_dir.parents:
        if parent.name == "runs":
            return parent.parent / "mlruns"
    parents = run_dir.parents
    return (parents[2] if len(parents) > 2 else run_dir.parent) / "mlruns"


def resolve_mlflow_uri(mlflow_uri: str, run_dir: Path) -> str:
    """The tracking URI to use: "" / "default" → the local file store; a plain path → a file: URI."""
    uri = mlflow_uri.strip()
    if uri in ("", "default"):
        return default_mlflow_dir(run_dir).as_uri()
    scheme = urlparse(uri).scheme
    if len(scheme) <= 1:  # no scheme, or a Windows drive letter: a folder
        return Path(uri).expanduser().resolve().as_uri()
    return uri


def _read_png(path: Path):
    """HxWx3 float32 in [0, 1] (alpha dropped) or HxW for greyscale."""
    from matplotlib import image

    img = image.imread(str(path))
    if img.dtype.kind in "ui":  # imread gives floats for PNG, integers for other formats (through Pillow)
        img = img.astype("float32") / 255.0
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    return img


class RunLogger:
    """Logs one training run to TensorBoard (run_dir/tensorboard/) and/or MLflow (experiment "gliograde").

    Use from the main process only (rank 0). `params` (the run's config dict) become MLflow params and TensorBoard
    hparams. log_epoch() takes one metrics.json history entry; log_final() the final record, the figures (PNG)
    and the artifacts (files or folders: metrics.json, plots/, config/). close() ends the MLflow run; as a
    context manager, an exception marks the MLflow run FAILED.
    """

    def __init__(
        self,
        run_dir: Path,
        tensorboard: bool = True,
        mlflow_uri: str | None = None,
        run_name: str = "",
        params: dict | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.run_name = run_name or self.run_dir.name
        self.params = flatten_params(params or {})
        self._writer = None  # torch.utils.tensorboard.SummaryWriter
        self._client = None  # mlflow.tracking.MlflowClient
        self._run_id: str | None = None
        self._step = 0
        self._closed = False
        self.mlflow_uri: str | None = None
        if tensorboard:
            self._open_tensorboard()
        if mlflow_uri is not None:
            self._open_mlflow(mlflow_uri)

    # ---- set-up ------------------------------------------------------------------------------------------------

    def _open_tensorboard(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning(TB_INSTALL)
            return
        try:
            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        except Exception as e:
            log.warning("TensorBoard event files off: cannot write to %s (%s)", self.run_dir / "tensorboard", e)

    def _open_mlflow(self, mlflow_uri: str) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise GliogradeError(MLFLOW_INSTALL) from e
        uri = resolve_mlflow_uri(mlflow_uri, self.run_dir)
        self.mlflow_uri = uri
        if uri.startswith("file:"):
            # MLflow 3 keeps the file store in maintenance mode and refuses it unless this is set; it needs no
            # database packages (mlflow-skinny has none) and the folder can be migrated later (mlflow migrate-filestore)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            client = MlflowClient(tracking_uri=uri)
            experiment_id = self._experiment(client)
            run = client.create_run(
                experiment_id, run_name=self.run_name, tags={"gliograde.run_dir": str(self.run_dir.resolve())}
            )
            self._client, self._run_id = client, run.info.run_id
            self._mlflow_params()
        except Exception as e:
            self._client = None
            log.warning("MLflow tracking off: cannot start a run at %s (%s: %s)", uri, type(e).__name__, e)

    @staticmethod
    def _experiment(client) -> str:
        found = client.get_experiment_by_name(EXPERIMENT)
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(EXPERIMENT)
        except Exception:  # another fold's process created it first
            found = client.get_experiment_by_name(EXPERIMENT)
            if found is None:
                raise
            return found.experiment_id

    def _mlflow_params(self) -> None:
        from mlflow.entities import Param

        items = [Param(_mlflow_key(k), str(v)[:PARAM_MAX_CHARS]) for k, v in self.params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._client.log_batch(self._run_id, params=items[i : i + 100])

    # ---- state -------------------------------------------------------------------------------------------------

    @property
    def tensorboard_on(self) -> bool:
        return self._writer is not None

    @property
    def mlflow_on(self) -> bool:
        return self._client is not None

    @property
    def mlflow_run_id(self) -> str | None:
        return self._run_id

    def _tb_failed(self, e: Exception) -> None:
        log.warning("TensorBoard event files off for the rest of the run: %s: %s", type(e).__name__, e)
        writer, self._writer = self._writer, None
        with contextlib.suppress(Exception):
            writer.close()

    def _mlflow_failed(self, e: Exception) -> None:
        log.warning("MLflow tracking off for the rest of the run: %s: %s", type(e).__name__, e)
        self._client = None

    # ---- logging -----------------------------------------------------------------------------------------------

    def log_epoch(self, record: dict) -> None:
        """One metrics.json history entry: every numeric value as a scalar at step = its epoch."""
        if self._closed:
            return
        step = record.get("epoch")
        step = int(step) if isinstance(step, Real) and not isinstance(step, bool) else self._step + 1
        self._step = step
        scalars = {scalar_tag(k): x for k, v in record.items() if k != "epoch" and (x := _number(v)) is not None}
        if self._writer is not None:
            try:
                for tag, x in scalars.items():
                    self._writer.add_scalar(tag, x, step)
                self._writer.flush()
            except Exception as e:
                self._tb_failed(e)
        if self._client is not None:
            self._mlflow_metrics(scalars, step)

    def _mlflow_metrics(self, scalars: dict[str, float], step: int) -> None:
        try:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            items = [Metric(_mlflow_key(k), x, now, step) for k, x in scalars.items()]
            for i in range(0, len(items), 1000):
                self._client.log_batch(self._run_id, metrics=items[i : i + 1000])
        except Exception as e:
            self._mlflow_failed(e)

    def log_final(self, final: dict, figures: list[Path] = (), artifacts: list[Path] = ()) -> None:
        """The final record (scalars final/*, TensorBoard hparams with final auc/f1/balanced_accuracy), the PNG
        figures (TensorBoard images; MLflow artifacts under plots/) and the artifacts (MLflow: a file under its
        folder's name, e.g. metrics/metrics.json; a folder as itself, e.g. plots/)."""
        if self._closed:
            return
        final = final or {}
        scalars = _final_scalars(final)
        step = self._step
        if self._writer is not None:
            try:
                self._tb_final(final, scalars, figures, step)
            except Exception as e:
                self._tb_failed(e)
        if self._client is not None:
            self._mlflow_metrics(scalars, step)
        if self._client is not None:
            try:
                self._mlflow_artifacts(figures, artifacts)
            except Exception as e:
                self._mlflow_failed(e)

    def _tb_final(self, final: dict, scalars: dict[str, float], figures, step: int) -> None:
        from torch.utils.tensorboard.summary import hparams

        w = self._writer
        for tag, x in scalars.items():
            w.add_scalar(tag, x, step)
        metrics = {
            f"hparam/{k}": x for k in ("auc", "f1", "balanced_accuracy") if (x := _number(final.get(k))) is not None
        }
        if self.params or metrics:
            # what SummaryWriter.add_hparams writes, into this run's event file rather than a new sub-folder
            for summary in hparams(dict(self.params), metrics):
                w.file_writer.add_summary(summary, step)
            for tag, x in metrics.items():
                w.add_scalar(tag, x, step)
        for fig in figures:
            fig = Path(fig)
            if not fig.is_file():
                continue
            img = _read_png(fig)
            w.add_image(f"plots/{fig.stem}", img, step, dataformats="HWC" if img.ndim == 3 else "HW")
        w.flush()

    def _mlflow_artifacts(self, figures, artifacts) -> None:
        c, run = self._client, self._run_id
        folders = [Path(a).resolve() for a in artifacts if Path(a).is_dir()]
        for a in artifacts:
            a = Path(a)
            if a.is_dir():
                c.log_artifacts(run, str(a), artifact_path=a.name)
            elif a.is_file():
                c.log_artifact(run, str(a), artifact_path=a.parent.name or None)
        for fig in figures:
            fig = Path(fig)
            if fig.is_file() and fig.resolve().parent not in folders:
                c.log_artifact(run, str(fig), artifact_path="plots")

    def close(self, status: str = "FINISHED") -> None:
        """Flush and close the event file; end the MLflow run (FINISHED, or FAILED / KILLED). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception as e:
                log.warning("TensorBoard: closing the event file failed: %s: %s", type(e).__name__, e)
            self._writer = None
        if self._client is not None:
            try:
                self._client.set_terminated(self._run_id, status)
            except Exception as e:
                log.warning("MLflow: ending the run failed: %s: %s", type(e).__name__, e)
            self._client = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED"))


def _mlflow_key(key: str) -> str:
    """MLflow keys allow letters, digits, _ - . / and spaces: anything else becomes _."""
    return "".join(ch if ch.isalnum() or ch in "_-./ " else "_" for ch in key)

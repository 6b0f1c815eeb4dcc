"""MLflow tracking: opt-in, off by default, and never the reason a training run fails.

Tracking is on when ``run.mlflow_tracking_uri`` or the standard ``MLFLOW_TRACKING_URI`` is set
(:func:`resolve_tracking_uri`). Then the driver checks the server once before any training
(:func:`check_reachable`: one line, a few seconds), opens the run (:func:`start_run`), hands an
:class:`EpochLogger` to the Ray Train workers (rank 0 logs each epoch's metrics as they happen), and at the end
logs artifacts and the run's status. ``dermray evaluate`` adds its metrics and report to the checkpoint's run
(:func:`find_run`, :func:`log_evaluation`); the nightly cycle registers a promoted challenger
(:func:`register_champion`).

Design choices, and why:

- ``mlflow`` is imported inside the functions, never at module level: it is an optional extra
  (``pip install -e '.[mlflow]'``) and the default install must import and run without it.
- ``MlflowClient`` with explicit run ids, never ``mlflow.start_run``'s global active run: the run is opened by the
  driver and written to from Ray Train worker processes, which share no Python state with it.
- Once a run is open, an MLflow failure is a warning on stderr, never an exception: the training run, its
  checkpoints and dermray's own registry are the record; MLflow is a view of it. Only the start (an unreachable
  server, mlflow missing) is an error, because then the user can still fix it before any compute is spent.
- Every MLflow call runs under a time budget (:data:`_EPOCH`, :data:`_CONTROL`, :data:`_ARTIFACTS`): MLflow's
  defaults (120 s timeout, 7 retries with exponential backoff: about 4 minutes) would stall an epoch for minutes
  per call while a server is down.
- Nothing secret or identifying leaves: values pass through :func:`redact` (URI credentials and signed-URL
  queries removed, AWS key ids masked), keys that name secrets are dropped, and dermray's config, metrics and
  artifacts carry no patient or lesion identifiers (manifests keep only a salted hash of them, and none of it is
  logged here).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import numbers
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dermray.errors import DermrayError

ENV_VAR = "MLFLOW_TRACKING_URI"
CHAMPION_ALIAS = "champion"
RUN_URI_TAG = "dermray.run_uri"
RUN_KEY_TAG = "dermray.run_key"
CHECKPOINT_TAG = "dermray.checkpoint_uri"
PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests child runs under
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # shown by the MLflow UI on the run page

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]

# MLflow's server-side limits (mlflow.utils.validation): longer values or bigger batches are refused outright.
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000
_MAX_KEY = 250
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000

# EpochLogger keeps the metrics of epochs it could not send (a server outage) and sends them, with their own
# steps and timestamps, with the next epoch that gets through; beyond this many values the oldest are dropped.
_MAX_PENDING_METRICS = 20_000


@dataclass(frozen=True)
class _Budget:
    """How long one MLflow HTTP request may take and how often it is retried (MLflow reads these environment
    variables on every request, so they can be set per call)."""

    timeout_s: int
    retries: int


_EPOCH = _Budget(timeout_s=5, retries=0)  # per epoch: the next epoch is the retry (pending metrics are kept)
_CONTROL = _Budget(timeout_s=10, retries=2)  # run start/end, tags, registry: small requests, rarely
_ARTIFACTS = _Budget(timeout_s=30, retries=2)  # uploads: seconds per file on a slow link

_ENV_LOCK = threading.RLock()

_SECRET_KEY = re.compile(r"secret|password|passwd|token|credential|access_key|api_key|private_key", re.I)
# Query parameters that make a URL a bearer credential: S3 presigned URLs (SigV4 and V2), GCS signed URLs,
# Azure SAS tokens.
_SIGNED_QUERY = re.compile(r"x-amz-|x-goog-|awsaccesskeyid|signature|(^|&)(sig|se|sv|sp|token)=", re.I)
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
_BAD_KEY_CHARS = re.compile(r"[^\w\-./ :]")  # MLflow's allowed key characters: alphanumerics, _ - . / space :


# --------------------------------------------------------------------------------------------- configuration


def resolve_tracking_uri(config_value: str | None) -> str | None:
    """The tracking URI: ``run.mlflow_tracking_uri`` if set, else ``MLFLOW_TRACKING_URI``, else None (off).

    Unlike MLflow itself, no URI means no tracking, never a local ``./mlruns`` or ``mlflow.db`` written on the
    side."""
    for value in (config_value, os.environ.get(ENV_VAR)):
        if value is not None and value.strip():
            return value.strip()
    return None


def redact(text: str) -> str:
    """``text`` with every URL's user:password and signed query string removed and AWS access key ids masked:
    safe for a log line, a param or a tag."""

    def clean(match: re.Match[str]) -> str:
        url = match.group(0)
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError:
            return "<url>"
        netloc = parts.netloc.rsplit("@", 1)[-1]
        query = "<redacted>" if parts.query and _SIGNED_QUERY.search(parts.query) else parts.query
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))

    return _AWS_KEY_ID.sub("<aws-key-id>", _URL.sub(clean, text))


def flatten_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config (``Config.model_dump(mode="json")``) as MLflow params: dotted keys, string values (lists
    and dicts of non-mappings as JSON), each redacted and cut to MLflow's 6000 characters. Keys that name a
    secret are dropped."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if _SECRET_KEY.search(str(key)):
            continue
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{dotted}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        flat[_key(dotted)] = _cut(redact(text), _MAX_PARAM_VALUE)
    return flat


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit of the git checkout holding ``path`` (default: this package), or None when it is not a
    checkout (an installed wheel, a container without .git) or git is missing."""
    folder = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                                timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


# ------------------------------------------------------------------------------------------- start of a run


def check_reachable(uri: str) -> None:
    """Raise a one-line :class:`DermrayError` naming the (redacted) URI unless the tracking server answers within
    a few seconds: its ``/health`` for http(s), then one authenticated API call (wrong credentials or a refused
    Host header show here too, not after the first epoch)."""
    _mlflow()
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(_health_url(uri), timeout=_CONTROL.timeout_s / 2) as response:
                response.read(64)
        except urllib.error.HTTPError as error:
            raise _unreachable(uri, f"/health answered HTTP {error.code}") from None
        except (OSError, ValueError) as error:
            raise _unreachable(uri, _reason(error)) from None
    try:
        with _budget(_Budget(timeout_s=5, retries=0)):
            _client(uri).search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - any failure here is the same one line to the user
        raise _unreachable(uri, _reason(error)) from None


def start_run(uri: str, experiment: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str],
              parent_run_id: str | None = None, run_uri: str | None = None, resume: bool = False) -> str:
    """Open (or, with ``resume``, reopen) a run in ``experiment`` (created if missing) and return its id.

    ``params`` may be nested (a config dump): they are flattened and logged in batches of MLflow's 100.
    ``run_uri`` (``<run.storage>/<run.name>``) is tagged on the run; with ``resume=True`` (dermray found a
    checkpoint to resume from) the latest run carrying the same ``run_uri`` is reopened, whatever its status,
    so that one dermray run folder is one MLflow run with one unbroken curve; without one a new run starts.
    A new run under ``parent_run_id`` is nested under it (a sweep's trial). Raises :class:`DermrayError` on any
    failure: it runs before training, where failing is still cheap."""
    client = _client(uri)
    flat = flatten_params(params)
    all_tags = {k: _cut(redact(str(v)), _MAX_TAG_VALUE) for k, v in tags.items() if not _SECRET_KEY.search(k)}
    if run_uri is not None:
        all_tags[RUN_URI_TAG] = _cut(redact(run_uri), _MAX_TAG_VALUE)
        all_tags[RUN_KEY_TAG] = _run_key(run_uri)
    if parent_run_id is not None:
        all_tags[PARENT_TAG] = parent_run_id
    try:
        with _budget(_CONTROL):
            experiment_id = _experiment_id(client, experiment)
            run_id = _find_run(client, experiment_id, run_uri) if resume and run_uri is not None else None
            if run_id is None:
                run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
                existing: dict[str, str] = {}
            else:
                client.update_run(run_id, status="RUNNING")
                existing = client.get_run(run_id).data.params
            changed = sorted(k for k, v in flat.items() if k in existing and existing[k] != v)
            fresh = {k: v for k, v in flat.items() if k not in existing}
            _log_batch(client, run_id, params=fresh, tags=all_tags)
    except DermrayError:
        raise
    except Exception as error:  # noqa: BLE001 - one line, before any training
        raise DermrayError(f"MLflow run could not be started on {redact(uri)}: {_reason(error)}") from None
    if changed:
        # MLflow params are immutable: a resumed run keeps its first values; say which ones differ now.
        warn(f"resumed MLflow run {run_id} keeps its logged values of {', '.join(changed[:10])}"
              f"{' ...' if len(changed) > 10 else ''} (params cannot change); this launch's config.yaml has the "
              "new ones")
    return run_id


def find_run(uri: str, experiment: str, run_uri: str) -> str | None:
    """The latest run of ``experiment`` opened for ``run_uri`` (e.g. the run a checkpoint belongs to, for
    ``dermray evaluate``), or None when there is none or MLflow fails (a warning)."""
    try:
        with _budget(_CONTROL):
            client = _client(uri)
            found = client.get_experiment_by_name(experiment)
            return None if found is None else _find_run(client, found.experiment_id, run_uri)
    except Exception as error:  # noqa: BLE001
        warn(f"MLflow run lookup on {redact(uri)} failed ({_reason(error)}); nothing logged there")
        return None


# ---------------------------------------------------------------------------------------------- during a run


@dataclass
class EpochLogger:
    """Logs one epoch's metrics at a time to an open run; passed into Ray Train workers (it pickles as its URI and
    run id). Never raises: a failure warns once per outage on stderr, keeps the values, and sends them with the
    next epoch that gets through, each call blocking at most about ``timeout_s``."""

    uri: str
    run_id: str
    timeout_s: int = _EPOCH.timeout_s
    _pending: list[Any] = field(default_factory=list, init=False, repr=False, compare=False)
    _failing: bool = field(default=False, init=False, repr=False, compare=False)
    _dropped: int = field(default=0, init=False, repr=False, compare=False)
    _lock: Any = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "run_id": self.run_id, "timeout_s": self.timeout_s}  # a lock does not pickle

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def log(self, metrics: Mapping[str, Any], step: int) -> bool:
        """Log the numeric entries of ``metrics`` at ``step`` (others are skipped); True when they, and any kept
        from earlier failed calls, reached the server."""
        now = int(time.time() * 1000)
        with self._lock:
            # Plain tuples until sent: MLflow's Metric is built inside the guarded block (mlflow missing on a worker
            # is one more warning, not a failed epoch).
            self._pending.extend((_key(k), v, now, int(step)) for k, v in _numeric(metrics).items())
            if len(self._pending) > _MAX_PENDING_METRICS:
                self._dropped += len(self._pending) - _MAX_PENDING_METRICS
                del self._pending[: len(self._pending) - _MAX_PENDING_METRICS]
            try:
                with _budget(_Budget(timeout_s=self.timeout_s, retries=0)):
                    from mlflow.entities import Metric

                    client = _client(self.uri)
                    while self._pending:
                        client.log_batch(self.run_id, metrics=[Metric(*m) for m in self._pending[:_METRICS_PER_BATCH]])
                        del self._pending[:_METRICS_PER_BATCH]
            except Exception as error:  # noqa: BLE001 - tracking never stops training
                if not self._failing:
                    warn(f"MLflow tracking at {redact(self.uri)} failed ({_reason(error)}); training continues, "
                          "metrics are kept and sent when the server answers again")
                self._failing = True
                return False
            if self._failing:
                lost = f", {self._dropped} of the oldest values dropped" if self._dropped else ""
                warn(f"MLflow tracking at {redact(self.uri)} answers again: kept metrics sent{lost}",
                      prefix="[dermray] ")
                self._failing, self._dropped = False, 0
            return True


def logged_steps(uri: str, run_id: str, key: str) -> set[int] | None:
    """The steps at which ``key`` was logged on the run, or None (and a warning) when MLflow cannot say: lets the
    driver send, at the end of a run, the epochs an outage kept from arriving."""
    steps: list[int] = []
    ok = _safely(uri, "metric history", _CONTROL,
                 lambda client: steps.extend(m.step for m in client.get_metric_history(run_id, _key(key))))
    return set(steps) if ok else None


def set_tags(uri: str, run_id: str, tags: Mapping[str, str]) -> bool:
    """Set (redacted) tags on a run, e.g. the best checkpoint's URI at the end; False and a warning on failure."""
    safe = {k: _cut(redact(str(v)), _MAX_TAG_VALUE) for k, v in tags.items() if not _SECRET_KEY.search(k)}
    return _safely(uri, "tags", _CONTROL, lambda client: _log_batch(client, run_id, tags=safe))


def log_artifacts(uri: str, run_id: str, files: Mapping[str, bytes | str | Path],
                  artifact_path: str | None = None) -> bool:
    """Upload ``files`` (artifact name, e.g. ``config.yaml`` or ``eval/report.html`` -> bytes or a local path)
    under the run's artifacts (``artifact_path`` if given); False and a warning on failure. Weights are never
    meant to go here: a checkpoint is referenced by its URI (a tag), not copied."""
    def upload(client: Any) -> None:
        with tempfile.TemporaryDirectory(prefix="dermray-mlflow-") as folder:
            for name, content in files.items():
                target = Path(folder, *_safe_name(name).split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, bytes):
                    target.write_bytes(content)
                else:
                    shutil.copyfile(content, target)
            client.log_artifacts(run_id, folder, artifact_path)

    return _safely(uri, "artifact upload", _ARTIFACTS, upload)


def set_terminated(uri: str, run_id: str, status: RunStatus = "FINISHED") -> bool:
    """Close a run as FINISHED, FAILED or KILLED; False and a warning on failure."""
    return _safely(uri, "run end", _CONTROL, lambda client: client.set_terminated(run_id, status))


def end_open_children(uri: str, parent_run_id: str, status_of: Callable[[str], RunStatus]) -> int:
    """Close the child runs of ``parent_run_id`` still RUNNING, each with ``status_of(its run name)``: a trial
    that Tune stops from outside (ASHA at a rung, or at its last epoch) never reaches its own end. How many were
    closed; 0 and a warning on failure."""
    ended: list[str] = []

    def close(client: Any) -> None:
        parent = client.get_run(parent_run_id)
        running = client.search_runs([parent.info.experiment_id], max_results=1000,
                                     filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and "
                                                   "attributes.status = 'RUNNING'")
        for run in running:
            client.set_terminated(run.info.run_id, status_of(run.info.run_name or ""))
            ended.append(run.info.run_id)

    _safely(uri, "closing a sweep's trial runs", _CONTROL, close)
    return len(ended)


def log_evaluation(uri: str, run_id: str, metrics: Mapping[str, Any], report_html: bytes | str | Path | None = None,
                   prefix: str = "eval") -> bool:
    """Log an evaluation to a (possibly finished) run: its numeric metrics, nested dicts flattened with ``/``,
    as ``<prefix>/<name>`` at step 0, and its report as ``<prefix>/report.html``; False and a warning on
    failure."""
    now = int(time.time() * 1000)
    numeric = _numeric(_flatten_metrics(metrics))

    def log(client: Any) -> None:
        from mlflow.entities import Metric

        values = [Metric(_key(f"{prefix}/{k}"), v, now, 0) for k, v in numeric.items()]
        for start in range(0, len(values), _METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=values[start:start + _METRICS_PER_BATCH])

    logged = _safely(uri, "evaluation metrics", _CONTROL, log)
    if report_html is not None:
        logged = log_artifacts(uri, run_id, {"report.html": report_html}, artifact_path=_safe_name(prefix)) and logged
    return logged


# --------------------------------------------------------------------------------------------- the registry


def register_champion(uri: str, model_name: str, run_id: str, checkpoint_uri: str,
                      tags: Mapping[str, str] | None = None) -> str | None:
    """Make the checkpoint a version of registered model ``model_name`` (created if missing) and point alias
    ``champion`` at it; return the version, or None and a warning on any MLflow failure (dermray's own
    registry has already promoted: MLflow's view lagging is never a failed promotion).

    Idempotent: a version already registered for this run and checkpoint is reused, so a retried call makes no
    second version. The version's source is the checkpoint URI itself when it is remote (s3://...): no weights
    are copied. A local checkpoint path is refused as a source by the MLflow server (it would read the server's
    own disk), so there the source is the training run (``runs:/<run_id>``); the ``dermray.checkpoint_uri`` tag
    holds the checkpoint's URI in both cases."""
    checkpoint = redact(checkpoint_uri)
    scheme = urllib.parse.urlsplit(checkpoint).scheme.lower()
    source = checkpoint if scheme not in ("", "file") and len(scheme) > 1 else f"runs:/{run_id}"  # "C:" is a drive
    version_tags = {CHECKPOINT_TAG: checkpoint} | {k: redact(str(v)) for k, v in (tags or {}).items()}

    def register(client: Any) -> str:
        from mlflow.exceptions import MlflowException

        try:
            client.create_registered_model(model_name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # Filtered on the run id only (hex: nothing to escape); the name and checkpoint are compared here.
        versions = [v for v in client.search_model_versions(f"run_id='{run_id}'")
                    if v.name == model_name and v.tags.get(CHECKPOINT_TAG) == checkpoint]
        if versions:
            version = max(versions, key=lambda v: int(v.version)).version
        else:
            version = client.create_model_version(model_name, source, run_id=run_id, tags=version_tags,
                                                  await_creation_for=0).version
        client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version)
        return str(version)

    result: list[str] = []
    ok = _safely(uri, f"registration of model '{model_name}'", _CONTROL, lambda client: result.append(register(client)))
    return result[0] if ok else None


def champion_version(uri: str, model_name: str) -> str | None:
    """The version alias ``champion`` of ``model_name`` points at, or None when the model or alias does not exist.
    Raises :class:`DermrayError` when the server cannot be asked."""
    from mlflow.exceptions import MlflowException

    try:
        with _budget(_CONTROL):
            return str(_client(uri).get_model_version_by_alias(model_name, CHAMPION_ALIAS).version)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise DermrayError(f"MLflow registry on {redact(uri)}: {_reason(error)}") from None
    except Exception as error:  # noqa: BLE001
        raise DermrayError(f"MLflow registry on {redact(uri)}: {_reason(error)}") from None


# ------------------------------------------------------------------------------------------------- internals


def _mlflow() -> Any:
    """The mlflow module, or the one-line error that says how to install it."""
    try:
        import mlflow
    except ImportError:
        raise DermrayError("run.mlflow_tracking_uri is set but mlflow is not installed: "
                           "pip install -e '.[mlflow]'") from None
    return mlflow


_CLIENTS: dict[str, Any] = {}


def _client(uri: str) -> Any:
    """One MlflowClient per URI and process (workers reuse theirs across epochs)."""
    _mlflow()
    from mlflow.tracking import MlflowClient

    if uri not in _CLIENTS:
        _CLIENTS[uri] = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return _CLIENTS[uri]


@contextlib.contextmanager
def _budget(budget: _Budget) -> Iterator[None]:
    """Run MLflow calls with this request timeout and retry count. MLflow reads its HTTP settings from the
    environment on every request, so they are set around the call and put back; the lock keeps two threads of
    one process from interleaving their settings."""
    settings = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(budget.timeout_s),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(budget.retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # an int in MLflow: 0 s, 2 s, 4 s ... between retries
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
        # MlflowClient.set_terminated prints the run's URL on stdout, which is the JSON summary's alone.
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    }
    with _ENV_LOCK:
        saved = {name: os.environ.get(name) for name in settings}
        os.environ.update(settings)
        # MLflow's client telemetry would call out of clusters that hold medical data; the user can still opt in.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _safely(uri: str, what: str, budget: _Budget, call: Any) -> bool:
    """``call(client)`` under ``budget``; any failure is a warning, never an exception (the run is open)."""
    try:
        with _budget(budget):
            call(_client(uri))
        return True
    except Exception as error:  # noqa: BLE001 - tracking never fails a dermray command once it has started
        warn(f"MLflow {what} on {redact(uri)} failed ({_reason(error)}); continuing without it")
        return False


def _experiment_id(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise DermrayError(f"MLflow experiment '{name}' is deleted: restore it in the MLflow UI or set "
                               "run.mlflow_experiment to another name")
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as error:  # two trials creating it at once: the other one won
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def _find_run(client: Any, experiment_id: str, run_uri: str) -> str | None:
    # Matched on a hash of the run's URI: a hex string needs no escaping in MLflow's filter language.
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{_run_key(run_uri)}'",
                              max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def _log_batch(client: Any, run_id: str, params: Mapping[str, str] | None = None,
               tags: Mapping[str, str] | None = None) -> None:
    from mlflow.entities import Param, RunTag

    entries = [Param(k, v) for k, v in (params or {}).items()] + [RunTag(k, v) for k, v in (tags or {}).items()]
    for start in range(0, len(entries), _PARAMS_PER_BATCH):
        chunk = entries[start:start + _PARAMS_PER_BATCH]
        client.log_batch(run_id, params=[e for e in chunk if isinstance(e, Param)],
                         tags=[e for e in chunk if isinstance(e, RunTag)])


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The entries MLflow can plot: real numbers (numpy and 0-d torch scalars too), not bools or strings."""
    values: dict[str, float] = {}
    for key, value in metrics.items():
        if hasattr(value, "item") and not isinstance(value, numbers.Number):
            try:
                value = value.item()
            except (TypeError, ValueError, RuntimeError):  # not a single number (a vector tensor)
                continue
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            values[str(key)] = float(value)
    return values


def _flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            flat.update(_flatten_metrics(value, prefix=f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _health_url(uri: str) -> str:
    """``<uri>/health`` without user:password (urllib cannot connect to such a host, and /health needs none)."""
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))


def _key(name: str) -> str:
    return _BAD_KEY_CHARS.sub("_", name)[:_MAX_KEY]


def _safe_name(name: str) -> str:
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"not a relative artifact name: {name!r}")
    return "/".join(parts)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _run_key(run_uri: str) -> str:
    return hashlib.sha256(run_uri.rstrip("/").encode()).hexdigest()[:32]


def _reason(error: BaseException) -> str:
    """An exception as a short single line without credentials. MLflow wraps a network failure in three layers
    of requests/urllib3 text; the root cause (refused, timed out, unknown host) is what the user acts on."""
    seen: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and cause not in seen:
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__ or getattr(cause, "reason", None)
        cause = cause if isinstance(cause, BaseException) else None
    for link in reversed(seen):
        if isinstance(link, ConnectionRefusedError):
            return "connection refused"
        if isinstance(link, TimeoutError) or "timed out" in str(link).lower():
            return "timed out"
        if isinstance(link, socket.gaierror):
            return "host not found"
    code = getattr(error, "error_code", None)
    text = " ".join(str(error).split()) or type(error).__name__
    if "Max retries exceeded" in text:  # a connection failure whose cause did not survive: urllib3's own words
        text = text.split("Caused by", 1)[-1].strip(" ()")
    return _cut(redact(f"{code}: {text}" if code and code not in text else text), 300)


def _unreachable(uri: str, reason: str) -> DermrayError:
    return DermrayError(f"MLflow tracking server {redact(uri)} is unreachable ({reason}): start it, fix "
                        f"run.mlflow_tracking_uri or {ENV_VAR}, or unset both to train without tracking")


def warn(message: str, prefix: str = "[dermray] warning: ") -> None:
    # os.write, not print: one unbuffered write per line, not interleaved with other output of a Ray worker.
    os.write(2, f"{prefix}{' '.join(message.split())}\n".encode())

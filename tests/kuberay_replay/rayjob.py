"""KubeRay 1.7's RayJob controller (K8sJobMode) replayed on this machine.

    New -> Initializing   jobId, rayClusterName and startTime set; the RayCluster is created
    Initializing -> Running  once every pod is up: dashboardURL set, the submitter Job created
    Running                jobStatus / message from the Ray job (the dashboard's job API)
    Running -> Complete    the Ray job SUCCEEDED or STOPPED and the submitter has finished
    Running -> Failed      the Ray job FAILED (reason AppFailed), the submitter failed
                           (SubmissionFailed), or activeDeadlineSeconds passed
                           (DeadlineExceeded); endTime set
    Failed -> Retrying -> New   while failures <= backoffLimit (not after DeadlineExceeded):
                           the cluster and the submitter are deleted and it starts over

As in rayjob_controller.go, the status is written only when jobStatus or jobDeploymentStatus
changes (a new message alone is not written), and `failed` / `succeeded` count the attempts.
The submitter runs in the container of `submitterPodTemplate` (its env resolved), with what
KubeRay's configureSubmitterContainer adds (PYTHONUNBUFFERED, RAY_DASHBOARD_ADDRESS,
RAY_JOB_SUBMISSION_ID, the token) and, unless the template sets a command, KubeRay's own
(common/job.go `BuildJobSubmitCommand`): wait for the dashboard, `ray job status` ||
`ray job submit --no-wait --submission-id ID -- ENTRYPOINT`, then `ray job logs --follow ID`.
Its output is the submitter pod's log (where the operator reads progress); a failed pod is
retried up to the Job's backoffLimit of 2, as a Kubernetes Job retries it.
"""

from __future__ import annotations

import datetime
import logging
import secrets as secret_tokens
import shlex
import string
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.kuberay_replay.nodes import TEST_ENV, RayCluster, image_env
from tests.kuberay_replay.pods import Pod, container_env

log = logging.getLogger("kuberay_replay")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
SUBMITTER_BACKOFF_LIMIT = 2  # KubeRay's default submitterConfig.backoffLimit
# The Job controller's delay before it replaces a failed pod: 10 s, doubled per failure.
POD_BACKOFF_SECONDS = 10.0
POLL_SECONDS = 1.0
HEALTH = (
    'python -c "import sys, urllib.request; '
    "sys.exit(urllib.request.urlopen('{url}/api/gcs_healthz', timeout=5).status != 200)\""
)
# (status) -> None: the whole RayJob status as KubeRay would write it.
StatusWriter = Callable[[dict[str, Any]], None]
# (pod name, log text) -> None: the submitter pod's log so far.
LogWriter = Callable[[str, str], None]


def utcnow() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rfc3339(ms: int | None) -> str | None:
    if not ms:
        return None
    when = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def random_suffix(n: int = 5) -> str:
    """utilrand.String(5): lowercase consonants and digits, as KubeRay names things."""
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    return "".join(secret_tokens.choice(alphabet) for _ in range(n))


def new_token() -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secret_tokens.choice(alphabet) for _ in range(32))


@dataclass
class RayJobResult:
    status: dict[str, Any]
    submitter_logs: list[str]  # one per submitter pod, in order
    attempts: int


def submit_command(ray_job: dict[str, Any], dashboard: str, job_id: str) -> str:
    """KubeRay's K8sJobMode submitter command (a bash script run with -ce)."""
    spec = ray_job["spec"]
    entrypoint = spec["entrypoint"].strip()
    wait = (
        f"until {HEALTH.format(url=dashboard)} >/dev/null 2>&1 ; do echo "
        f'"Waiting for Ray Dashboard GCS to become healthy at {dashboard} ..." ; sleep 2 ; done'
    )
    submit = ["ray", "job", "submit", "--address", dashboard, "--no-wait"]
    if spec.get("runtimeEnvYAML"):
        raise NotImplementedError("runtimeEnvYAML is not replayed")
    if spec.get("metadata"):
        import json

        submit += ["--metadata-json", shlex.quote(json.dumps(spec["metadata"]))]
    submit += ["--submission-id", job_id]
    for flag, key in (
        ("--entrypoint-num-cpus", "entrypointNumCpus"),
        ("--entrypoint-num-gpus", "entrypointNumGpus"),
    ):
        if spec.get(key):
            submit += [flag, f"{float(spec[key]):f}"]
    if spec.get("entrypointResources"):
        submit += ["--entrypoint-resources", shlex.quote(spec["entrypointResources"])]
    # As KubeRay: the entrypoint goes after `--` unquoted, for the shell to split.
    return (
        f"{wait} ; if ! ray job status --address {dashboard} {job_id} >/dev/null 2>&1 ; "
        f"then {' '.join(submit)} -- {entrypoint} ; fi ; "
        f"ray job logs --address {dashboard} --follow {job_id}"
    )


class RayJobReplay:
    """Runs one RayJob to its end as KubeRay would, writing its status as it goes."""

    def __init__(
        self,
        ray_job: dict[str, Any],
        *,
        workdir: Path,
        config_maps: dict[str, dict[str, str]] | None = None,
        secrets: dict[str, dict[str, str]] | None = None,
        write_status: StatusWriter | None = None,
        write_log: LogWriter | None = None,
        keep_cluster_seconds: float = 0,
        now: Callable[[], str] = utcnow,
    ) -> None:
        self.ray_job = ray_job
        self.spec = ray_job["spec"]
        self.name = ray_job["metadata"]["name"]
        self.namespace = ray_job["metadata"].get("namespace") or "default"
        self.workdir = workdir
        self.config_maps = dict(config_maps or {})
        self.secrets = dict(secrets or {})
        self.write_status = write_status or (lambda _: None)
        self.write_log = write_log or (lambda *_: None)
        # ttlSecondsAfterFinished, shortened: the tests need not wait 10 minutes.
        self.keep_cluster_seconds = keep_cluster_seconds
        self.now = now
        self.status: dict[str, Any] = {}
        self.logs: list[str] = []
        self.cluster: RayCluster | None = None
        self.clusters: list[RayCluster] = []  # one per attempt, for what tests check after
        self.submitters: list[_Submitter] = []

    def run(self, timeout: float = 900) -> RayJobResult:
        if self.spec.get("submissionMode", "K8sJobMode") != "K8sJobMode":
            raise NotImplementedError("only K8sJobMode is replayed")
        deadline = time.monotonic() + timeout
        attempts = 0
        failed = succeeded = 0
        while True:
            attempts += 1
            self._write(
                {
                    "jobId": f"{self.name}-{random_suffix()}",
                    "rayClusterName": f"{self.name}-raycluster-{random_suffix()}",
                    "jobStatus": "",
                    "jobDeploymentStatus": "Initializing",
                    "startTime": self.now(),
                    "failed": failed,
                    "succeeded": succeeded,
                },
                replace=True,
            )
            outcome = self._attempt(deadline)
            if outcome == "Complete" and self.status.get("jobStatus") == "SUCCEEDED":
                succeeded += 1
            if outcome == "Failed":
                failed += 1
            self.status.update(failed=failed, succeeded=succeeded)
            limit = self.spec.get("backoffLimit")
            retry = (
                outcome == "Failed"
                and limit is not None
                and failed < limit + 1
                and self.status.get("reason") != "DeadlineExceeded"
            )
            if not retry:
                self._write({"jobDeploymentStatus": outcome, "endTime": self.now()})
                self._finish()
                return RayJobResult(dict(self.status), list(self.logs), attempts)
            # Failed -> Retrying (one write), cluster and submitter deleted, -> New.
            self._write({"jobDeploymentStatus": "Retrying"})
            self._teardown()

    # --- one attempt ------------------------------------------------------------------

    def _attempt(self, deadline: float) -> str:
        """Initializing -> Running -> the terminal jobDeploymentStatus of this attempt."""
        cluster = RayCluster(
            self.spec["rayClusterSpec"],
            name=self.status["rayClusterName"],
            namespace=self.namespace,
            workdir=self.workdir / self.status["rayClusterName"],
            token=new_token(),
            secrets=self.secrets,
            config_maps=self.config_maps,
            pvc_dir=self.workdir / "pvc",
        )
        self.cluster = cluster
        self.clusters.append(cluster)
        cluster.start(timeout=max(30, deadline - time.monotonic()))
        self._write({"dashboardURL": cluster.dashboard_url.removeprefix("http://")}, changed=False)
        self._write({"jobDeploymentStatus": "Running"})
        pods = 0
        submitter: _Submitter | None = self._start_submitter(cluster, pods)
        restart_at = 0.0
        while True:
            expired = self._deadline_passed()
            if expired:
                return expired
            if time.monotonic() > deadline:
                raise TimeoutError(f"RayJob {self.name} still {self.status} when time ran out")
            info = self._job_info(cluster)
            if info is not None:
                update = {"jobStatus": info["status"], "message": info.get("message") or ""}
                times = {
                    "startTime": _rfc3339(info.get("start_time")),
                    "endTime": _rfc3339(info.get("end_time")),
                }
                times = {k: v for k, v in times.items() if v}
                self.status["rayJobInfo"] = times
                self._write(update)
            if submitter is None:
                if time.monotonic() >= restart_at:
                    submitter = self._start_submitter(cluster, pods)
                time.sleep(POLL_SECONDS)
                continue
            self._publish_log(submitter)
            code = submitter.process.poll()
            if code is not None and code != 0:
                pods += 1
                log.warning(
                    "submitter pod %s exited %s:\n%s", submitter.pod, code, self.logs[-1][-3000:]
                )
                if pods > SUBMITTER_BACKOFF_LIMIT:
                    if self.status.get("jobStatus") == "FAILED":
                        self.status["reason"] = "AppFailed"
                    else:
                        self.status["reason"] = "SubmissionFailed"
                        self.status["message"] = (
                            "Job submission has failed. Reason: BackoffLimitExceeded. "
                            "Message: Job has reached the specified backoff limit"
                        )
                    return "Failed"
                submitter = None
                restart_at = time.monotonic() + POD_BACKOFF_SECONDS * 2 ** (pods - 1)
                continue
            if info is not None and info["status"] in TERMINAL and code == 0:
                if info["status"] == "FAILED":
                    self.status["reason"] = "AppFailed"
                    return "Failed"
                return "Complete"
            time.sleep(POLL_SECONDS)

    def _deadline_passed(self) -> str | None:
        seconds = self.spec.get("activeDeadlineSeconds")
        if seconds is None:
            return None
        started = datetime.datetime.strptime(self.status["startTime"], "%Y-%m-%dT%H:%M:%SZ")
        started = started.replace(tzinfo=datetime.UTC)
        if datetime.datetime.now(datetime.UTC) < started + datetime.timedelta(seconds=seconds):
            return None
        self.status["reason"] = "DeadlineExceeded"
        self.status["message"] = (
            "The RayJob has passed the activeDeadlineSeconds. StartTime: "
            f"{self.status['startTime']}. ActiveDeadlineSeconds: {seconds}"
        )
        return "Failed"

    def _job_info(self, cluster: RayCluster) -> dict[str, Any] | None:
        try:
            response = cluster.get(f"/api/jobs/{self.status['jobId']}")
        except Exception:  # the dashboard is busy or restarting: ask again next time
            return None
        return response.json() if response.status_code == 200 else None

    # --- the submitter (a Kubernetes Job, one pod per try) ------------------------------

    def _start_submitter(self, cluster: RayCluster, index: int) -> _Submitter:
        """One pod of the submitter Job: the RayJob's submitterPodTemplate (or KubeRay's
        default container), its env plus what KubeRay's configureSubmitterContainer adds, and
        KubeRay's command unless the template has one."""
        dashboard = cluster.dashboard_url
        pod = f"{self.name}-{random_suffix()}"
        template = (self.spec.get("submitterPodTemplate") or {}).get("spec") or {}
        container = (template.get("containers") or [{}])[0]
        env = image_env()
        env.update(TEST_ENV)
        as_pod = Pod(pod, "submitter", False, container, template.get("volumes") or [], {})
        env.update(
            container_env(
                as_pod, namespace=self.namespace, secrets=self.secrets, config_maps=self.config_maps
            )
        )
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "RAY_DASHBOARD_ADDRESS": dashboard.removeprefix("http://"),
                "RAY_JOB_SUBMISSION_ID": self.status["jobId"],
            }
        )
        for key, value in cluster.auth.items():
            env.setdefault(key, value)
        if container.get("command"):
            argv = [*container["command"], *(container.get("args") or [])]
        else:
            argv = [
                "/bin/bash",
                "-ce",
                "--",
                submit_command(self.ray_job, dashboard, self.status["jobId"]),
            ]
        path = self.workdir / self.status["rayClusterName"] / f"submitter-{index}.log"
        out = path.open("w")
        process = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        out.close()
        self.logs.append("")
        self.submitters.append(_Submitter(pod, path, process))
        return self.submitters[-1]

    def _publish_log(self, submitter: _Submitter) -> None:
        text = submitter.log.read_text(errors="replace")
        if text != self.logs[-1]:
            self.logs[-1] = text
            self.write_log(submitter.pod, text)

    # --- status -----------------------------------------------------------------------

    def _write(self, update: dict[str, Any], *, replace: bool = False, changed: bool = True):
        before = (self.status.get("jobStatus"), self.status.get("jobDeploymentStatus"))
        if replace:
            kept = {k: self.status[k] for k in ("failed", "succeeded") if k in self.status}
            self.status = {**kept, **update}
        else:
            self.status.update(update)
        after = (self.status.get("jobStatus"), self.status.get("jobDeploymentStatus"))
        if changed and (replace or before != after):
            self.write_status(dict(self.status))

    def _teardown(self) -> None:
        self._stop_submitters()
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None
        for key in ("dashboardURL", "jobId", "message", "reason", "rayJobInfo"):
            self.status.pop(key, None)

    def _finish(self) -> None:
        if self.spec.get("shutdownAfterJobFinishes"):
            time.sleep(self.keep_cluster_seconds)
            self._stop_submitters()
            if self.cluster is not None:
                self.cluster.stop()
                self.cluster = None

    def stop(self) -> None:
        """Whatever is still running (a test that ends early)."""
        self._stop_submitters()
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None

    def _stop_submitters(self) -> None:
        for submitter in self.submitters:
            if submitter.process.poll() is None:
                submitter.process.kill()
                submitter.process.wait()


@dataclass
class _Submitter:
    pod: str
    log: Path
    process: subprocess.Popen

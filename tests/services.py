"""Real services for tests on this machine: PostgreSQL, `mlflow server`, Ray (one node or several).

Each is a context manager that ends every process it started and checks that none is left:
`mlflow server` 3.17 runs uvicorn and a job runner with several `huey_consumer` workers beside its
own pid, so it is started in a session of its own and stopped as a whole process group; PostgreSQL
and Ray are stopped through their own tools, then their process trees are checked.

PostgreSQL and `mlflow server` listen on 127.0.0.1 only. Ray cannot: it replaces 127.0.0.1 by the
machine's own address (`ray._private.services.resolve_ip_for_localhost`), so its nodes listen on
this machine's interface; nothing is sent anywhere else (usage stats off, no dashboard UI).
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


class ServiceError(RuntimeError):
    """A service did not start, is not installed, or left processes behind."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- processes


def _proc_stats() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, state) of every process, from /proc."""
    stats = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:  # ended while we looked
            continue
        # the command name (field 2) may hold spaces and parentheses: split after its last ')'
        fields = text[text.rindex(")") + 2 :].split()
        stats[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[0])
    return stats


def live(pids) -> list[int]:
    """The pids that still run (zombies, already ended but not yet reaped, do not count)."""
    stats = _proc_stats()
    return sorted(p for p in pids if p in stats and stats[p][2] != "Z")


def group_members(pgid: int) -> list[int]:
    """Live processes of one process group (what `pgrep -g PGID` lists, less zombies)."""
    return sorted(p for p, (_, g, state) in _proc_stats().items() if g == pgid and state != "Z")


def with_descendants(pids) -> set[int]:
    """The pids and every live process below them."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, state) in _proc_stats().items():
        if state != "Z":
            children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


def wait_gone(pids, timeout: float) -> list[int]:
    """Wait until none of `pids` runs; return those still running after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (left := live(pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def end_for_sure(pids, what: str, timeout: float = 10.0) -> None:
    """Raise if any of `pids` outlives `timeout`, after killing the rest so nothing stays."""
    left = wait_gone(pids, timeout)
    if left:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_gone(left, 5.0)
        raise ServiceError(f"{what} left processes running: {left} (now killed)")


def _log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------- PostgreSQL


def postgres_bin() -> Path | None:
    """The folder with `initdb` and `pg_ctl`: PATH first, else Debian's newest versioned folder."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return versions[-1].parent if versions else None


def require(reason: str | None) -> None:
    """In a test: fail if a service is missing (CI runs every test); skip only where the user
    set SEQGEN_ALLOW_SKIP=1 outside CI."""
    import pytest

    if reason is None:
        return
    if os.environ.get("SEQGEN_ALLOW_SKIP") == "1" and not os.environ.get("CI"):
        pytest.skip(reason)
    pytest.fail(reason + " (SEQGEN_ALLOW_SKIP=1 skips such tests outside CI)", pytrace=False)


def postgres_missing() -> str | None:
    """Why a PostgreSQL server cannot be started here, or None if it can."""
    if postgres_bin() is None:
        return (
            "PostgreSQL server not installed (no initdb in PATH or /usr/lib/postgresql/*/bin): "
            "install Debian's `postgresql` package (`make test` does so when run as root)"
        )
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and PostgreSQL refuses root: no `postgres` user to run it as"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 not installed: `pip install -e .` installs psycopg2-binary"
    return None


class PostgresServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with trust auth, user and database `mlflow`.

    PostgreSQL refuses to run as root, so as root initdb and pg_ctl run as the `postgres` user in
    a temporary folder of their own (pytest's folders under /tmp/pytest-of-root are closed to it).
    """

    user = "mlflow"

    def __init__(self, port: int | None = None):
        reason = postgres_missing()
        if reason:
            raise ServiceError(reason)
        self.bin = postgres_bin()
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="seqgen-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")

    def _run(self, *args: str) -> None:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=self.dir, timeout=120)
        if proc.returncode != 0:
            raise ServiceError(
                f"{args[0]} failed ({proc.returncode}): {proc.stdout[-1500:]}{proc.stderr[-1500:]}"
                f"\n{_log_tail(self.log)}"
            )

    def start(self) -> PostgresServer:
        """Create the cluster (first time), start it, create database `mlflow` (first time)."""
        fresh = not self.data.exists()
        if fresh:
            # --no-sync and fsync=off: a test database need not survive a power cut; far faster
            self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", self.user,
                      "-E", "UTF8", "--no-sync")  # fmt: skip
        options = f"-h 127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
                  "-t", "60", "start")  # fmt: skip
        if fresh:
            self.create_database("mlflow")
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown) and check that none of its processes is left."""
        pid_file = self.data / "postmaster.pid"
        if not pid_file.exists():
            return
        postmaster = int(pid_file.read_text().split()[0])
        pids = with_descendants([postmaster])
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        end_for_sure(pids, "PostgreSQL")

    def close(self) -> None:
        """Stop and delete the whole cluster."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def create_database(self, name: str, template: str | None = None) -> str:
        """Create a database, as a copy of `template` if given (milliseconds); return its URI."""
        import psycopg2

        con = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres")
        try:
            con.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with con.cursor() as cur:
                suffix = f' TEMPLATE "{template}"' if template else ""
                cur.execute(f'CREATE DATABASE "{name}"{suffix}')
        finally:
            con.close()
        return self.uri_of(name)

    def uri_of(self, database: str) -> str:
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{database}"

    @property
    def uri(self) -> str:
        """SQLAlchemy URI of database `mlflow`, as `mlflow server --backend-store-uri` takes it."""
        return self.uri_of("mlflow")

    def __enter__(self) -> PostgresServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------- mlflow server


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with proxied artifacts; stop() ends its whole process group.

    job_runner=False sets MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: without the job runner and its
    seven huey_consumer processes the server starts in about 7 s instead of 20 s on 2 cores, and
    nothing here uses MLflow's server-side jobs (GenAI evaluation, trace roll-ups).
    start() after stop() comes back on the same port, with the same store: an outage.

    admin_password turns authentication on (`--app-name basic-auth`, the `mlflow[auth]` extra):
    users and permissions in auth_database_uri (else a sqlite file beside the artifacts), a config
    file beside the artifacts, default permission READ, the admin `admin` with this password (12
    characters at least, or the server refuses to start). The secret key and the password reach
    the server through its environment only, never its command line or a file.
    """

    def __init__(
        self,
        backend_uri: str,
        artifacts_dir: Path | str,
        port: int | None = None,
        log: Path | str | None = None,
        job_runner: bool = False,
        env: dict[str, str] | None = None,
        admin_password: str | None = None,
        auth_database_uri: str | None = None,
    ):
        self.backend_uri = backend_uri
        self.artifacts_dir = Path(artifacts_dir).resolve()
        self.port = port or free_port()
        default_log = self.artifacts_dir.parent / f"mlflow-server-{self.port}.log"
        self.log = Path(log) if log else default_log
        self.job_runner = job_runner
        self.extra_env = env or {}
        self.admin_password = admin_password
        self.auth_config = self.artifacts_dir.parent / f"basic_auth-{self.port}.ini"
        sqlite = self.artifacts_dir.parent / f"basic_auth-{self.port}.db"
        self.auth_database_uri = auth_database_uri or f"sqlite:///{sqlite}"
        self._secret_key = secrets.token_hex(32)  # the same over an outage
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _env(self) -> dict[str, str]:
        # the server must not inherit a client's MLFLOW_TRACKING_URI / MLFLOW_RUN_ID of the test
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "true" if self.job_runner else "false"
        env["MLFLOW_DISABLE_TELEMETRY"] = "true"
        env["PYTHONUNBUFFERED"] = "1"
        if self.admin_password is not None:
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(self.auth_config)
            env["MLFLOW_AUTH_ADMIN_PASSWORD"] = self.admin_password
            env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = self._secret_key
        env.update(self.extra_env)
        return env

    def _write_auth_config(self) -> None:
        """The auth app's settings (no secrets in them: those come from the environment)."""
        self.auth_config.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = {self.auth_database_uri}\n"
            "admin_username = admin\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "auth_cache_ttl_seconds = 60\n"
        )

    def start(self, timeout: float = 120.0) -> MlflowServer:
        """Start and wait until GET /health answers; on failure, raise with the log's tail."""
        if self.proc is not None:
            raise ServiceError(f"mlflow server on port {self.port} is already started")
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend_uri,
            "--artifacts-destination", str(self.artifacts_dir),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        if self.admin_password is not None:
            self._write_auth_config()
            cmd += ["--app-name", "basic-auth"]
        with open(self.log, "a") as log:
            log.write(f"=== start {time.strftime('%H:%M:%S')}: {' '.join(cmd)}\n")
            log.flush()
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                cwd=self.artifacts_dir.parent, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = "exited" if self.proc.poll() is not None else f"no /health in {timeout:.0f} s"
                self.stop()
                raise ServiceError(f"mlflow server did not come up ({why}):\n{_log_tail(self.log)}")
            time.sleep(0.25)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the whole process group, SIGKILL after `grace` s; raise if any survives."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the server leads its own group
        pids = with_descendants(group_members(pgid))
        huey_dirs = {_environ(pid).get("_MLFLOW_HUEY_STORAGE_PATH") for pid in pids} - {None}
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        # poll() reaps the server itself; its children are reaped by it or by init
        while (self.proc.poll() is None or group_members(pgid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.proc.poll() is None or group_members(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None
        # the job runner's queue folder, which mlflow makes in /dev/shm and never removes
        for folder in huey_dirs:
            shutil.rmtree(folder, ignore_errors=True)
        end_for_sure(pids, f"mlflow server on port {self.port}", timeout=5.0)

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    items = raw.decode(errors="replace").split("\0")
    return dict(item.split("=", 1) for item in items if "=" in item)


# ---------------------------------------------------------------------------- a proxy


class ApiProxy:
    """An HTTP proxy on 127.0.0.1 in front of a real `mlflow server`, for faults the server itself
    does not make on demand: fail_api_after(n) answers 500 to every /api/ call after the next n
    (GET /health still answers, as a server whose database is broken does); stop() and start()
    cut this client off and back (a network partition), while other clients reach the server.
    Basic-auth credentials in the client's URI are dropped on the way (the server has no auth).
    """

    def __init__(self, target_port: int, port: int | None = None):
        self.target_port = target_port
        self.port = port or free_port()
        self.requests = 0  # /api/ calls seen
        self._fail_after: int | None = None
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail_api_after(self, n: int | None) -> None:
        """From the (n+1)-th /api/ call on, answer 500 (None: forward again)."""
        with self._lock:
            self._fail_after = None if n is None else self.requests + n

    def _failing(self, path: str) -> bool:
        if not path.startswith(("/api/", "/ajax-api/")):
            return False
        with self._lock:
            self.requests += 1
            return self._fail_after is not None and self.requests > self._fail_after

    def start(self) -> ApiProxy:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy._failing(self.path):
                    reply = b'{"error_code": "INTERNAL_ERROR", "message": "database is gone"}'
                    self._answer(500, {"Content-Type": "application/json"}, reply)
                    return
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "authorization", "connection")
                }
                conn = http.client.HTTPConnection("127.0.0.1", proxy.target_port, timeout=120)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    answer = conn.getresponse()
                    data = answer.read()
                    kept = {
                        k: v
                        for k, v in answer.getheaders()
                        if k.lower() not in ("transfer-encoding", "connection", "content-length")
                    }
                    self._answer(answer.status, kept, data)
                except OSError:
                    self._answer(502, {}, b"")
                finally:
                    conn.close()

            def _answer(self, status: int, headers: dict, data: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Refuse connections from now on (calls under way are finished)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = self._thread = None

    def __enter__(self) -> ApiProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------- Ray

# Ray reads these when it starts processes, so they are set for this process and its children:
# no usage-stats report (the network), no dashboard packages needed.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}


def _ray_node_pids(node) -> set[int]:
    """Every live process of one Ray node: its services, their workers and agents."""
    pids = [info.process.pid for infos in node.all_processes.values() for info in infos]
    return with_descendants(pids)


@contextlib.contextmanager
def local_ray(num_cpus: int = 2, **init_args):
    """`ray.init` of a new one-node instance in this process; yields its context; shuts it down.

    Ray 2.60 turns token authentication on for a new local instance: ray.init sets
    RAY_AUTH_MODE=token in os.environ (and writes ~/.ray/auth_token if there is none). The variable
    is put back afterwards so a later cluster in the same test session starts as configured.
    """
    import ray

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", *RAY_ENV)}
    os.environ.update(RAY_ENV)
    temp_dir = tempfile.mkdtemp(prefix="seqgen-ray-")
    try:
        context = ray.init(
            num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir, **init_args
        )
        node = ray._private.worker._global_node
        try:
            yield context
        finally:
            pids = _ray_node_pids(node)
            ray.shutdown()
            end_for_sure(pids, "Ray")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(temp_dir, ignore_errors=True)


class RayCluster:
    """Several Ray nodes on this machine (ray.cluster_utils.Cluster): a head, then add/remove nodes.

    The head has no CPUs by default, so tasks run only on the nodes added. `address` is what a
    driver passes to ray.init(address=...) or `--ray-address`; this process connects only on
    connect(). Nodes started here have token authentication off unless RAY_AUTH_MODE=token is set.
    """

    def __init__(self, head_cpus: int = 0):
        from ray.cluster_utils import Cluster

        os.environ.update(RAY_ENV)
        self.temp_dir = tempfile.mkdtemp(prefix="seqgen-ray-")
        # Cluster writes the head's address to <tmp>/ray/ray_current_cluster whatever temp_dir
        # says; on a machine where Ray never ran, that folder does not exist yet.
        Path(tempfile.gettempdir(), "ray").mkdir(exist_ok=True)
        self._cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": head_cpus,
                "include_dashboard": False,
                "temp_dir": self.temp_dir,
            },
        )

    @property
    def address(self) -> str:
        return self._cluster.address

    @property
    def head(self):
        return self._cluster.head_node

    def add_node(
        self,
        num_cpus: int = 1,
        resources: dict[str, float] | None = None,
        process_table: str | None = None,
        **args,
    ):
        """Start a node (about 1 s) and wait until the head sees it; return the Node.
        process_table: the node's processes take it for a machine of its own (a lease holder on
        another node is then told dead by its lease only, as across real machines)."""
        saved = os.environ.get("SEQGEN_PROCESS_TABLE")
        if process_table:  # the node's raylet, and so its workers, inherit it
            os.environ["SEQGEN_PROCESS_TABLE"] = process_table
        try:
            node = self._cluster.add_node(num_cpus=num_cpus, resources=resources or {}, **args)
        finally:
            if saved is None:
                os.environ.pop("SEQGEN_PROCESS_TABLE", None)
            else:
                os.environ["SEQGEN_PROCESS_TABLE"] = saved
        self._cluster.wait_for_nodes()
        return node

    def remove_node(self, node, graceful: bool = True) -> None:
        """End a node's processes and its workers. graceful=False is a machine lost: every process
        of the node stops at once (SIGSTOP, so no worker goes on while the raylet is killed), then
        all are killed."""
        pids = _ray_node_pids(node)
        if not graceful:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
        self._cluster.remove_node(node, allow_graceful=graceful)
        if not graceful:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        end_for_sure(pids, "Ray node")

    def connect(self) -> None:
        """Make this process a driver of the cluster."""
        self._cluster.connect()

    def close(self) -> None:
        import ray

        nodes = [self.head, *self._cluster.worker_nodes]
        pids = set().union(*(_ray_node_pids(n) for n in nodes if n is not None))
        ray.shutdown()
        self._cluster.shutdown()
        try:
            end_for_sure(pids, "Ray cluster")
        finally:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

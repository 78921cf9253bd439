"""A single-node Apache Kafka broker (KRaft, broker and controller in one JVM) for development.

``LocalKafka(home)`` keeps everything under ``home``:

* ``<cache_dir>/jars-<version>/``: the broker's jars, fetched once from Maven Central with
  ``mvn`` and the packaged ``deploy/kafka/pom.xml`` (``cache_dir`` defaults to
  ``home/"kafka"``; tests point it at a shared cache so the jars are fetched once);
* ``home/"kafka"/"broker"/``: the broker's state: ``data/`` (the log dirs, kept across
  restarts), ``server.properties`` (rendered from ``deploy/kafka/server.properties.template``
  on every start), ``broker.pid``, ``broker.json`` (bootstrap, pid, version), ``ports.json``
  (the ports, reused on the next start so a remembered bootstrap keeps working) and
  ``broker.log`` (the JVM's stdout and stderr, logging through ``deploy/kafka/log4j2.properties``).

The broker runs detached from the Python process (its own session), so ``sluice kafka up``
can return while the broker keeps running; ``down()`` stops it again. ``up()`` only returns
once the broker answers real Kafka requests (ApiVersions, then Metadata listing itself).

``LocalKafka(home, secure=True)`` (``sluice kafka up --secure``) is a second broker with its
state in ``home/"kafka"/"secure-broker"/``: one SASL_SSL listener (SCRAM-SHA-512, TLS with a
CA and broker certificate generated on first start, ``security/``), SCRAM users created at
format time for the broker itself and the three Sluice principals (workers, producers,
operators; passwords generated once, ``security/credentials.json``), the KRaft
``StandardAuthorizer`` with the ACL set of :mod:`deploy.security.acls`, and the settings each
principal needs written to ``home/"secure.env"`` (workers), ``producer.env`` and
``operator.env``; the workers' and operators' files also get the control signing key
(``security/control-signing.key``, :mod:`streams.control_auth`). Its readiness probe is
ApiVersions over TLS, then the ACLs are created with the broker's own (super user)
credentials, which also proves SASL works.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

from deploy.security.acls import Principals, SluiceResources, create_acls, sluice_acls
from schemas.errors import SluiceError

logger = logging.getLogger(__name__)

DEFAULT_KAFKA_VERSION = "4.4.0"

_KAFKA_DIR = Path(__file__).resolve().parent / "kafka"
POM_FILE = _KAFKA_DIR / "pom.xml"
SERVER_PROPERTIES_TEMPLATE = _KAFKA_DIR / "server.properties.template"
LISTENERS_PLAIN_TEMPLATE = _KAFKA_DIR / "listeners-plain.properties.template"
LISTENERS_SECURE_TEMPLATE = _KAFKA_DIR / "listeners-secure.properties.template"
LOG4J2_CONFIG = _KAFKA_DIR / "log4j2.properties"

_MARKER = ".complete"
_MAIN_CLASS = "kafka.Kafka"
_LOG_TAIL_LINES = 20
_MVN_TAIL_LINES = 30
_ROTATE_LOG_BYTES = 50 * 1024 * 1024
_FETCH_TIMEOUT_S = 900.0
_FORMAT_TIMEOUT_S = 120.0
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_SCRAM_MECHANISM = "SCRAM-SHA-512"
_ADMIN_USER = "sluice-admin"
_BROKER_CN = "sluice-broker"
_ACL_TIMEOUT_S = 60.0
#: Principals that get the control signing key (producers never do).
_SIGNING_ROLES = ("worker", "operator")
_CONTROL_KEY_ID = "local"
#: The env file each principal's settings are written to, under ``home``.
ENV_FILES = {"worker": "secure.env", "producer": "producer.env", "operator": "operator.env"}

Progress = Callable[[str], None]


class LocalKafkaError(SluiceError):
    """The local development broker could not be fetched, started, reached or stopped."""

    reason_code = "local_kafka"


@dataclass(frozen=True)
class BrokerInfo:
    """A running local broker."""

    bootstrap: str
    pid: int
    kafka_version: str
    state_dir: Path
    log_file: Path
    secure: bool = False


class LocalKafka:
    """Fetch, start, probe and stop a single-node KRaft broker kept under ``home``."""

    def __init__(
        self,
        home: Path,
        kafka_version: str = DEFAULT_KAFKA_VERSION,
        port: int | None = None,
        heap: str = "512m",
        cache_dir: Path | None = None,
        port_wait: float = 15.0,
        *,
        secure: bool = False,
        acl_resources: SluiceResources | None = None,
        principals: Principals | None = None,
    ) -> None:
        self.home = Path(home).expanduser().resolve()
        self.kafka_version = kafka_version
        self.port = port
        self.heap = heap
        self.port_wait = port_wait
        self.secure = secure
        self.acl_resources = acl_resources or SluiceResources()
        self.principals = principals or Principals()
        base = self.home / "kafka"
        self.cache_dir = Path(cache_dir).expanduser().resolve() if cache_dir else base
        name = "secure-broker" if secure else "broker"
        self.state_dir = base / name
        self._lock_file = base / f"{name}.lock"
        self._proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ paths

    @property
    def jars_dir(self) -> Path:
        return self.cache_dir / f"jars-{self.kafka_version}"

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def properties_file(self) -> Path:
        return self.state_dir / "server.properties"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "broker.pid"

    @property
    def info_file(self) -> Path:
        return self.state_dir / "broker.json"

    @property
    def ports_file(self) -> Path:
        return self.state_dir / "ports.json"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "broker.log"

    @property
    def security_dir(self) -> Path:
        """Secure broker: the CA, the broker's key and certificate, the SCRAM passwords."""
        return self.state_dir / "security"

    @property
    def ca_file(self) -> Path:
        """The CA clients verify the secure broker with (``SLUICE_KAFKA_SSL_CAFILE``)."""
        return self.security_dir / "ca.pem"

    @property
    def keystore_file(self) -> Path:
        return self.security_dir / "broker-keystore.pem"

    @property
    def credentials_file(self) -> Path:
        return self.security_dir / "credentials.json"

    @property
    def control_key_file(self) -> Path:
        """The secret operators sign control commands with and workers verify them with
        (``SLUICE_CONTROL_SIGNING_KEY``, never given to producers)."""
        return self.security_dir / "control-signing.key"

    def env_file(self, role: str) -> Path:
        """Where the settings of ``role`` (worker, producer, operator) are written."""
        return self.home / ENV_FILES[role]

    # ------------------------------------------------------------------ fetch

    def fetch(self, progress: Progress | None = None) -> Path:
        """Download the broker's jars into the cache once; return the jars directory."""
        jars = self.jars_dir
        if (jars / _MARKER).is_file():
            return jars
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with _flock(self.cache_dir / f".jars-{self.kafka_version}.lock"):
            if (jars / _MARKER).is_file():  # another process fetched them meanwhile
                return jars
            mvn = shutil.which("mvn")
            if mvn is None:
                raise LocalKafkaError(
                    "Maven ('mvn') is not on PATH; it is needed once to fetch the Kafka "
                    f"{self.kafka_version} jars from Maven Central into {jars}. Install Maven "
                    "(e.g. `apt-get install maven`) and retry."
                )
            if not POM_FILE.is_file():
                raise LocalKafkaError(f"the packaged Maven file {POM_FILE} is missing")
            _emit(progress, f"fetching Kafka {self.kafka_version} jars with Maven into {jars}")
            started = time.monotonic()
            with tempfile.TemporaryDirectory(
                prefix=f".jars-{self.kafka_version}-", dir=self.cache_dir
            ) as tmp:
                work = Path(tmp)
                pom = work / "pom.xml"
                shutil.copyfile(POM_FILE, pom)
                out = work / "jars"
                cmd = [
                    mvn,
                    "-q",
                    "-B",
                    "-Dstyle.color=never",
                    "-f",
                    str(pom),
                    "dependency:copy-dependencies",
                    f"-DoutputDirectory={out}",
                    "-DincludeScope=runtime",
                    f"-Dkafka.version={self.kafka_version}",
                ]
                logger.debug("running %s", cmd)
                try:
                    result = subprocess.run(
                        cmd,
                        cwd=work,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        text=True,
                        timeout=_FETCH_TIMEOUT_S,
                        check=False,
                    )
                except subprocess.TimeoutExpired as exc:
                    raise LocalKafkaError(
                        "mvn did not finish fetching the Kafka jars within "
                        f"{_FETCH_TIMEOUT_S:.0f} s"
                        + _tail_block(_text(exc.output), _MVN_TAIL_LINES)
                    ) from exc
                if result.returncode != 0:
                    raise LocalKafkaError(
                        f"mvn failed (exit code {result.returncode}) fetching Kafka "
                        f"{self.kafka_version} jars"
                        + _tail_block(result.stdout or "", _MVN_TAIL_LINES)
                    )
                names = sorted(p.name for p in out.glob("*.jar"))
                expected = f"kafka_2.13-{self.kafka_version}.jar"
                if expected not in names:
                    raise LocalKafkaError(
                        f"mvn succeeded but {expected} is not among the fetched jars ({names})"
                    )
                # The marker is written last: a jars directory without it is incomplete.
                marker = {"kafka_version": self.kafka_version, "jars": names, "at": time.time()}
                (out / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
                if jars.exists():
                    shutil.rmtree(jars)
                os.rename(out, jars)
            _emit(
                progress,
                f"fetched {len(names)} jars for Kafka {self.kafka_version} "
                f"in {time.monotonic() - started:.1f} s",
            )
        return jars

    # ------------------------------------------------------------------ status

    def status(self) -> BrokerInfo | None:
        """The running broker of this home, or None when none is running."""
        info = _read_json(self.info_file)
        pid = self._read_pid()
        if pid is None and info is not None:
            pid = _as_int(info.get("pid"))
        if pid is None or info is None or not self._is_ours(pid):
            return None
        bootstrap = info.get("bootstrap")
        if not isinstance(bootstrap, str):
            return None
        return BrokerInfo(
            bootstrap=bootstrap,
            pid=pid,
            kafka_version=str(info.get("kafka_version", self.kafka_version)),
            state_dir=self.state_dir,
            log_file=self.log_file,
            secure=self.secure,
        )

    # ------------------------------------------------------------------ up

    def up(self, timeout: float = 90.0, progress: Progress | None = None) -> BrokerInfo:
        """Start the broker unless it runs already; return once it answers Kafka requests."""
        with _flock(self._lock_file):
            current = self.status()
            if current is not None:
                port = int(current.bootstrap.rsplit(":", 1)[1])
                self._wait_ready(current.pid, port, time.monotonic() + timeout, started=False)
                _emit(progress, f"Kafka broker already running at {current.bootstrap}")
                return current
            self._forget_process()
            jars = self.fetch(progress)
            java = _java()
            port, controller_port = self._choose_ports(progress)
            self.state_dir.mkdir(parents=True, exist_ok=True)
            _write_json(self.ports_file, {"port": port, "controller_port": controller_port})
            formatted = (self.data_dir / "meta.properties").is_file()
            if self.secure:
                if formatted and not self.credentials_file.is_file():
                    # storage formatted without these SCRAM users: start it over
                    _emit(progress, "secure broker storage without credentials: reformatting")
                    shutil.rmtree(self.data_dir)
                    formatted = False
                self._ensure_security(progress)
            self._write_properties(port, controller_port)
            self._rotate_log()
            if not formatted:
                self._format(java, jars, progress)
            return self._start(java, jars, port, timeout, progress)

    def _start(
        self, java: str, jars: Path, port: int, timeout: float, progress: Progress | None
    ) -> BrokerInfo:
        bootstrap = f"127.0.0.1:{port}"
        cmd = [
            java,
            f"-Xmx{self.heap}",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}",
            "-cp",
            _classpath(jars),
            _MAIN_CLASS,
            str(self.properties_file),
        ]
        _emit(progress, f"starting Kafka {self.kafka_version} broker on {bootstrap}")
        started = time.monotonic()
        with self.log_file.open("ab") as log:
            log_offset = log.tell()
            log.write(
                f"==== sluice: starting Kafka {self.kafka_version} on {bootstrap} at "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')} ====\n".encode()
            )
            log.flush()
            proc = subprocess.Popen(
                cmd,
                cwd=self.state_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        self._proc = proc
        self.pid_file.write_text(f"{proc.pid}\n")
        _write_json(
            self.info_file,
            {
                "bootstrap": bootstrap,
                "pid": proc.pid,
                "kafka_version": self.kafka_version,
                "port": port,
                "state_dir": str(self.state_dir),
                "log_file": str(self.log_file),
                "started_at": time.time(),
            },
        )
        try:
            self._wait_ready(proc.pid, port, started + timeout, started=True, log_offset=log_offset)
            if self.secure:
                self._apply_acls(bootstrap, started + timeout, progress)
                self._write_env_files(bootstrap)
        except BaseException:
            self._kill(proc.pid, grace=0.0)
            self._forget_process()
            raise
        _emit(progress, f"Kafka broker ready at {bootstrap} in {time.monotonic() - started:.1f} s")
        return BrokerInfo(
            bootstrap=bootstrap,
            pid=proc.pid,
            kafka_version=self.kafka_version,
            state_dir=self.state_dir,
            log_file=self.log_file,
            secure=self.secure,
        )

    def _wait_ready(
        self, pid: int, port: int, deadline: float, *, started: bool, log_offset: int = 0
    ) -> None:
        waited_from = time.monotonic()
        last_error = "no answer yet"
        while True:
            if not self._alive(pid):
                code = self._proc.returncode if self._proc and self._proc.pid == pid else None
                how = f" with exit code {code}" if code is not None else ""
                raise LocalKafkaError(
                    f"the Kafka broker (pid {pid}) exited{how} before answering on "
                    f"127.0.0.1:{port}; see {self.log_file}" + self._log_tail_block(log_offset)
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                what = "started" if started else "running"
                raise LocalKafkaError(
                    f"the {what} Kafka broker (pid {pid}) did not answer on 127.0.0.1:{port} "
                    f"within {time.monotonic() - waited_from:.0f} s ({last_error}); "
                    f"see {self.log_file}" + self._log_tail_block(log_offset)
                )
            try:
                probe_broker(
                    "127.0.0.1",
                    port,
                    timeout=min(2.0, max(remaining, 0.1)),
                    ssl_context=self._probe_context(),
                )
                return
            except (OSError, LocalKafkaError) as exc:
                last_error = str(exc) or type(exc).__name__
            time.sleep(min(0.25, max(deadline - time.monotonic(), 0.0)))

    # ------------------------------------------------------------------ down / wipe

    def down(self, timeout: float = 30.0) -> bool:
        """Stop the broker (SIGTERM, SIGKILL after ``timeout``); True if one was stopped."""
        with _flock(self._lock_file):
            return self._down(timeout)

    def wipe(self) -> None:
        """Stop the broker and delete its data, config and logs (not the jars, not the ports)."""
        with _flock(self._lock_file):
            self._down(30.0)
            if self.secure:
                for role in ENV_FILES:
                    self.env_file(role).unlink(missing_ok=True)
            if not self.state_dir.exists():
                return
            for entry in self.state_dir.iterdir():
                if entry == self.ports_file:
                    continue  # keep the bootstrap address stable across wipes
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()

    def _down(self, timeout: float) -> bool:
        pid = self._read_pid()
        if pid is None:
            pid = _as_int((_read_json(self.info_file) or {}).get("pid"))
        stopped = False
        if pid is not None and self._is_ours(pid):
            logger.info("stopping Kafka broker pid %d", pid)
            self._kill(pid, grace=timeout)
            stopped = True
        elif pid is not None:
            logger.info("pid file names pid %d, which is not our broker; not signalling it", pid)
        self._forget_process()
        return stopped

    def _kill(self, pid: int, grace: float) -> None:
        """SIGTERM (skipped when ``grace`` is 0), then SIGKILL when still alive after ``grace``."""
        if grace > 0:
            _signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self._alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not self._alive(pid):
                return
            logger.warning("Kafka broker pid %d ignored SIGTERM for %.0f s; killing it", pid, grace)
        _signal(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10.0
        while self._alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _forget_process(self) -> None:
        for path in (self.pid_file, self.info_file):
            path.unlink(missing_ok=True)
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None

    # ------------------------------------------------------------------ helpers

    def _read_pid(self) -> int | None:
        try:
            return _as_int(self.pid_file.read_text().strip())
        except OSError:
            return None

    def _alive(self, pid: int) -> bool:
        """Whether ``pid`` runs (a zombie does not count; our own children get reaped)."""
        if self._proc is not None and self._proc.pid == pid:
            return self._proc.poll() is None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        stat = Path(f"/proc/{pid}/stat")
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        return state not in ("Z", "X")

    def _is_ours(self, pid: int) -> bool:
        """Whether ``pid`` is a live Kafka JVM started on this home's server.properties."""
        if pid <= 1 or not self._alive(pid):
            return False
        args = _cmdline(pid)
        return _MAIN_CLASS in args and str(self.properties_file) in args

    def _choose_ports(self, progress: Progress | None) -> tuple[int, int]:
        saved = _read_json(self.ports_file) or {}
        saved_port = _as_int(saved.get("port"))
        saved_controller = _as_int(saved.get("controller_port"))
        if self.port is not None:
            if not _port_free(self.port):
                raise LocalKafkaError(
                    f"port {self.port} on 127.0.0.1 is busy; stop what listens there or choose "
                    "another port"
                )
            port = self.port
        elif saved_port is not None and self._await_port(saved_port, progress):
            port = saved_port
        else:
            port = _free_port()
            if saved_port is not None:
                _emit(
                    progress,
                    f"port {saved_port} stayed busy for {self.port_wait:.0f} s; "
                    f"the broker moves to {port}",
                )
        if (
            saved_controller is not None
            and saved_controller != port
            and _port_free(saved_controller)
        ):
            controller_port = saved_controller
        else:
            controller_port = _free_port(avoid={port})
        return port, controller_port

    def _await_port(self, port: int, progress: Progress | None) -> bool:
        """Whether the remembered ``port`` is free, waiting up to ``port_wait`` seconds for it.

        After a crash the port can stay taken for a moment (a dying JVM, or another process's
        outgoing connection that drew it as its ephemeral port). Keeping the port matters more
        than a few seconds: clients remember the bootstrap.
        """
        if _port_free(port):
            return True
        _emit(progress, f"port {port} is busy; waiting up to {self.port_wait:.0f} s for it")
        deadline = time.monotonic() + self.port_wait
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if _port_free(port):
                return True
        return False

    def _write_properties(self, port: int, controller_port: int) -> None:
        if self.secure:
            admin_password = self._credentials()[_ADMIN_USER]
            listeners = Template(LISTENERS_SECURE_TEMPLATE.read_text()).substitute(
                port=port,
                controller_port=controller_port,
                admin_user=_ADMIN_USER,
                admin_password=admin_password,
                keystore=_properties_escape(str(self.keystore_file)),
                truststore=_properties_escape(str(self.ca_file)),
                broker_cn=_BROKER_CN,
            )
        else:
            listeners = Template(LISTENERS_PLAIN_TEMPLATE.read_text()).substitute(
                port=port, controller_port=controller_port
            )
        template = Template(SERVER_PROPERTIES_TEMPLATE.read_text())
        text = template.substitute(
            port=port,
            controller_port=controller_port,
            data_dir=_properties_escape(str(self.data_dir)),
            listeners=listeners,
        )
        tmp = self.properties_file.with_suffix(".tmp")
        # the secure broker's file holds its SCRAM password: owner only
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, self.properties_file)

    # ------------------------------------------------------------------ secure broker

    def _ensure_security(self, progress: Progress | None) -> None:
        """Create the CA, the broker's certificate and the SCRAM passwords once."""
        from deploy.security.certs import CertificateAuthority, write_private

        if not (self.ca_file.is_file() and self.keystore_file.is_file()):
            _emit(progress, f"generating a CA and a broker certificate in {self.security_dir}")
            ca = CertificateAuthority.create("Sluice local CA")
            broker = ca.issue(
                _BROKER_CN, hosts=("127.0.0.1", "localhost"), server=True, client=True
            )
            # the CA's key is not kept: nothing else is ever signed with it
            write_private(self.keystore_file, broker.key_pem + broker.cert_pem + ca.cert_pem)
            write_private(self.ca_file, ca.cert_pem)
            self.ca_file.chmod(0o644)
        if not self.credentials_file.is_file():
            users = [_ADMIN_USER, *self.principals.as_dict().values()]
            passwords = {user: secrets.token_urlsafe(24) for user in users}
            write_private(self.credentials_file, json.dumps(passwords, indent=2) + "\n")
        if not self.control_key_file.is_file():
            write_private(self.control_key_file, secrets.token_urlsafe(32) + "\n")

    def _credentials(self) -> dict[str, str]:
        data = _read_json(self.credentials_file)
        if not data:
            raise LocalKafkaError(
                f"the secure broker's credentials {self.credentials_file} are gone"
            )
        return {str(k): str(v) for k, v in data.items()}

    def _probe_context(self) -> ssl.SSLContext | None:
        if not self.secure:
            return None
        return ssl.create_default_context(cafile=str(self.ca_file))

    def admin_options(self) -> dict[str, Any]:
        """aiokafka options of the secure broker's super user (the broker's own principal):
        for creating topics and ACLs, not for Sluice's clients."""
        return self._client_options(_ADMIN_USER)

    def _control_key(self) -> str:
        try:
            return self.control_key_file.read_text().strip()
        except OSError as exc:
            raise LocalKafkaError(
                f"the secure broker's control signing key {self.control_key_file} is gone"
            ) from exc

    def _client_options(self, user: str) -> dict[str, Any]:
        return {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": _SCRAM_MECHANISM,
            "sasl_plain_username": user,
            "sasl_plain_password": self._credentials()[user],
            "ssl_context": ssl.create_default_context(cafile=str(self.ca_file)),
        }

    def settings_fields(self, role: str, bootstrap: str) -> dict[str, Any]:
        """``Settings`` fields (for ``model_copy(update=...)``) of ``role``: worker, producer,
        operator, or admin (the broker's super user, for creating topics)."""
        from pydantic import SecretStr

        user = _ADMIN_USER if role == "admin" else self.principals.as_dict()[role]
        fields: dict[str, Any] = {
            "kafka_bootstrap": bootstrap,
            "kafka_security_protocol": "SASL_SSL",
            "kafka_sasl_mechanism": _SCRAM_MECHANISM,
            "kafka_sasl_username": user,
            "kafka_sasl_password": SecretStr(self._credentials()[user]),
            "kafka_ssl_cafile": self.ca_file,
        }
        if role in _SIGNING_ROLES:
            fields["control_signing_key"] = SecretStr(self._control_key())
            fields["control_signing_key_id"] = _CONTROL_KEY_ID
        return fields

    def client_env(self, role: str, bootstrap: str) -> dict[str, str]:
        """The ``SLUICE_*`` settings of ``role`` (worker, producer, operator)."""
        user = self.principals.as_dict()[role]
        env = {
            "SLUICE_KAFKA_BOOTSTRAP": bootstrap,
            "SLUICE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "SLUICE_KAFKA_SASL_MECHANISM": _SCRAM_MECHANISM,
            "SLUICE_KAFKA_SASL_USERNAME": user,
            "SLUICE_KAFKA_SASL_PASSWORD": self._credentials()[user],
            "SLUICE_KAFKA_SSL_CAFILE": str(self.ca_file),
        }
        if role in _SIGNING_ROLES:  # workers verify control commands, operators sign them
            env["SLUICE_CONTROL_SIGNING_KEY"] = self._control_key()
            env["SLUICE_CONTROL_SIGNING_KEY_ID"] = _CONTROL_KEY_ID
        return env

    def _write_env_files(self, bootstrap: str) -> None:
        from deploy.security.certs import write_private

        for role in ENV_FILES:
            env = self.client_env(role, bootstrap)
            lines = [
                f"# `sluice kafka up --secure`: the {role}s' principal "
                f"({env['SLUICE_KAFKA_SASL_USERNAME']}) on the local secure broker.",
                "# Use: set -a; . <this file>; set +a   (or SLUICE_ENV_FILE=<this file>)",
                *(f"{key}={shlex.quote(value)}" for key, value in env.items()),
            ]
            write_private(self.env_file(role), "\n".join(lines) + "\n")

    def _apply_acls(self, bootstrap: str, deadline: float, progress: Progress | None) -> None:
        """Create the Sluice ACL set with the broker's credentials (idempotent)."""
        bindings = sluice_acls(self.acl_resources, self.principals)
        budget = max(deadline - time.monotonic(), 10.0)
        _emit(progress, f"creating {len(bindings)} ACLs")
        options = self.admin_options()
        # up() is synchronous and may be called under a running event loop: its own thread
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sluice-acls") as pool:
            future = pool.submit(
                asyncio.run, create_acls(bootstrap, options, bindings, timeout_s=budget)
            )
            try:
                future.result(timeout=budget + 5.0)
            except Exception as exc:
                raise LocalKafkaError(
                    f"could not create the ACLs on the secure broker at {bootstrap}: {exc}; "
                    f"see {self.log_file}"
                ) from exc

    def _format(self, java: str, jars: Path, progress: Progress | None) -> None:
        if self.data_dir.exists():  # a partial, unformatted data dir: start it over
            shutil.rmtree(self.data_dir)
        cluster_id = _kafka_uuid()
        _emit(progress, f"formatting broker storage in {self.data_dir} (cluster id {cluster_id})")
        cmd = [
            java,
            "-Xmx256m",
            f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}",
            "-cp",
            _classpath(jars),
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id,
            "-c",
            str(self.properties_file),
            "--standalone",
        ]
        if self.secure:
            # SCRAM users must exist before the first start: the broker's own SASL_SSL
            # connections authenticate with one
            for user, password in self._credentials().items():
                cmd += ["--add-scram", f"{_SCRAM_MECHANISM}=[name={user},password={password}]"]
        try:
            result = subprocess.run(
                cmd,
                cwd=self.state_dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=_FORMAT_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise LocalKafkaError(
                f"formatting the broker storage did not finish within {_FORMAT_TIMEOUT_S:.0f} s"
                + _tail_block(_text(exc.output), _LOG_TAIL_LINES)
            ) from exc
        with self.log_file.open("a") as log:
            log.write(f"==== sluice: kafka-storage format (exit {result.returncode}) ====\n")
            log.write(self._redact(result.stdout or ""))
        if result.returncode != 0 or not (self.data_dir / "meta.properties").is_file():
            raise LocalKafkaError(
                f"formatting the broker storage in {self.data_dir} failed "
                f"(exit code {result.returncode})"
                + _tail_block(self._redact(result.stdout or ""), 20)
            )

    def _redact(self, text: str) -> str:
        if self.secure and self.credentials_file.is_file():
            for password in self._credentials().values():
                text = text.replace(password, "***")
        return text

    def _rotate_log(self) -> None:
        try:
            if self.log_file.stat().st_size > _ROTATE_LOG_BYTES:
                os.replace(self.log_file, self.log_file.with_name(self.log_file.name + ".1"))
        except FileNotFoundError:
            pass

    def _log_tail_block(self, offset: int = 0) -> str:
        try:
            with self.log_file.open("rb") as fh:
                fh.seek(offset)
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return _tail_block(text, _LOG_TAIL_LINES, what=f"last lines of {self.log_file.name}")


@contextlib.contextmanager
def ephemeral_broker(
    tmp_home: Path,
    *,
    cache_dir: Path | None = None,
    kafka_version: str = DEFAULT_KAFKA_VERSION,
    port: int | None = None,
    heap: str = "512m",
    timeout: float = 90.0,
    progress: Progress | None = None,
    secure: bool = False,
    acl_resources: SluiceResources | None = None,
) -> Iterator[BrokerInfo]:
    """Run a broker under ``tmp_home`` for the ``with`` block; it is always stopped after.

    The jars come from ``cache_dir`` (default: :func:`default_cache_dir`), so throwaway homes
    share one download. ``secure``: the SASL_SSL broker (its env files under ``tmp_home``).
    """
    kafka = LocalKafka(
        tmp_home,
        kafka_version=kafka_version,
        port=port,
        heap=heap,
        cache_dir=cache_dir if cache_dir is not None else default_cache_dir(),
        secure=secure,
        acl_resources=acl_resources,
    )
    try:
        yield kafka.up(timeout=timeout, progress=progress)
    finally:
        kafka.down()


def default_cache_dir() -> Path:
    """Shared jar cache: ``$SLUICE_KAFKA_CACHE``, else ``<checkout>/.sluice/kafka`` when running
    from a source checkout, else ``~/.cache/sluice/kafka``."""
    env = os.environ.get("SLUICE_KAFKA_CACHE")
    if env:
        return Path(env).expanduser()
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file():
        return root / ".sluice" / "kafka"
    return Path.home() / ".cache" / "sluice" / "kafka"


# ---------------------------------------------------------------------- Kafka protocol probe


def probe_broker(
    host: str, port: int, timeout: float = 2.0, ssl_context: ssl.SSLContext | None = None
) -> None:
    """Raise unless a Kafka broker answers on ``host:port``.

    Sends ApiVersions (v0, which every broker answers) and then, when the broker supports a
    non-flexible version of it, a Metadata request that must list a broker on ``port``.
    With ``ssl_context`` (a TLS listener that also wants SASL) the connection is TLS and
    only ApiVersions is asked: everything else needs authentication first.
    """
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(socket.create_connection((host, port), timeout=timeout))
        raw.settimeout(timeout)
        sock = raw
        if ssl_context is not None:
            sock = stack.enter_context(ssl_context.wrap_socket(raw, server_hostname=host))
        _probe(sock, port, api_versions_only=ssl_context is not None)


def _probe(sock: socket.socket, port: int, *, api_versions_only: bool) -> None:
    """ApiVersions, then (unless ``api_versions_only``) Metadata listing ``port``."""
    body = _request(sock, api_key=18, api_version=0, correlation_id=1, payload=b"")
    error_code, count = struct.unpack_from(">hi", body, 0)
    # 35 = UNSUPPORTED_VERSION, which still comes with the list of supported versions.
    if error_code not in (0, 35):
        raise LocalKafkaError(f"ApiVersions answered with error code {error_code}")
    versions: dict[int, tuple[int, int]] = {}
    for i in range(count):
        key, low, high = struct.unpack_from(">hhh", body, 6 + 6 * i)
        versions[key] = (low, high)
    if api_versions_only:
        return
    low, high = versions.get(3, (0, -1))
    usable = [v for v in range(4, 9) if low <= v <= high]
    if not usable:
        return  # only flexible Metadata versions: ApiVersions has to do
    version = max(usable)
    payload = struct.pack(">ib", -1, 0)  # all topics, no auto-creation
    if version >= 8:
        payload += struct.pack(">bb", 0, 0)  # no authorized-operations
    body = _request(sock, api_key=3, api_version=version, correlation_id=2, payload=payload)
    _throttle, brokers = struct.unpack_from(">ii", body, 0)
    offset = 8
    ports = []
    for _ in range(brokers):
        (_node,) = struct.unpack_from(">i", body, offset)
        (host_len,) = struct.unpack_from(">h", body, offset + 4)
        offset += 6 + host_len
        (broker_port, rack_len) = struct.unpack_from(">ih", body, offset)
        offset += 6 + max(rack_len, 0)
        ports.append(broker_port)
    if port not in ports:
        raise LocalKafkaError(f"Metadata lists no broker on port {port} yet (brokers: {ports})")


def _request(
    sock: socket.socket, *, api_key: int, api_version: int, correlation_id: int, payload: bytes
) -> bytes:
    client_id = b"sluice-probe"
    header = struct.pack(">hhih", api_key, api_version, correlation_id, len(client_id)) + client_id
    message = header + payload
    sock.sendall(struct.pack(">i", len(message)) + message)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    response = _recv_exact(sock, size)
    (got,) = struct.unpack_from(">i", response, 0)
    if got != correlation_id:
        raise LocalKafkaError(f"broker answered correlation id {got}, expected {correlation_id}")
    return response[4:]


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        chunks += chunk
    return bytes(chunks)


# ---------------------------------------------------------------------- small helpers


def _emit(progress: Progress | None, message: str) -> None:
    logger.info("%s", message)
    if progress is not None:
        progress(message)


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("java")
    if found is None:
        raise LocalKafkaError(
            "Java is not installed (no `java` on PATH and no usable $JAVA_HOME); the local "
            "Kafka broker needs Java 17 or newer, e.g. `apt-get install openjdk-17-jre-headless`"
        )
    return found


def _classpath(jars: Path) -> str:
    return f"{jars}{os.sep}*"


def _kafka_uuid() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka avoids ids that look like command-line flags
            return text


def _properties_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def _port_free(port: int) -> bool:
    # SO_REUSEADDR like the JVM's server sockets, so TIME_WAIT leftovers do not count as busy.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port(avoid: set[int] | None = None) -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if not avoid or port not in avoid:
            return port
    raise LocalKafkaError("could not find a free port on 127.0.0.1")


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return []
    except OSError:
        return []
    # No /proc (macOS): ask ps.
    try:
        out = subprocess.run(
            ["ps", "-ww", "-o", "command=", "-p", str(pid)],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return out.split()


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _text(output: str | bytes | None) -> str:
    if output is None:
        return ""
    if isinstance(output, bytes):
        return output.decode("utf-8", "replace")
    return output


def _tail_block(text: str, lines: int, what: str = "last lines of output") -> str:
    tail = [line for line in _ANSI.sub("", text).splitlines() if line.strip()][-lines:]
    if not tail:
        return ""
    return f"\n--- {what} ---\n" + "\n".join(tail)


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created when missing) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)

"""A real Kubernetes control plane on loopback for kbatch's tests.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler are the real
programs (built by ``tools/k8s/build.sh``); kwok stands in for the kubelets: it
drives fake Nodes and the Pods bound to them through their lifecycle and
serves the kubelet API (pod logs) on loopback.

Usage::

    from tests.support.k8s_cluster import K8sCluster, ensure_binaries

    with K8sCluster(ensure_binaries()) as cluster:
        cluster.kubectl("create", "-f", "job.yaml")
        cluster.kubectl("wait", "--for=condition=Complete", "job/x", "--timeout=60s")

or ``with k8s_cluster() as cluster: ...`` which builds/locates the binaries
itself. Pods end according to ``tests/support/kwok_stages.yaml``: by default
Job pods run then succeed; the label ``kwok.x-k8s.io/test-outcome`` set to
``oom`` or ``fail`` makes them fail (see that file).

Environment:
    KBATCH_K8S_BIN_DIR  use this bin dir instead of running build.sh
    KBATCH_K8S_KEEP=1   keep the cluster's work dir (certs, logs) after stop
"""

from __future__ import annotations

import atexit
import base64
import datetime as _dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "tools" / "k8s" / "build.sh"
DEFAULT_STAGES_FILE = Path(__file__).with_name("kwok_stages.yaml")

# Pod label / annotations understood by kwok_stages.yaml.
OUTCOME_LABEL = (
    "kwok.x-k8s.io/test-outcome"  # "succeed" (default) | "oom" | "fail" | other: stays Running
)
EXIT_CODE_ANNOTATION = "kwok.x-k8s.io/test-exit-code"
REASON_ANNOTATION = "kwok.x-k8s.io/test-reason"
MESSAGE_ANNOTATION = "kwok.x-k8s.io/test-message"
DURATION_ANNOTATION = "kwok.x-k8s.io/test-duration"

# Nodes created by the cluster carry this annotation; kwok manages only those.
KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")

SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
DEFAULT_NODE_CAPACITY: Mapping[str, str] = {"cpu": "16", "memory": "64Gi", "pods": "110"}
DEFAULT_POD_LOG = "hello from kwok\n"

_BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
)


class ClusterStartError(RuntimeError):
    """The control plane did not come up; the message carries log tails."""


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl run; unlike its base class, str() includes kubectl's stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr: {self.stderr}"


# --------------------------------------------------------------------------- binaries


def ensure_binaries(timeout: float | None = None) -> Path:
    """Build (or find cached) binaries with tools/k8s/build.sh; return the bin dir.

    ``$KBATCH_K8S_BIN_DIR`` short-cuts the build. A cached run takes well under
    a second; a cold build takes tens of minutes (progress goes to stderr).
    """
    override = os.environ.get("KBATCH_K8S_BIN_DIR")
    if override:
        bin_dir = Path(override)
    else:
        proc = subprocess.run(
            ["bash", str(BUILD_SCRIPT)],
            stdout=subprocess.PIPE,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{BUILD_SCRIPT} failed with exit code {proc.returncode}")
        lines = proc.stdout.strip().splitlines()
        if not lines:
            raise RuntimeError(f"{BUILD_SCRIPT} printed no bin dir")
        bin_dir = Path(lines[-1])
    missing = [b for b in _BINARIES if not (bin_dir / b).is_file()]
    if missing:
        raise RuntimeError(f"{bin_dir} lacks {', '.join(missing)}")
    return bin_dir


# --------------------------------------------------------------------------- certificates


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class _KeyPair:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return _cert_pem(self.cert)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)


def _make_ca(common_name: str) -> _KeyPair:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _dt.datetime.now(_dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(hours=1))
        .not_valid_after(now + _dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return _KeyPair(cert, key)


def _make_leaf(
    ca: _KeyPair,
    common_name: str,
    *,
    organizations: Sequence[str] = (),
    server: bool = False,
    client: bool = False,
    dns_names: Sequence[str] = (),
    ips: Sequence[str] = (),
) -> _KeyPair:
    key = _new_key()
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    now = _dt.datetime.now(_dt.UTC)
    usages = []
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(hours=1))
        .not_valid_after(now + _dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    if dns_names or ips:
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return _KeyPair(builder.sign(ca.key, hashes.SHA256()), key)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _write(path: Path, data: bytes | str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def kubeconfig_text(
    server: str,
    ca_pem: bytes,
    *,
    user: str,
    client_cert_pem: bytes | None = None,
    client_key_pem: bytes | None = None,
    token: str | None = None,
    namespace: str | None = None,
) -> str:
    """A one-context kubeconfig (JSON, which is valid YAML) with embedded credentials."""
    user_entry: dict[str, str] = {}
    if client_cert_pem is not None and client_key_pem is not None:
        user_entry["client-certificate-data"] = _b64(client_cert_pem)
        user_entry["client-key-data"] = _b64(client_key_pem)
    if token is not None:
        user_entry["token"] = token
    context: dict[str, str] = {"cluster": "kbatch-test", "user": user}
    if namespace:
        context["namespace"] = namespace
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kbatch-test",
                "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)},
            }
        ],
        "users": [{"name": user, "user": user_entry}],
        "contexts": [{"name": user, "context": context}],
        "current-context": user,
    }
    return json.dumps(config, indent=2) + "\n"


# --------------------------------------------------------------------------- processes


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (held together, then released)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child
    """Have the kernel SIGTERM the child if the Python process dies uncleanly."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def running(self) -> bool:
        return self.popen.poll() is None


def _tail(path: Path, lines: int) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def _cri_log(text: str, stream: str = "stdout") -> str:
    """``text`` as CRI container log lines, the format kwok's kubelet server reads."""
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")
    return "".join(f"{stamp} {stream} F {line}\n" for line in text.splitlines())


# --------------------------------------------------------------------------- cluster


class K8sCluster:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok on loopback.

    Use as a context manager (or call :meth:`start` / :meth:`stop`). After start:
    :attr:`kubeconfig` (admin, group system:masters), :attr:`server` (API URL),
    :attr:`ca_path` (cluster CA, PEM), :attr:`workdir`, :attr:`log_dir`.
    """

    def __init__(
        self,
        bin_dir: Path | str,
        *,
        workdir: Path | str | None = None,
        nodes: int = 1,
        node_capacity: Mapping[str, str] = DEFAULT_NODE_CAPACITY,
        stages_file: Path | str | None = DEFAULT_STAGES_FILE,
        extra_stages: Sequence[str] = (),
        pod_log: str | None = DEFAULT_POD_LOG,
        startup_timeout: float = 120.0,
        keep_workdir: bool | None = None,
    ) -> None:
        """
        bin_dir          directory with etcd, kube-*, kubectl, kwok (see ensure_binaries)
        workdir          certs, etcd data, configs and logs (default: a new temp dir)
        nodes            number of fake Nodes (kwok-node-0, ...)
        node_capacity    capacity/allocatable of each Node
        stages_file      kwok Stage YAML; None gives kwok's built-in default stages, but
                         only if extra_stages has no Pod stage (any Pod stage replaces them)
        extra_stages     more kwok Stage (or other kwok config) YAML documents, appended;
                         a Pod stage must not match the same pods as another, or kwok
                         picks one of them at random
        pod_log          text every container "logs" (kwok ClusterLogs); None: no logs
                         configured, and `kubectl logs` fails with BadRequest
        startup_timeout  seconds for the whole start (one deadline for all waits)
        keep_workdir     keep workdir after stop (default: $KBATCH_K8S_KEEP=1, or a
                         caller-given workdir)
        """
        self.bin_dir = Path(bin_dir)
        self._given_workdir = Path(workdir) if workdir is not None else None
        self.nodes = nodes
        self.node_capacity = dict(node_capacity)
        self.stages_file = Path(stages_file) if stages_file is not None else None
        self.extra_stages = list(extra_stages)
        self.pod_log = pod_log
        self.startup_timeout = startup_timeout
        if keep_workdir is None:
            keep_workdir = os.environ.get("KBATCH_K8S_KEEP") == "1" or workdir is not None
        self.keep_workdir = keep_workdir

        self._procs: list[_Process] = []
        self._workdir: Path | None = None
        self._server: str | None = None
        self._started = False
        self._deadline = 0.0
        self.ports: dict[str, int] = {}
        self.node_names = [f"kwok-node-{i}" for i in range(nodes)]

    # -- public attributes -------------------------------------------------------

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise RuntimeError("cluster not started")
        return self._workdir

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (client cert, group system:masters)."""
        return self.workdir / "admin.kubeconfig"

    @property
    def ca_path(self) -> Path:
        return self.workdir / "pki" / "ca.crt"

    @property
    def server(self) -> str:
        if self._server is None:
            raise RuntimeError("cluster not started")
        return self._server

    @property
    def pod_log_path(self) -> Path:
        """The CRI-format log file kwok serves for every container (see write_pod_log)."""
        return self.workdir / "kwok" / "pod.log"

    def env(self, kubeconfig: Path | None = None) -> dict[str, str]:
        """os.environ plus KUBECONFIG for a subprocess (admin unless given)."""
        return {**os.environ, "KUBECONFIG": str(kubeconfig or self.kubeconfig)}

    # -- lifecycle -----------------------------------------------------------------

    def __enter__(self) -> K8sCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._started:
            raise RuntimeError("cluster already started")
        self._started = True
        self._deadline = time.monotonic() + self.startup_timeout
        if self._given_workdir is not None:
            self._given_workdir.mkdir(parents=True, exist_ok=True)
            self._workdir = self._given_workdir
        else:
            self._workdir = Path(tempfile.mkdtemp(prefix="kbatch-k8s-"))
        atexit.register(self.stop)
        try:
            self._start()
        except BaseException as e:
            report = self.log_tails()
            print(f"k8s test cluster failed to start: {e}\n{report}", file=sys.stderr)
            self.keep_workdir = True  # keep logs to diagnose
            self.stop()
            if isinstance(e, Exception):
                raise ClusterStartError(f"{e}\nlogs in {self.log_dir}\n{report}") from e
            raise

    def stop(self) -> None:
        """Terminate every component (kwok first, etcd last), then kill stragglers."""
        atexit.unregister(self.stop)
        procs, self._procs = self._procs, []
        for p in reversed(procs):
            if p.running():
                p.popen.terminate()
            try:
                p.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(timeout=10)
        if self._workdir is not None and not self.keep_workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def log_tails(self, lines: int = 30) -> str:
        """The last lines of every component's log."""
        if self._workdir is None or not self.log_dir.is_dir():
            return ""
        out = []
        for path in sorted(self.log_dir.glob("*.log")):
            out.append(f"----- {path} (last {lines} lines)\n{_tail(path, lines)}")
        return "\n".join(out)

    # -- kubectl and helpers ---------------------------------------------------------

    def kubectl(
        self,
        *args: str,
        kubeconfig: Path | None = None,
        input: str | None = None,
        check: bool = True,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl (admin unless ``kubeconfig``); raise with its output if it fails and ``check``."""
        cmd = [
            str(self.bin_dir / "kubectl"),
            f"--kubeconfig={kubeconfig or self.kubeconfig}",
            f"--cache-dir={self.workdir / 'kubectl-cache'}",
            *args,
        ]
        proc = subprocess.run(
            cmd, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def kubectl_json(self, *args: str, kubeconfig: Path | None = None) -> Any:
        """``kubectl <args> -o json`` parsed."""
        return json.loads(self.kubectl(*args, "-o", "json", kubeconfig=kubeconfig).stdout)

    def apply(self, manifest: str, *, kubeconfig: Path | None = None) -> str:
        """``kubectl apply -f -`` with the given YAML/JSON; returns kubectl's output."""
        return self.kubectl("apply", "-f", "-", input=manifest, kubeconfig=kubeconfig).stdout

    def service_account_kubeconfig(
        self,
        name: str,
        namespace: str = "default",
        *,
        create: bool = True,
        duration: str = "1h",
        path: Path | None = None,
    ) -> Path:
        """A kubeconfig authenticating as ServiceAccount ``namespace/name``.

        Creates the namespace and ServiceAccount unless ``create`` is false and
        mints a token with ``kubectl create token``. Grant permissions
        separately (Role/RoleBinding); the SA starts with none.
        """
        if create:
            ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
            sa = {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": name, "namespace": namespace},
            }
            self.apply(json.dumps({"apiVersion": "v1", "kind": "List", "items": [ns, sa]}))
        token = self.kubectl(
            "create", "token", name, "-n", namespace, f"--duration={duration}"
        ).stdout.strip()
        text = kubeconfig_text(
            self.server,
            self.ca_path.read_bytes(),
            user=f"system:serviceaccount:{namespace}:{name}",
            token=token,
            namespace=namespace,
        )
        path = path or self.workdir / "kubeconfigs" / f"sa-{namespace}-{name}.kubeconfig"
        return _write(path, text)

    def write_pod_log(self, text: str, stream: str = "stdout") -> None:
        """Set what ``kubectl logs`` returns for every container (read on each request)."""
        _write(self.pod_log_path, _cri_log(text, stream), 0o644)

    def wait_for_default_service_account(self, namespace: str, timeout: float = 60.0) -> None:
        """Wait until the controller-manager created ``namespace``'s "default" ServiceAccount
        (pods cannot be created before it exists)."""
        self.kubectl(
            "wait",
            "--for=create",
            "serviceaccount/default",
            "-n",
            namespace,
            f"--timeout={int(timeout)}s",
            timeout=timeout + 30,
        )

    # -- startup -----------------------------------------------------------------------

    def _spawn(
        self, name: str, args: Sequence[str], env: Mapping[str, str] | None = None
    ) -> _Process:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log_file:  # the child keeps its own copy of the fd
            log_file.write(("$ " + " ".join(args) + "\n").encode())
            log_file.flush()
            popen = subprocess.Popen(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={**os.environ, **(env or {})},
                start_new_session=True,
                preexec_fn=_set_pdeathsig if sys.platform.startswith("linux") else None,
            )
        proc = _Process(name, popen, log_path)
        self._procs.append(proc)
        return proc

    def _remaining(self) -> float:
        """Seconds left of ``startup_timeout`` (one deadline for the whole start)."""
        return max(0.0, self._deadline - time.monotonic())

    def _wait_until(self, what: str, check: Callable[[], bool]) -> None:
        """Poll ``check`` until true; fail at the start deadline or as soon as a component exits."""
        deadline = self._deadline
        delay = 0.05
        while True:
            for p in self._procs:
                if not p.running():
                    raise ClusterStartError(
                        f"{p.name} exited with code {p.popen.returncode} while waiting for {what}"
                    )
            if check():
                return
            if time.monotonic() > deadline:
                raise ClusterStartError(f"timed out waiting for {what}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    @staticmethod
    def _http_ok(
        url: str, context: ssl.SSLContext | None = None, expect: bytes | None = None
    ) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as resp:
                body = resp.read()
                return resp.status == 200 and (expect is None or expect in body)
        except (urllib.error.URLError, OSError, ssl.SSLError):
            return False

    def _start(self) -> None:
        wd = self.workdir
        pki = wd / "pki"
        names = ["etcd-client", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok"]
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self._server = f"https://127.0.0.1:{self.ports['apiserver']}"

        # PKI: one CA for serving and client certs; a separate key signs SA tokens.
        ca = _make_ca("kbatch-test-ca")
        service_ip = str(next(ipaddress.ip_network(SERVICE_CLUSTER_IP_RANGE).hosts()))
        serving = _make_leaf(
            ca,
            "kube-apiserver",
            server=True,
            dns_names=[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            ips=["127.0.0.1", service_ip],
        )
        admin = _make_leaf(ca, "kubernetes-admin", organizations=["system:masters"], client=True)
        kcm = _make_leaf(ca, "system:kube-controller-manager", client=True)
        sched = _make_leaf(ca, "system:kube-scheduler", client=True)
        sa_key = _new_key()
        _write(self.ca_path, ca.cert_pem, 0o644)
        _write(pki / "ca.key", ca.key_pem)
        _write(pki / "apiserver.crt", serving.cert_pem, 0o644)
        _write(pki / "apiserver.key", serving.key_pem)
        _write(pki / "admin.crt", admin.cert_pem, 0o644)
        _write(pki / "admin.key", admin.key_pem)
        _write(pki / "sa.key", _key_pem(sa_key))
        _write(
            pki / "sa.pub",
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            0o644,
        )

        def kubeconfig_for(pair: _KeyPair, user: str) -> str:
            return kubeconfig_text(
                self.server,
                ca.cert_pem,
                user=user,
                client_cert_pem=pair.cert_pem,
                client_key_pem=pair.key_pem,
            )

        _write(self.kubeconfig, kubeconfig_for(admin, "kubernetes-admin"))
        kcm_kubeconfig = _write(
            wd / "controller-manager.kubeconfig",
            kubeconfig_for(kcm, "system:kube-controller-manager"),
        )
        sched_kubeconfig = _write(
            wd / "scheduler.kubeconfig", kubeconfig_for(sched, "system:kube-scheduler")
        )

        bin_ = self.bin_dir

        # etcd
        etcd_url = f"http://127.0.0.1:{self.ports['etcd-client']}"
        peer_url = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        self._spawn(
            "etcd",
            [
                str(bin_ / "etcd"),
                "--name=default",
                f"--data-dir={wd / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        self._wait_until(
            "etcd /health", lambda: self._http_ok(f"{etcd_url}/health", expect=b'"true"')
        )

        # kube-apiserver
        self._spawn(
            "kube-apiserver",
            [
                str(bin_ / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.ports['apiserver']}",
                f"--cert-dir={wd / 'apiserver-certs'}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={self.ca_path}",
                "--authorization-mode=Node,RBAC",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                # the Node's InternalIP is 127.0.0.1 (kwok); its Hostname does not resolve
                "--kubelet-preferred-address-types=InternalIP",
                # loopback addresses are invalid in the "kubernetes" Service's endpoints
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
            ],
        )
        api_ctx = ssl.create_default_context(cafile=str(self.ca_path))
        # what Python 3.13+ sets by default: the CA must pass strict X.509 checks
        api_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        api_ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        self._wait_until(
            "kube-apiserver /readyz", lambda: self._http_ok(f"{self.server}/readyz", api_ctx, b"ok")
        )

        # kube-controller-manager and kube-scheduler (self-signed serving certs in --cert-dir)
        self._spawn(
            "kube-controller-manager",
            [
                str(bin_ / "kube-controller-manager"),
                f"--kubeconfig={kcm_kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports['controller-manager']}",
                f"--cert-dir={wd / 'controller-manager-certs'}",
                "--controllers=*",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={self.ca_path}",
                f"--cluster-signing-cert-file={self.ca_path}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                "--use-service-account-credentials=true",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--leader-elect=false",
                "--profiling=false",
                "--v=1",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                str(bin_ / "kube-scheduler"),
                f"--kubeconfig={sched_kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports['scheduler']}",
                f"--cert-dir={wd / 'scheduler-certs'}",
                "--leader-elect=false",
                "--profiling=false",
                "--v=1",
            ],
        )

        # kwok: fake kubelets for Nodes annotated kwok.x-k8s.io/node=fake, kubelet API
        # (logs) on 127.0.0.1:<kwok port>, which the Nodes advertise.
        kwok_dir = wd / "kwok"
        kwok_config = _write(kwok_dir / "kwok.yaml", self._kwok_config(), 0o644)
        if self.pod_log is not None:
            self.write_pod_log(self.pod_log)
        kwok_port = self.ports["kwok"]
        self._spawn(
            "kwok",
            [
                str(bin_ / "kwok"),
                f"--kubeconfig={self.kubeconfig}",
                f"--config={kwok_config}",
                "--manage-nodes-with-annotation-selector={}={}".format(*KWOK_NODE_ANNOTATION),
                "--node-ip=127.0.0.1",
                f"--node-port={kwok_port}",
                f"--server-address=127.0.0.1:{kwok_port}",
            ],
            # keeps kwok from also loading ~/.kwok/kwok.yaml
            env={"KWOK_WORKDIR": str(kwok_dir / "home")},
        )

        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        for name in ("controller-manager", "scheduler"):
            url = f"https://127.0.0.1:{self.ports[name]}/healthz"
            self._wait_until(f"kube-{name} /healthz", partial(self._http_ok, url, insecure, b"ok"))
        self._wait_until(
            "kwok /healthz", lambda: self._http_ok(f"http://127.0.0.1:{kwok_port}/healthz")
        )

        self.apply(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "List",
                    "items": [self._node(n) for n in self.node_names],
                }
            )
        )
        self.kubectl(
            "wait",
            "--for=condition=Ready",
            "node",
            "--all",
            f"--timeout={max(1, int(self._remaining()))}s",
            timeout=self._remaining() + 30,
        )
        self.wait_for_default_service_account("default", timeout=max(1.0, self._remaining()))

    def _node(self, name: str) -> dict[str, Any]:
        key, value = KWOK_NODE_ANNOTATION
        capacity = dict(self.node_capacity)
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {key: value, "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {
                    "type": "kwok",
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                },
            },
            "spec": {},
            "status": {"capacity": capacity, "allocatable": capacity},
        }

    def _kwok_config(self) -> str:
        docs: list[str] = []
        if self.stages_file is not None:
            docs.append(self.stages_file.read_text())
        docs.extend(self.extra_stages)
        if self.pod_log is not None:
            docs.append(
                json.dumps(
                    {
                        "apiVersion": "kwok.x-k8s.io/v1alpha1",
                        "kind": "ClusterLogs",
                        "metadata": {"name": "all-pods"},
                        "spec": {"logs": [{"logsFile": str(self.pod_log_path)}]},
                    }
                )
            )
        return "\n---\n".join(d.strip("\n") for d in docs) + "\n"


@contextmanager
def k8s_cluster(bin_dir: Path | str | None = None, **kwargs: Any) -> Iterator[K8sCluster]:
    """Start a :class:`K8sCluster` (binaries from :func:`ensure_binaries` unless given); stop it on exit."""
    cluster = K8sCluster(bin_dir if bin_dir is not None else ensure_binaries(), **kwargs)
    with cluster:
        yield cluster

"""The submission port's certificate: the configured one, or a self-signed one made once."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from pathlib import Path

import structlog

from gateway.errors import DeskgateError
from gateway.settings import Settings, SubmissionSettings

log = structlog.get_logger("deskgate.submission")

CERT_NAME = "submission-cert.pem"
KEY_NAME = "submission-key.pem"
SELF_SIGNED_DAYS = 825  # the longest validity some mail clients still accept


def self_signed_dir(settings: Settings) -> Path:
    """tls_dir, else the dev state directory ([dev] dir), else the working directory."""
    if settings.submission.tls_dir:
        return Path(settings.submission.tls_dir)
    return Path(settings.outbound.dev.dir if settings.outbound.dev.enabled else ".")


def certificate_paths(settings: SubmissionSettings, hostname: str, directory: Path
                      ) -> tuple[Path, Path]:
    """The configured pair, else the self-signed pair in `directory` (made on first use)."""
    if settings.cert_file and settings.key_file:
        return Path(settings.cert_file), Path(settings.key_file)
    cert, key = directory / CERT_NAME, directory / KEY_NAME
    if cert.is_file() and key.is_file():
        return cert, key
    make_self_signed(cert, key, hostname)
    log.info("submission.self_signed_made", cert=str(cert), hostname=hostname)
    return cert, key


def make_self_signed(cert_path: Path, key_path: Path, hostname: str,
                     now: dt.datetime | None = None) -> None:
    """A key (mode 0600) and a certificate for `hostname`, each written whole or not at all."""
    # Imported here: only a first start without a configured certificate needs them.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    now = now or dt.datetime.now(dt.UTC)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    alt_names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    try:
        alt_names = [x509.IPAddress(ipaddress.ip_address(hostname))]
    except ValueError:
        pass
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=SELF_SIGNED_DAYS))
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(key_path, key_pem, 0o600)
    _write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)  # the umask must not widen or narrow what we asked for
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)


def server_context(settings: Settings) -> ssl.SSLContext:
    """TLS 1.2+ server context; a bad certificate or key is a one-line start-up error."""
    directory = self_signed_dir(settings)
    try:
        cert, key = certificate_paths(settings.submission, settings.hostname, directory)
    except OSError as exc:
        raise DeskgateError(f"submission: cannot make a certificate in {directory}: "
                            f"{exc.strerror}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise DeskgateError(f"submission: cannot load certificate {cert} / key {key}: "
                            f"{exc}") from None
    return context

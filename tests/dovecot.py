"""A private Dovecot for the IMAP tests: throwaway config, passwd-file users, Maildir in /tmp."""

from __future__ import annotations

import imaplib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

USERS = {"alice": "alice-secret", "bob": "bob-secret"}
# XOAUTH2: Dovecot's SASL XOAUTH2 hands the bearer token to the passdb as the password, so a
# passwd-file entry whose password is a fixed token stands in for a provider's token check.
OAUTH_USER, OAUTH_TOKEN = "carol", "carol-access-token-0123456789"
PASSWORDS = USERS | {OAUTH_USER: OAUTH_TOKEN}

CONFIG = """
base_dir = {root}/run
state_dir = {root}/state
instance_name = deskgate-test-{port}
log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
{ssl}
# Loopback only, throwaway users: clear-text LOGIN is what the test clients use.
disable_plaintext_auth = no
auth_mechanisms = plain login xoauth2
default_internal_user = {internal}
default_internal_group = {group}
default_login_user = {login}
first_valid_uid = 1
mail_uid = {internal}
mail_gid = {group}
mail_location = maildir:{root}/mail/%u
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = home={root}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {tls_port}
  }}
  chroot =
}}
service anvil {{
  chroot =
}}
service stats {{
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
"""


def binary(name: str) -> str | None:
    """dovecot and doveadm live in /usr/sbin, which is not on every PATH."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _users() -> tuple[str, str, str]:
    """As root, Dovecot refuses to run mail processes as root: use its own system users."""
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        group = subprocess.run(["id", "-gn"], capture_output=True, text=True).stdout.strip()
        return me.pw_name, group, me.pw_name
    internal = "dovecot" if _exists("dovecot") else "nobody"
    login = "dovenull" if _exists("dovenull") else internal
    group = subprocess.run(["id", "-gn", internal], capture_output=True, text=True).stdout.strip()
    return internal, group, login


def _exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False


def running(tls: bool = False) -> Iterator[Dovecot]:
    """A started private Dovecot for a fixture; a missing or broken one is a missing peer."""
    from tests.conftest import need_peer

    if binary("dovecot") is None or binary("doveadm") is None:
        need_peer("Dovecot", "dovecot/doveadm not found (apt-get install dovecot-imapd)")
    if tls and binary("openssl") is None:
        need_peer("Dovecot with TLS", "openssl not found")
    server = Dovecot(tls=tls)
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 — a server that cannot start is a missing peer
        server.stop()
        need_peer("Dovecot", f"cannot start a private instance: {exc}")
    yield server
    server.stop()


class Dovecot:
    def __init__(self, tls: bool = False) -> None:
        self.tls = tls
        self.tls_port = free_port() if tls else 0
        # Not under pytest's tmp_path: its 0700 parents keep the unprivileged mail user out.
        self.root = Path(tempfile.mkdtemp(prefix="deskgate-dovecot-"))
        self.root.chmod(0o755)
        self.port = free_port()
        self.conf = self.root / "dovecot.conf"

    def start(self) -> None:
        internal, group, login = _users()
        for sub in ("run", "state", "mail"):
            (self.root / sub).mkdir()
        shutil.chown(self.root / "mail", internal, group)
        (self.root / "passwd").write_text(
            "".join(f"{user}:{{PLAIN}}{password}\n" for user, password in PASSWORDS.items()))
        ssl = "ssl = no"
        if self.tls:
            self._certificate()
            ssl = (f"ssl = yes\nssl_cert = <{self.root}/cert.pem\n"
                   f"ssl_key = <{self.root}/key.pem")
        self.conf.write_text(CONFIG.format(root=self.root, port=self.port, internal=internal,
                                           group=group, login=login, ssl=ssl,
                                           tls_port=self.tls_port))
        # The daemon keeps inherited descriptors open: no pipes, or run() waits for ever.
        with open(self.root / "start.err", "wb") as err:
            result = subprocess.run([binary("dovecot") or "dovecot", "-c", str(self.conf)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, timeout=30)
        if result.returncode != 0:
            raise RuntimeError((self.root / "start.err").read_text()[-1000:])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"dovecot did not listen on {self.port}: {self.log()}")

    @property
    def ca_file(self) -> Path:
        return self.root / "cert.pem"

    def _certificate(self) -> None:
        """A self-signed certificate for 127.0.0.1: the client trusts it through ca_file."""
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                        "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(self.root / "key.pem"), "-out", str(self.ca_file)],
                       check=True, capture_output=True, timeout=60)

    def stop(self) -> None:
        subprocess.run([binary("doveadm") or "doveadm", "-c", str(self.conf), "stop"],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=30)
        pid_file = self.root / "run" / "master.pid"
        deadline = time.monotonic() + 5
        while pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text()[-2000:] if path.exists() else ""

    def client(self, user: str = "alice") -> imaplib.IMAP4:
        client = imaplib.IMAP4("127.0.0.1", self.port)
        client.login(user, PASSWORDS[user])
        return client

    def append(self, mails: Iterable[bytes], user: str = "alice", folder: str = "INBOX") -> None:
        client = self.client(user)
        try:
            for mail in mails:
                status, data = client.append(folder, None, None, mail)
                assert status == "OK", data
        finally:
            client.logout()

    def flags(self, user: str = "alice", folder: str = "INBOX") -> dict[int, set[str]]:
        """UID -> flags of every message in the folder."""
        client = self.client(user)
        try:
            client.select(folder, readonly=True)
            status, data = client.uid("FETCH", "1:*", "(UID FLAGS)")
            found: dict[int, set[str]] = {}
            for item in data:
                if not item:
                    continue
                text = item.decode() if isinstance(item, bytes) else item[0].decode()
                match = re.search(r"UID (\d+) FLAGS \(([^)]*)\)|FLAGS \(([^)]*)\) UID (\d+)", text)
                if match:
                    uid = int(match.group(1) or match.group(4))
                    found[uid] = set((match.group(2) or match.group(3) or "").split())
            return found
        finally:
            client.logout()

    def unflag(self, flag: str, user: str = "alice", folder: str = "INBOX") -> None:
        client = self.client(user)
        try:
            client.select(folder)
            client.uid("STORE", "1:*", "-FLAGS.SILENT", f"({flag})")
        finally:
            client.logout()

    def recreate(self, folder: str, user: str = "alice") -> None:
        """Delete and create the folder again: a new UIDVALIDITY (RFC 3501 2.3.1.1)."""
        client = self.client(user)
        try:
            client.delete(folder)
            status, data = client.create(folder)
            assert status == "OK", data
        finally:
            client.logout()

    def create(self, folder: str, user: str = "alice") -> None:
        client = self.client(user)
        try:
            client.create(folder)
        finally:
            client.logout()

    def uidvalidity(self, folder: str, user: str = "alice") -> int:
        client = self.client(user)
        try:
            status, data = client.status(folder, "(UIDVALIDITY)")
            return int(re.search(rb"UIDVALIDITY (\d+)", data[0]).group(1))  # type: ignore[union-attr]
        finally:
            client.logout()

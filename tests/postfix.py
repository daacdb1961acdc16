"""A private Postfix instance in front of deskgate: own config and queue, 127.0.0.1 only.

It never touches the system instance: its own config_directory (`postfix -c DIR`), its own
queue_directory, smtpd only on 127.0.0.1:<free port>, no local delivery, log to a file.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

# What README "Postfix in front of deskgate" tells operators to add, plus the test's own
# isolation (directories, listener, log, no local delivery, fast failures).
MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/spool
data_directory = {root}/data
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
syslog_name = postfix-deskgate-test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = mx.postfix.test
mydomain = postfix.test
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
mynetworks = 127.0.0.0/8
smtp_tls_security_level = none
smtpd_tls_security_level = none
# deskgate's 4xx (or no answer) keeps the mail queued; retries only when the test flushes.
minimal_backoff_time = 300s
maximal_backoff_time = 600s
relay_domains = example.test
transport_maps = texthash:{root}/etc/transport
"""
TRANSPORT = "support@example.test    smtp:[127.0.0.1]:{port}\n" \
            "billing@example.test    smtp:[127.0.0.1]:{port}\n"
# Only the services this test needs, none chrooted (the queue lives under a temp folder).
MASTER_CF = """\
127.0.0.1:{smtpd_port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def missing() -> str | None:
    """Why a private Postfix cannot run here, or None."""
    if shutil.which("postfix") is None or shutil.which("postqueue") is None:
        return "the Debian `postfix` package is not installed"
    if os.geteuid() != 0:
        return "starting a Postfix instance needs root"
    return None


class PrivatePostfix:
    def __init__(self, smtpd_port: int, deskgate_port: int) -> None:
        # Not under pytest's tmp_path: its 0700 parents would keep the postfix user out.
        self.root = Path(tempfile.mkdtemp(prefix="deskgate-postfix-"))
        self.root.chmod(0o755)
        self.etc = self.root / "etc"
        self.smtpd_port = smtpd_port
        for sub in ("etc", "spool", "data"):
            (self.root / sub).mkdir()
        shutil.chown(self.root / "data", "postfix")
        (self.etc / "main.cf").write_text(MAIN_CF.format(root=self.root))
        (self.etc / "master.cf").write_text(MASTER_CF.format(smtpd_port=smtpd_port))
        (self.etc / "transport").write_text(TRANSPORT.format(port=deskgate_port))

    def _run(self, *command: str) -> str:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if result.returncode:
            raise AssertionError(f"{' '.join(command)}: exit {result.returncode}: "
                                 f"{result.stderr}{self.log[-2000:]}")
        return result.stdout

    def start(self) -> None:
        self._run("postfix", "-c", str(self.etc), "check")
        self._run("postfix", "-c", str(self.etc), "start")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.smtpd_port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"postfix did not listen on {self.smtpd_port}: {self.log[-2000:]}")

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.etc), "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)

    def flush(self) -> None:
        """Deliver what is queued now (deferred mail included), as an operator would."""
        self._run("postqueue", "-c", str(self.etc), "-f")

    def queue(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in
                self._run("postqueue", "-c", str(self.etc), "-j").splitlines() if line]

    @property
    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

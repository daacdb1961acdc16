#!/usr/bin/env bash
# Install or upgrade deskgate as a systemd service (run as root from a checkout; idempotent).
#   user deskgate, /opt/deskgate (venv), /usr/local/bin/deskgate, /etc/deskgate/{deskgate.toml,
#   secret}, /var/lib/deskgate, /etc/systemd/system/deskgate.service; then `deskgate db
#   upgrade` as the service user, and a restart when the service is already running.
# Paths can be moved for a dry run: PREFIX, ETC_DIR, STATE_DIR, UNIT_DIR, BIN_LINK, SVC_USER.
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX="${PREFIX:-/opt/deskgate}"
ETC_DIR="${ETC_DIR:-/etc/deskgate}"
STATE_DIR="${STATE_DIR:-/var/lib/deskgate}"
UNIT_DIR="${UNIT_DIR:-/etc/systemd/system}"
BIN_LINK="${BIN_LINK:-/usr/local/bin/deskgate}"
SVC_USER="${SVC_USER:-deskgate}"
PYTHON="${PYTHON:-/usr/bin/python3}"  # not a per-user python: the service user runs it
say() { echo "install-system: $*"; }

if ! getent passwd "$SVC_USER" >/dev/null; then
  say "creating system user $SVC_USER"
  useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
          --shell /usr/sbin/nologin --comment "deskgate helpdesk gateway" "$SVC_USER"
fi
group="$(id -gn "$SVC_USER")"

say "installing the package into $PREFIX"
[ -x "$PREFIX/bin/python" ] || "$PYTHON" -m venv "$PREFIX"
"$PREFIX/bin/pip" install --quiet --upgrade pip
"$PREFIX/bin/pip" install --quiet --upgrade .
ln -sfn "$PREFIX/bin/deskgate" "$BIN_LINK"

install -d -m 0750 -o root -g "$group" "$ETC_DIR"
install -d -m 0750 -o "$SVC_USER" -g "$group" "$STATE_DIR"
if [ ! -e "$ETC_DIR/secret" ]; then
  say "writing a new reply-token secret to $ETC_DIR/secret"
  (umask 077; head -c 32 /dev/urandom | base64 > "$ETC_DIR/secret")
  chown "root:$group" "$ETC_DIR/secret"
  chmod 0640 "$ETC_DIR/secret"
fi
if [ ! -e "$ETC_DIR/deskgate.toml" ]; then
  say "writing $ETC_DIR/deskgate.toml from the example: edit departments and addresses"
  sed -e "s#/etc/deskgate/secret#$ETC_DIR/secret#" \
      -e "s#/var/lib/deskgate/#$STATE_DIR/#" config/deskgate.example.toml > "$ETC_DIR/deskgate.toml"
  chown "root:$group" "$ETC_DIR/deskgate.toml"
  chmod 0640 "$ETC_DIR/deskgate.toml"
fi

install -d "$UNIT_DIR"
sed "s#/usr/local/bin/deskgate#$BIN_LINK#g" systemd/deskgate.service > "$UNIT_DIR/deskgate.service"
chmod 0644 "$UNIT_DIR/deskgate.service"

say "checking the configuration and upgrading the database schema"
runuser -u "$SVC_USER" -- "$BIN_LINK" --config "$ETC_DIR/deskgate.toml" check-config
(cd "$STATE_DIR" && runuser -u "$SVC_USER" -- "$BIN_LINK" --config "$ETC_DIR/deskgate.toml" db upgrade)

if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl try-restart deskgate.service  # only when it was running: an upgrade
  say "done; first install: systemctl enable --now deskgate"
else
  say "done (systemd is not running here: unit installed, nothing started)"
fi
"$BIN_LINK" --version

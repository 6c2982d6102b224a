#!/usr/bin/env bash
# The demo command: set-up (packages, npm ci, build), then the whole chain on
# this machine with a signed round trip. Keeps running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
if [ "$(uname -s)" != "Darwin" ] && [ ! -d /run/sshd ]; then
  # sshd refuses to start without its privilege-separation directory (systemd normally makes it).
  if [ "$(id -u)" -eq 0 ]; then mkdir -p -m 0755 /run/sshd
  else echo "[setup] creating /run/sshd for sshd (needs root)"; sudo mkdir -p -m 0755 /run/sshd; fi
fi
npm run --silent build
exec node --import tsx scripts/demo.ts "$@"

#!/usr/bin/env bash
# The test command: set-up (packages, npm ci) if needed, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# sshd refuses to start without its privilege-separation directory (systemd normally makes it).
if [ ! -d /run/sshd ]; then
  if [ "$(id -u)" -eq 0 ]; then mkdir -p -m 0755 /run/sshd; else sudo mkdir -p -m 0755 /run/sshd; fi
fi
npm test

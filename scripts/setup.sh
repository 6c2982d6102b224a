#!/usr/bin/env bash
# One-time set-up on a fresh machine: the system packages the agent, the tests
# and the demo need (SoftHSM v2, OpenSSH server/client, curl; on Debian, Chromium for the
# dashboard's browser test), then the npm
# dependencies. Says what it installs before it does, and uses sudo only when
# not already root.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

if [ "$(uname -s)" = "Darwin" ]; then
  if ! ls /opt/homebrew/lib/softhsm/libsofthsm2.so /usr/local/lib/softhsm/libsofthsm2.so >/dev/null 2>&1; then
    command -v brew >/dev/null || { echo "Homebrew is needed to install SoftHSM (https://brew.sh)"; exit 1; }
    say "installing SoftHSM v2 with Homebrew: brew install softhsm"
    brew install softhsm
  fi
else
  need=()
  command -v softhsm2-util >/dev/null 2>&1 || need+=(softhsm2)
  command -v pkcs11-tool >/dev/null 2>&1 || need+=(opensc)
  [ -x /usr/sbin/sshd ] || need+=(openssh-server)
  command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
  command -v curl >/dev/null 2>&1 || need+=(curl)
  command -v ip >/dev/null 2>&1 || need+=(iproute2)
  command -v openssl >/dev/null 2>&1 || need+=(openssl)
  # The dashboard's browser test drives Chromium through playwright-core (which downloads no browser).
  # Debian packages it as `chromium`; elsewhere (Ubuntu ships it as a snap) XKS_CHROMIUM names a browser.
  if [ ! -x /usr/bin/chromium ] && [ -z "${XKS_CHROMIUM:-}" ]; then
    if grep -qx 'ID=debian' /etc/os-release 2>/dev/null; then
      need+=(chromium)
    else
      say "the dashboard's browser test needs Chromium or Chrome: install it and set XKS_CHROMIUM=/path/to/it"
    fi
  fi
  if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
      SUDO="sudo"
      say "root is needed to install Debian packages: ${need[*]} (you may be asked for your password)"
    else
      say "installing Debian packages: ${need[*]}"
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
fi

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  say "installing npm dependencies (npm ci; builds pkcs11js and ssh2's native parts)"
  npm ci --no-audit --no-fund
fi

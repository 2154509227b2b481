#!/usr/bin/env bash
# Optional Debian packages: real sample volumes (invesalius-examples: head CT; mricron-data: Colin27 MR), plus
# any named as arguments (test.sh: Orthanc with its DICOMweb and GDCM plugins for the PACS round-trip test).
# Installed only where apt is usable without a password (root, or passwordless sudo); otherwise the
# sample data builder simply uses the pip-shipped slices. Never fails the caller.
set -uo pipefail
PACKAGES=(invesalius-examples mricron-data "$@")
missing=()
for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
[[ ${#missing[@]} -eq 0 ]] && exit 0
command -v apt-get >/dev/null 2>&1 || { echo "[setup] no apt-get: skipping ${missing[*]}"; exit 0; }
if [[ $(id -u) -eq 0 ]]; then SUDO=(); elif sudo -n true 2>/dev/null; then SUDO=(sudo -n); else
  echo "[setup] apt needs a password: skipping ${missing[*]} (install them yourself for more sample data)"; exit 0; fi
export DEBIAN_FRONTEND=noninteractive
echo "[setup] apt-get install ${missing[*]}"
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >/tmp/adl_apt.log 2>&1 \
  || { "${SUDO[@]}" apt-get update -q >>/tmp/adl_apt.log 2>&1 && "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >>/tmp/adl_apt.log 2>&1; } \
  || echo "[setup] apt-get could not install ${missing[*]} (see /tmp/adl_apt.log); continuing without them"
exit 0

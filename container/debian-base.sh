#!/usr/bin/env bash
# A Debian bookworm base image with Python, pip and venv, bootstrapped from Debian's
# mirror (no image registry needed) and imported as localhost/tagmill-debian:bookworm.
# Prints the image's name; does nothing but that when the image already exists.
# Needs root, debootstrap and podman (or docker).
set -euo pipefail
NAME=${DEBIAN_BASE_IMAGE:-localhost/tagmill-debian:bookworm}
ENGINE=${ENGINE:-$(command -v podman >/dev/null 2>&1 && echo podman || echo docker)}
if "$ENGINE" image exists "$NAME" 2>/dev/null || "$ENGINE" image inspect "$NAME" >/dev/null 2>&1; then
    echo "$NAME"
    exit 0
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
# minbase: dpkg, apt and the essentials; ~25-45 s and ~300 MB with Python
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    bookworm "$root" >&2
tar -C "$root" -c . | "$ENGINE" import - "$NAME" >&2
echo "$NAME"

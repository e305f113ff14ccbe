#!/usr/bin/env bash
# Builds a stand-in for python:3.11-slim, for the container test: no registry is reachable here.
#
#   tests/base_image.sh [IMAGE]      (default docker.io/library/python:3.11-slim; needs root)
#
# A minimal Debian bookworm (Python 3.11, as python:3.11-slim) from this machine's apt mirror, made to
# behave like the real image for the Dockerfile: `python` and `pip` on PATH, pip installing into the
# system. Test scaffolding only: the project's Dockerfile builds on it unchanged.
# Podman's configuration comes from the caller's CONTAINERS_CONF / CONTAINERS_STORAGE_CONF.
# Environment: DEBIAN_MIRROR (default: the host's Debian mirror), DEBOOTSTRAP_CACHE (.deb cache dir),
# PYTHON (whose pip config to copy, default python3), SSL_CERT_FILE (the host's CA bundle),
# STANDIN_KEY (kept as the label gpt2-run.standin-key: the test rebuilds when its key changes).
set -euo pipefail

image=${1:-docker.io/library/python:3.11-slim}
ca_bundle=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}

host_mirror() {
    # The first Debian archive the host's apt uses (deb822 .sources or one-line sources.list).
    {
        grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' || true
        grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | sed 's/\[[^]]*\]//' | awk '{print $2}' || true
    } | grep -E '/debian/?$' | head -n 1 || true
}
mirror=${DEBIAN_MIRROR:-$(host_mirror)}
mirror=${mirror:-http://deb.debian.org/debian}

rootfs=$(mktemp -d /var/tmp/python-slim-standin.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT

echo "base_image.sh: debootstrap bookworm from $mirror" >&2
cache_args=()
if [ -n "${DEBOOTSTRAP_CACHE:-}" ]; then
    mkdir -p "$DEBOOTSTRAP_CACHE"
    cache_args=(--cache-dir="$(realpath "$DEBOOTSTRAP_CACHE")")
fi
debootstrap --variant=minbase "${cache_args[@]}" \
    --include=python3,python3-pip,python3-venv,ca-certificates bookworm "$rootfs" "$mirror" >&2

# What python:3.11-slim offers: `python` and `pip` commands, and pip may install into the system.
ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/pip"
rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED

# Outbound TLS may be intercepted by a proxy only the host's CA bundle trusts: pip in a build needs it.
cp "$ca_bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"

# pip: the host's CA bundle, and the host's package index if it is a custom http(s) one.
python=${PYTHON:-python3}
index_url=${PIP_INDEX_URL:-$("$python" -m pip config get global.index-url 2>/dev/null || true)}
extra_urls=${PIP_EXTRA_INDEX_URL:-$("$python" -m pip config get global.extra-index-url 2>/dev/null || true)}
{
    echo "[global]"
    echo "cert = /etc/ssl/certs/ca-certificates.crt"
    if [[ $index_url =~ ^https?:// ]]; then echo "index-url = $index_url"; fi
    extra=$(tr ' ' '\n' <<<"$extra_urls" | grep -E '^https?://' | tr '\n' ' ' || true)
    if [ -n "$extra" ]; then echo "extra-index-url = $extra"; fi
} >"$rootfs/etc/pip.conf"

rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb

tar -C "$rootfs" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'LABEL org.opencontainers.image.description=gpt2-run-test-standin-for-python-3.11-slim' \
    --change "LABEL gpt2-run.standin-key=${STANDIN_KEY:-none}" \
    --change 'CMD ["python3"]' \
    - "$image" >&2
echo "$image"

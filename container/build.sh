#!/usr/bin/env bash
# Build tagmill's image (`make container`). Settings, from the environment:
#   IMAGE=tagmill            the tag to build
#   BASE=python:3.11-slim-bookworm (the Dockerfile's default) | debian | any image name
#                            "debian": a Debian bookworm base bootstrapped here
#                            (container/debian-base.sh), for machines that reach Debian's
#                            mirror and PyPI but no image registry
#   TORCH_INDEX_URL=...      where torch's wheels come from (README.md, "Container")
#   ENGINE=podman|docker     default: podman when installed, else docker
#   BUILD_ARGS="..."         more arguments for the build, e.g. "--build-arg USER=root"
# pip's own settings on this machine (index, local package folders, a proxy's CA
# certificate: `pip config list` and PIP_* variables) are handed to the build, and with
# podman the local folders they name are mounted into it read-only.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-tagmill}
ENGINE=${ENGINE:-$(command -v podman >/dev/null 2>&1 && echo podman || echo docker)}
args=(build -t "$IMAGE" --network=host)
if [[ $ENGINE == podman ]]; then
    # docker's format keeps HEALTHCHECK (the OCI format has no such field); the limits are
    # the ones machines with a low hard limit accept (runc refuses to raise them)
    args+=(--format docker --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
fi
if [[ ${BASE:-} == debian ]]; then
    BASE=$(container/debian-base.sh)
fi
[[ -n ${BASE:-} ]] && args+=(--build-arg "BASE=$BASE")
[[ -n ${TORCH_INDEX_URL:-} ]] && args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")

# pip's setting NAME (pip config's key) -> the build argument the Dockerfile declares
declare -A settings=([index-url]=PIP_INDEX_URL [extra-index-url]=PIP_EXTRA_INDEX_URL
                     [find-links]=PIP_FIND_LINKS [cert]=PIP_CERT)
mounted=()
mount_ro() {  # a local path a setting names, visible in the build at the same path
    local path=$1
    [[ $ENGINE == podman && -e $path ]] || return 0
    for seen in "${mounted[@]:-}"; do [[ $seen == "$path" ]] && return 0; done
    mounted+=("$path")
    args+=(-v "$path:$path:ro")
}
for key in "${!settings[@]}"; do
    var=${settings[$key]}
    value=${!var:-$(python3 -m pip config get "global.$key" 2>/dev/null || true)}
    [[ -n $value ]] || continue
    args+=(--build-arg "$var=$value")
    for item in $value; do
        item=${item#file://}
        [[ $item == /* ]] || continue
        # a file:// index may link to files beside its "simple" folder: mount the folder above
        [[ $item == */simple ]] && item=${item%/simple}
        mount_ro "$item"
    done
done

# shellcheck disable=SC2206  # several words on purpose
[[ -n ${BUILD_ARGS:-} ]] && args+=($BUILD_ARGS)

echo "+ $ENGINE ${args[*]} ." >&2
exec "$ENGINE" "${args[@]}" .

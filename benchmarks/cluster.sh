#!/usr/bin/env bash
# Emulated multi-node cluster on one machine: N network namespaces (198.18.0.0/15) joined by veth links
# to a bridge, each link shaped with tc tbf, one torchrun per node, pinned (taskset) to the node's own share
# of the cores with threads per worker = the node's cores / its workers; the first output line says which.
# See `commsgd bench cluster --help`.
#
#   benchmarks/cluster.sh                                   link test + allreduce vs lsgd at 1 and 0.1 Gbit/s
#   benchmarks/cluster.sh --nodes 2 --procs 2 --gbps 1 --train --out runs/lsgd-2x2 --algorithm lsgd --steps 600
#
# Needs root and iproute2. The Python side deletes its namespaces on exit, error and Ctrl-C; this trap
# also removes them if Python itself is killed (SIGKILL), by their tag.
set -euo pipefail

if [[ ${EUID:-$(id -u)} -ne 0 ]]; then
    echo "cluster.sh: needs root (network namespaces, tc). Without it, use the in-process network model:" >&2
    echo "  commsgd train ... network.enabled=true network.inter_gbps=1 cluster.group_size=2" >&2
    exit 2
fi
if ! command -v ip >/dev/null || ! command -v tc >/dev/null; then
    echo "cluster.sh: ip/tc not found; install iproute2 (apt-get install -y iproute2)" >&2
    exit 2
fi

tag="sh$$"
cleanup() {
    local ns
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^commsgd-${tag}-(sw|n[0-9]+)$" || true); do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

python -m commsgd bench cluster --tag "$tag" "$@"

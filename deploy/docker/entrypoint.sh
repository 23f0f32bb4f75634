#!/bin/sh
# The image's entrypoint: `kvlab serve --host 0.0.0.0 "$@"`, with torch's thread count set first.
set -eu

# torch starts one thread per core of the host, not per CPU of the container's quota: on a 64-core
# node with a 2-CPU limit, 64 threads would fight over 2 CPUs. Unless OMP_NUM_THREADS is set (compose
# and the k8s Deployment set it from the CPU limit), take it from the cgroup v2 CPU quota.
# (KVLAB_CPU_MAX_FILE: another file of the same format, for the tests.)
cpu_max=${KVLAB_CPU_MAX_FILE:-/sys/fs/cgroup/cpu.max}
if [ -z "${OMP_NUM_THREADS:-}" ] && [ -r "$cpu_max" ]; then
    read -r quota period < "$cpu_max"
    if [ "$quota" != "max" ]; then
        export OMP_NUM_THREADS=$(( (quota + period - 1) / period ))
    fi
fi

# exec: the server is PID 1 and receives SIGTERM itself (it drains in-flight requests, then exits).
# It loads the kernels compiled into $KVLAB_CACHE at build time before serving, and measures their
# calibration afresh where this CPU model or thread count differs from the build host's (see the
# Dockerfile).
exec kvlab serve --host 0.0.0.0 "$@"

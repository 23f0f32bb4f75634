#!/bin/sh
# The image's entrypoint: `kvlab serve --host 0.0.0.0 "$@"`, after two things the server cannot know.
set -eu

# torch starts one thread per core of the host, not per core of the container's CPU quota: on a
# 64-core node with a 2-CPU limit, 64 threads would fight over 2 CPUs. Unless OMP_NUM_THREADS is set
# (compose and the k8s Deployment set it from the CPU limit), take it from the cgroup v2 quota.
if [ -z "${OMP_NUM_THREADS:-}" ] && [ -r /sys/fs/cgroup/cpu.max ]; then
    read -r quota period < /sys/fs/cgroup/cpu.max
    if [ "$quota" != "max" ]; then
        export OMP_NUM_THREADS=$(( (quota + period - 1) / period ))
    fi
fi

# The kernels were compiled into $KVLAB_CACHE when the image was built, and calibrated there on the
# build host. The calibration (which kernel serves each dtype and rows count) is keyed by the CPU model
# and torch's thread count: on another CPU or thread count this measures afresh (about 5 s on an idle
# machine, announced on stderr) before the server starts, so no request pays for it. Cached: a
# couple of seconds to load. Exits non-zero only if something is broken (no kernels is not an error).
python -m kvlab.kernels build >&2

exec kvlab serve --host 0.0.0.0 "$@"

"""deploy/docker as a specification: a multi-stage build whose builder compiles the kernels and whose
final stage runs kvlab serve as a non-root user with a healthcheck on the server's liveness route;
the runtime finds the kernels the builder compiled without a compiler of its own.

The image itself is built where Docker runs (`docker build -f deploy/docker/Dockerfile .`); these
tests read the files and reproduce the runtime stage's conditions on this machine."""

import os
import re
import shutil
import subprocess
import sys

import pytest
from deploy_files import DOCKERFILE, LIVENESS_ROUTE, REPO, SERVER_PORT, dockerfile_stages

from kvlab.kernels import build
from kvlab.kernels import cpu as cpu_kernels

ENTRYPOINT = DOCKERFILE.parent / "entrypoint.sh"


def stage_text(stage: list[tuple[str, str]], instruction: str) -> list[str]:
    return [arguments for name, arguments in stage if name == instruction]


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    values = {}
    for arguments in stage_text(stage, "ENV"):
        values.update(re.findall(r"(\w+)=(\S+)", arguments))
    return values


def test_multi_stage_build():
    stages = dockerfile_stages()
    assert len(stages) >= 2
    builder, runtime = stages[0], stages[-1]
    assert stage_text(builder, "FROM")[0].endswith("AS builder")
    # Same base image in both stages: the venv's python links to the base image's interpreter.
    assert stage_text(builder, "FROM")[0].split()[0] == stage_text(runtime, "FROM")[0].split()[0]
    assert any("build-essential" in run for run in stage_text(builder, "RUN"))
    assert not any("build-essential" in run for run in stage_text(runtime, "RUN"))


def test_the_builder_compiles_the_kernels_into_the_cache_the_runtime_reads():
    builder, runtime = dockerfile_stages()[0], dockerfile_stages()[-1]
    runs = stage_text(builder, "RUN")
    assert "python -m kvlab.kernels build" in runs
    assert runs.index("python -m kvlab.kernels build") > next(
        i for i, run in enumerate(runs) if run.startswith("pip install .")
    )
    # Same cache and venv paths in both stages: the kernels' ninja build refers to them by absolute path.
    for name in ("KVLAB_CACHE", "VIRTUAL_ENV"):
        assert env_of(builder)[name] == env_of(runtime)[name]
    copies = stage_text(runtime, "COPY")
    for path in (env_of(runtime)["VIRTUAL_ENV"], env_of(runtime)["KVLAB_CACHE"]):
        assert any(c.startswith("--from=builder") and c.endswith(f"{path} {path}") for c in copies), path


def test_torch_is_the_version_the_makefile_pins():
    makefile = re.findall(r"torch==([\w.+]+)", (REPO / "Makefile").read_text())
    dockerfile = re.findall(r"torch==([\w.+]+)", DOCKERFILE.read_text())
    assert dockerfile and set(dockerfile) == set(makefile)
    assert "download.pytorch.org/whl/cpu" in DOCKERFILE.read_text()


def test_the_final_stage_runs_as_non_root_with_a_healthcheck():
    runtime = dockerfile_stages()[-1]
    (user,) = stage_text(runtime, "USER")
    assert user.split(":")[0] not in ("root", "0")
    (healthcheck,) = stage_text(runtime, "HEALTHCHECK")
    assert f"http://127.0.0.1:{SERVER_PORT}{LIVENESS_ROUTE}" in healthcheck
    assert "curl" not in healthcheck  # not in a slim image
    assert stage_text(runtime, "EXPOSE") == [str(SERVER_PORT)]
    (cmd,) = stage_text(runtime, "CMD")
    assert f'"--port", "{SERVER_PORT}"' in cmd
    # the cache is the server user's: a calibration for a new CPU is written there at start
    assert any(
        "--chown=kvlab:kvlab" in c and env_of(runtime)["KVLAB_CACHE"] in c
        for c in stage_text(runtime, "COPY")
    )


def run_entrypoint(tmp_path, env: dict[str, str]) -> list[str]:
    """entrypoint.sh with a stand-in for kvlab that logs its arguments and OMP_NUM_THREADS."""
    log = tmp_path / "calls"
    stand_in = tmp_path / "kvlab"
    stand_in.write_text(f'#!/bin/sh\necho "kvlab $* threads=${{OMP_NUM_THREADS:-unset}}" >> {log}\n')
    stand_in.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", **env}
    result = subprocess.run(
        ["sh", str(ENTRYPOINT), "--port", "8000"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return log.read_text().splitlines()


def test_the_entrypoint_execs_kvlab_serve_on_all_interfaces(tmp_path):
    """exec: the server replaces the shell, so it is PID 1 and gets SIGTERM; --host 0.0.0.0 first,
    then the CMD's (or the Deployment's) arguments; an OMP_NUM_THREADS given is kept."""
    assert subprocess.run(["sh", "-n", str(ENTRYPOINT)]).returncode == 0
    assert 'exec kvlab serve --host 0.0.0.0 "$@"' in ENTRYPOINT.read_text()
    assert run_entrypoint(tmp_path, {"OMP_NUM_THREADS": "3"}) == [
        "kvlab serve --host 0.0.0.0 --port 8000 threads=3"
    ]


@pytest.mark.parametrize(
    "cpu_max, threads",
    [("200000 100000", "2"), ("150000 100000", "2"), ("50000 100000", "1"), ("max 100000", "unset")],
)
def test_the_entrypoint_takes_threads_from_the_cpu_quota(tmp_path, cpu_max, threads):
    """cgroup v2's cpu.max is "quota period" (or "max period" without a limit): threads = ceil(quota / period)."""
    quota = tmp_path / "cpu.max"
    quota.write_text(cpu_max + "\n")
    calls = run_entrypoint(tmp_path, {"KVLAB_CPU_MAX_FILE": str(quota)})
    assert calls == [f"kvlab serve --host 0.0.0.0 --port 8000 threads={threads}"]


def test_dockerignore_keeps_the_context_small():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "results"} <= ignored
    assert not {"kvlab", "pyproject.toml", "README.md", "deploy"} & ignored  # what the build copies


@pytest.mark.skipif(not cpu_kernels.available(), reason=f"kvlab CPU kernels: {cpu_kernels.build_failure()}")
def test_prebuilt_kernels_load_without_a_compiler(tmp_path):
    """The runtime stage has no compiler: the kernels compiled into the cache load all the same (the
    ninja that built them finds nothing to do), and no build is attempted."""
    library = build.build_dir() / f"{build.extension_name()}.so"
    built_at = library.stat().st_mtime_ns
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "ninja").symlink_to(shutil.which("ninja"))  # the ninja torch's loader ran here
    env = {
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "PATH": str(tools),
        "KVLAB_CACHE": str(build.cache_root().parent),
        "TORCH_DONT_CHECK_COMPILER_ABI": "1",
        "HF_HUB_OFFLINE": "1",
    }
    code = (
        "import shutil, sys; from kvlab.kernels import build, cpu\n"
        "assert shutil.which(build.compiler()) is None\n"
        "print(cpu.build_failure()); print(cpu.supported_variants())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    failure, variants = result.stdout.splitlines()
    assert failure == "None", result.stderr
    assert "avx2" in variants
    assert "compiling" not in result.stderr
    assert library.stat().st_mtime_ns == built_at

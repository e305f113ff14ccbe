#!/bin/sh
# The llama-cpp-python wheel pinned in requirements.txt, in folder $1: reused if one that fits this
# machine is already there (pip decides), else compiled from PyPI's sdist (12 minutes on a 2-core AMD EPYC, 2026-12-05).
# `make setup` keeps it in wheels/; the Dockerfile's `wheels` stage runs this too and is handed that
# folder, so a machine that built the wheel once never compiles it again.
#
# The CPU backend is portable, never -march=native: Cloud Run runs on several x86-64 generations
# (and the build machine may have AVX-512 the server lacks). One build for x86-64-v3 (AVX2, FMA,
# F16C, BMI2), which every Cloud Run CPU has: GGML_CPU_ALL_VARIANTS would compile the CPU backend 13
# times (longer than the whole test suite here), and llama-cpp-python's CMakeLists installs a fixed
# list of libraries that leaves those modules (ggml-cpu-haswell.so, ...) out of the wheel.
# OpenMP off: ggml's own thread pool, and no libgomp needed in the image.
# A wheel is reused only when the stamp beside it (llama_cpp_python-VERSION.cmake-args) records these
# exact flags: a wheel's name does not say how it was compiled, and one built with pip's defaults
# (GGML_NATIVE=ON) must never reach an image.
# $PIP: the pip to run (default `pip`). `--check`: exit 0 if a reusable wheel is there, 1 if not; never compiles.
set -eu
dest=$1
pip=${PIP:-pip}
version=$(sed -n 's/^llama-cpp-python==//p' requirements.txt)
[ -n "$version" ] || { echo "llama_wheel.sh: no llama-cpp-python== pin in requirements.txt" >&2; exit 1; }
cmake_args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF"
stamp="$dest/llama_cpp_python-$version.cmake-args"
if [ "$(cat "$stamp" 2>/dev/null)" = "$cmake_args" ] \
   && $pip wheel -q --no-deps --no-index --find-links "$dest" -w "$dest" "llama-cpp-python==$version" 2>/dev/null; then
    exit 0
fi
[ "${2:-}" != --check ] || exit 1
echo "Compiling llama-cpp-python $version (llama.cpp, CPU: x86-64-v3); once (12 minutes on 2 cores)"
rm -f "$stamp"
CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    $pip wheel --no-deps --no-binary llama-cpp-python -w "$dest" "llama-cpp-python==$version"
echo "$cmake_args" > "$stamp"

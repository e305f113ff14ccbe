#!/bin/sh
# llama-server, llama.cpp's own C++ server: the peer bench/serve.py measures our server against.
# Built from the llama.cpp that llama-cpp-python's sdist vendors (the version pinned in
# requirements.txt), with the wheel's portable CPU flags (scripts/llama_wheel.sh: x86-64-v3, no
# -march=native, no OpenMP), so both servers run the same kernels. Static, without the web UI or
# HTTPS. Cached in $LLAMA_SERVER_CACHE (default ~/.cache/gpt2-run/llama-server/), keyed by the
# version and stamped with the flags; prints the binary's path. Not part of `make test`.
# First run: 5-15 minutes on 2 quiet cores (only the llama-server target is compiled; $JOBS
# compilers at once, default one a core).
set -eu
cd "$(dirname "$0")/.."
version=$(sed -n 's/^llama-cpp-python==//p' requirements.txt)
wheel_args=$(sed -n 's/^cmake_args="\(.*\)"$/\1/p' scripts/llama_wheel.sh)
[ -n "$version" ] && [ -n "$wheel_args" ] || { echo "llama_server.sh: no version or CMAKE_ARGS found" >&2; exit 1; }
cmake_args="$wheel_args -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF"
cache=${LLAMA_SERVER_CACHE:-$HOME/.cache/gpt2-run/llama-server}
bin=$cache/$version/llama-server
if [ -x "$bin" ] && [ "$(cat "$bin.cmake-args" 2>/dev/null)" = "$cmake_args" ]; then
    echo "$bin"
    exit 0
fi
sdist=$cache/llama_cpp_python-$version.tar.gz
if [ ! -f "$sdist" ]; then
    mkdir -p "$cache"
    ${PIP:-pip} download -q --no-binary :all: --no-deps -d "$cache" "llama-cpp-python==$version" >&2
fi
echo "Compiling llama-server (llama.cpp of llama-cpp-python $version, CPU: x86-64-v3); 5-15 minutes, once" >&2
# An interrupted build with the same flags goes on where it stopped; other flags start afresh.
work=$cache/$version/build
if [ "$(cat "$work/cmake-args" 2>/dev/null)" != "$cmake_args" ]; then
    rm -rf "$work"
    mkdir -p "$work"
    tar xzf "$sdist" -C "$work" --strip-components=1 "llama_cpp_python-$version/vendor/llama.cpp"
    # shellcheck disable=SC2086  # the flags are words
    cmake -S "$work/vendor/llama.cpp" -B "$work/out" -G Ninja $cmake_args >&2
    echo "$cmake_args" > "$work/cmake-args"
fi
cmake --build "$work/out" --target llama-server -j "${JOBS:-$(nproc)}" >&2
cp "$work/out/bin/llama-server" "$bin"
rm -rf "$work"
echo "$cmake_args" > "$bin.cmake-args"
echo "$bin"

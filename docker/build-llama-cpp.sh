#!/usr/bin/env bash
# llama.cpp for an image, the way the Makefile's venv target does it locally: llama-cpp-python has no
# Linux wheel on PyPI, so its sdist is compiled (a builder stage holds the compiler and cmake), and
# llama.cpp's HF->GGUF converter is taken from the same sdist, so converter and runtime always match.
#   build-llama-cpp.sh PYTHON CONSTRAINTS OUT
#     OUT/wheels/llama_cpp_python-*.whl    install it with `pip install -c constraints.txt OUT/wheels/*.whl`
#     OUT/llama.cpp/convert_hf_to_gguf.py  + conversion/ and gguf-py/: copy to where
#                                          ftlib.stages.quantize.converter_dir() looks
set -euo pipefail
python=${1:?usage: build-llama-cpp.sh PYTHON CONSTRAINTS OUT}
constraints=${2:?usage: build-llama-cpp.sh PYTHON CONSTRAINTS OUT}
out=${3:?usage: build-llama-cpp.sh PYTHON CONSTRAINTS OUT}
version=$(sed -n 's/^llama-cpp-python==//p' "$constraints")   # the lock's version, not a third copy of it
[ -n "$version" ] || { echo "no llama-cpp-python pin in $constraints" >&2; exit 1; }

"$python" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$out/sdist"
sdist="$out/sdist/llama_cpp_python-$version.tar.gz"
# GGML_NATIVE=OFF: the image runs on other machines than the one that built it, so no -march=native;
# ggml then targets AVX2/FMA/F16C, which every x86-64 GPU node has, and never AMX (see the Makefile).
CMAKE_ARGS="-DGGML_NATIVE=OFF" "$python" -m pip wheel --no-deps -c "$constraints" "$sdist" -w "$out/wheels"
mkdir -p "$out/llama.cpp"
src="llama_cpp_python-$version/vendor/llama.cpp"
tar -xzf "$sdist" -C "$out/llama.cpp" --strip-components=3 \
  "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py"

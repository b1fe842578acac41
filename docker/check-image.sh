#!/bin/sh
# The image's last build step: fail the build, not a pod, on what would stop a user's first GPU run.
set -eu
# 1. Triton (vLLM's kernels, torch.compile) builds a small C launcher against Python.h when an engine
#    starts, with gcc: the same compile here.
include=$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
dir=$(mktemp -d)
printf '#include <Python.h>\nint safealign_probe(void) { return Py_IsInitialized(); }\n' > "$dir/probe.c"
gcc "$dir/probe.c" -O3 -shared -fPIC -Wno-psabi -I"$include" -o "$dir/probe.so"
rm -rf "$dir"
# 2. Every stage imports: OpenRLHF, DeepSpeed and vLLM load without flash-attn (no GPU at build time: the
#    CPU patches apply here; tests/openrlhf/test_openrlhf_patches.py takes the GPU branch).
python -c "import vllm; from safealign.stages import load_builtin_stages; print('stages:', *sorted(load_builtin_stages()))"
# 3. The non-root user the charts run as.
test "$(id -un 1000)" = safealign
echo "safealign image ok"

#!/usr/bin/env bash
# The in-place path (fastbert.hf) under each supported transformers release besides the pinned newest
# one scripts/test.sh runs: for each release a venv of its own with torch 2.13.0 (CPU) and that
# transformers, and the transformers tests run on this checkout as a source tree (its fastbert/_C,
# built by scripts/test.sh for the same torch, is used).
#
# FASTBERT_HF_RELEASES  the releases (default: "5.0.0 5.17.0": the oldest supported and the lent GPU
#                       machine's); FASTBERT_HF_VENVS  where the venvs go (default /tmp/fastbert-hf)
. "$(dirname "$0")/venv_lib.sh"  # strict mode, cd to the repository root, fresh_venv
releases="${FASTBERT_HF_RELEASES:-5.0.0 5.17.0}"
base="${FASTBERT_HF_VENVS:-/tmp/fastbert-hf}"
triton_pin="$(grep -E '^triton' requirements-dev.txt | head -1)"
for release in $releases; do
  t0=$(date +%s)
  venv="$base/transformers-$release"
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import transformers, sys; \
sys.exit(transformers.__version__ != '$release')" 2>/dev/null; then
    fresh_venv "$venv" torch==2.13.0 "transformers==$release" "$triton_pin" tokenizers tqdm numpy pytest \
      accelerate
  fi
  echo "== transformers $release: venv ready ($(( $(date +%s) - t0 )) s)"
  "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_hf_patch.py tests/test_hf_train.py \
    tests/test_hf_inputs.py tests/test_hf_families.py tests/test_hf_modernbert.py tests/test_modernbert_model.py
  echo "== transformers $release: $(( $(date +%s) - t0 )) s"
done

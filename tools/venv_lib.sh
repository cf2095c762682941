# Sourced by the checks that build environments of their own (tools/hf_versions_check.sh,
# tools/plain_install_check.sh): strict mode, the repository root as working directory ($root), and
#   fresh_venv DIR PIP_ARGS...   a new venv at DIR (an old one removed) with PIP_ARGS installed (pip -q)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

fresh_venv() {
  local venv="$1"
  shift
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q "$@"
}

#!/usr/bin/env bash
# Refresh constraints.txt: resolve the project's dependencies (every extra) from the registries
# into a fresh virtual environment, run the test suite there, and write the exact versions that
# passed. CI and the README's commands install with `-c constraints.txt`, so every fresh machine
# gets what this script tested. torch is left out: install the build for your hardware first
# (CPU: torch==2.13.0, which CI uses).
#
#   bash tools/update_constraints.sh            # resolve, test, write constraints.txt
#   SKIP_TESTS=1 bash tools/update_constraints.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet torch==2.13.0
extras=$("$venv/bin/python" -c "import tomllib; print(','.join(tomllib.load(open('pyproject.toml','rb'))['project']['optional-dependencies']))")
"$venv/bin/python" -m pip install --quiet -e ".[$extras]"
if [ -z "${SKIP_TESTS:-}" ]; then
  "$venv/bin/python" -m pytest -q
fi
{
  echo "# Exact versions the test suite passed with (tools/update_constraints.sh, $(date -u +%Y-%m-%d), Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())'))."
  echo "# Use: pip install torch==2.13.0 && pip install -c constraints.txt -e \".[test]\""
  "$venv/bin/python" -m pip freeze --exclude-editable | grep -viE '^(torch|nvidia-[a-z0-9-]+|triton|pip|setuptools|wheel)==' | LC_ALL=C sort -f
} > constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)"

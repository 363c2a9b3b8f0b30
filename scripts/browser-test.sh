#!/usr/bin/env bash
# The dashboard in a real browser against a live two-terminal cluster (what CI runs).
#
# Starts two possync nodes on 127.0.0.1 ("Till A" and "Till B", static peers, no mDNS),
# fills them through the API (a category, products, stock, sales on both), provokes an
# open `manual` conflict on A (B's sync switched off, the same product's price edited on
# both, B switched back on), then runs tests/browser/dashboard.test.mjs: Debian's Chromium,
# driven by playwright-core, checks A's dashboard (B's card and its live counters while
# sales go on in the background, the conflict in the history with both versions side by
# side, resolving it with "Take remote", the API then saying resolvedBy = "dashboard") and
# saves docs/dashboard.png (1280x800) and docs/dashboard-small.png (800x480).
#
# Installs what is missing (chromium with apt-get when root, the npm packages with npm ci).
# Nothing leaves 127.0.0.1 except package-registry downloads. Exit code: 0 when every
# check passed.
#
#   scripts/browser-test.sh
#   SCREENSHOT_DIR=/tmp/shots scripts/browser-test.sh   # leave docs/*.png alone
#   CARGO_TARGET_DIR=/tmp/t scripts/browser-test.sh     # binary from /tmp/t/debug/possync
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STARTED=$(date +%s)

log() { printf '[browser-test %3ds] %s\n' "$(($(date +%s) - STARTED))" "$*"; }
die() { log "FAILED: $*" >&2; exit 1; }

# --- what the test needs -------------------------------------------------------------
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$CHROMIUM" ]; then
  [ "$(id -u)" = 0 ] || die "$CHROMIUM is missing; install it (apt-get install chromium) or set CHROMIUM"
  log "installing chromium"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
command -v node >/dev/null 2>&1 || die "node is missing (Node.js 20 is needed)"
command -v npm >/dev/null 2>&1 || die "npm is missing"
command -v curl >/dev/null 2>&1 || die "curl is missing"

wanted=$(node -p 'require("./tests/browser/package-lock.json").packages["node_modules/playwright-core"].version')
installed=$(node -p 'try { require("./tests/browser/node_modules/playwright-core/package.json").version } catch { "" }')
if [ "$wanted" != "$installed" ]; then
  log "npm ci (playwright-core $wanted)"
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi

log "cargo build -p possync"
cargo build --quiet -p possync
TARGET=${CARGO_TARGET_DIR:-target}
case $TARGET in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac
BIN=$TARGET/debug/possync
[ -x "$BIN" ] || die "no binary at $BIN"

# --- the cluster -----------------------------------------------------------------------
WORK=$(mktemp -d /tmp/possync-browser.XXXXXX)
PIDS=()
OK=0
cleanup() {
  local status=$?
  set +e
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$OK" != 1 ]; then
    for node in a b; do
      if [ -f "$WORK/$node.log" ]; then
        printf '\n----- log of node %s (last 80 lines) -----\n' "$node"
        tail -n 80 "$WORK/$node.log"
      fi
    done
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
trap '' PIPE # a reader gone (| head): writes fail and the clean-up still runs to its end

# Four distinct free ports on 127.0.0.1 (all bound at once, then released).
read -r PA QA PB QB < <(python3 -c '
import socket
s = [socket.socket() for _ in range(4)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])
for x in s: x.close()')
SECRET=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
A=http://127.0.0.1:$QA
B=http://127.0.0.1:$QB

init() { # dir name peer-port api-port
  "$BIN" init --data-dir "$1" --name "$2" --secret "$SECRET" --port "$3" --api-port "$4" >"$1.id" 2>"$1.init.log" \
    || { cat "$1.init.log"; die "possync init $2"; }
  # Listen for peers on loopback only (the default is 0.0.0.0).
  if grep -q '^peer_bind' "$1/possync.toml"; then
    sed -i 's/^peer_bind *=.*/peer_bind = "127.0.0.1"/' "$1/possync.toml"
  else
    printf 'peer_bind = "127.0.0.1"\n' >>"$1/possync.toml"
  fi
}
init "$WORK/a" "Till A" "$PA" "$QA"
init "$WORK/b" "Till B" "$PB" "$QB"
ID_A=$(tail -n 1 "$WORK/a.id")
ID_B=$(tail -n 1 "$WORK/b.id")
log "Till A $ID_A: peers :$PA, API $A"
log "Till B $ID_B: peers :$PB, API $B"

export POSSYNC_LOG=${POSSYNC_LOG:-possync=info,possync_node=info}
export NO_COLOR=1
"$BIN" run --data-dir "$WORK/a" --no-discovery --peer "127.0.0.1:$PB" >"$WORK/a.log" 2>&1 &
PIDS+=($!)
"$BIN" run --data-dir "$WORK/b" --no-discovery --peer "127.0.0.1:$PA" >"$WORK/b.log" 2>&1 &
PIDS+=($!)

# --- helpers -----------------------------------------------------------------------------
# call METHOD URL [JSON]: prints the answer; fails (with the answer) on an HTTP error.
call() {
  local out code
  out=$(curl -sS --max-time 10 --noproxy '*' -X "$1" "$2" -H 'content-type: application/json' \
    ${3:+--data "$3"} -w '\n%{http_code}') || die "$1 $2: curl failed"
  code=${out##*$'\n'}
  out=${out%$'\n'*}
  case $code in 2??) printf '%s' "$out" ;; *) die "$1 $2 ${3:-}: HTTP $code $out" ;; esac
}
# json EXPR: evaluates a Python expression on the JSON read from stdin (as `d`).
json() {
  python3 -c "
import json, sys
try:
    d = json.load(sys.stdin)
except ValueError:
    sys.exit(1)
v = ($1)
print('' if v is None else v)"
}
# until SECONDS WHAT COMMAND...: retries COMMAND every 0.25 s.
until_ok() {
  local deadline=$(($(date +%s) + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || die "timed out waiting for $what"
    sleep 0.25
  done
}
peer_online() { # API peer-id
  curl -sf --max-time 2 --noproxy '*' "$1/api/status" | json "any(p['id'] == '$2' and p['online'] for p in d['peers'])" | grep -qx True
}
peer_offline() {
  curl -sf --max-time 2 --noproxy '*' "$1/api/status" | json "any(p['id'] == '$2' and p['online'] for p in d['peers'])" | grep -qx False
}

until_ok 60 "both APIs to answer" sh -c "curl -sf --noproxy '*' $A/api/status && curl -sf --noproxy '*' $B/api/status"
until_ok 60 "A and B to connect" peer_online "$A" "$ID_B"
until_ok 30 "B to see A" peer_online "$B" "$ID_A"
log "A and B are connected"

# --- data, sales, and a conflict -------------------------------------------------------------
CAT=$(call POST "$A/api/categories" '{"name": "Drinks"}' | json "d['id']")
TEA=$(call POST "$A/api/products" "{\"sku\": \"TEA-1\", \"name\": \"Green tea\", \"price\": 1.50, \"categoryId\": \"$CAT\"}" | json "d['id']")
COFFEE=$(call POST "$A/api/products" "{\"sku\": \"COF-1\", \"name\": \"Espresso\", \"price\": 2.00, \"categoryId\": \"$CAT\"}" | json "d['id']")
call POST "$A/api/stock/adjust" "{\"productId\": \"$TEA\", \"quantity\": 500, \"type\": \"in\", \"reference\": \"delivery 1\"}" >/dev/null
call PUT "$A/api/settings/p2p_conflict_resolution" '{"value": "manual"}' >/dev/null
until_ok 30 "the products to reach B" sh -c "curl -sf --noproxy '*' $B/api/products/$COFFEE && curl -sf --noproxy '*' $B/api/products/$TEA"
sell() { call POST "$1/api/tickets" "{\"lines\": [{\"productId\": \"$TEA\", \"quantity\": 1}], \"payments\": [{\"method\": \"cash\", \"amount\": 1.50}]}" >/dev/null; }
for _ in 1 2 3; do sell "$A"; sell "$B"; done
log "catalogue on both, 6 sales made, A resolves conflicts manually"

call POST "$B/api/p2p/toggle" '{"enabled": false}' >/dev/null
until_ok 30 "A to see B offline" peer_offline "$A" "$ID_B"
call PATCH "$A/api/products/$COFFEE" '{"price": 2.20}' >/dev/null
sleep 0.1
call PATCH "$B/api/products/$COFFEE" '{"price": 2.40}' >/dev/null
sell "$B"
call POST "$B/api/p2p/toggle" '{"enabled": true}' >/dev/null
log "Espresso repriced on A (2.20) and on B (2.40) while B was off; B back on"
open_conflict() {
  curl -sf --max-time 2 --noproxy '*' "$A/api/conflicts?limit=50" \
    | json "next((c['id'] for c in d if c['entityId'] == '$COFFEE' and c['resolvedBy'] is None), None)"
}
CONFLICT=""
deadline=$(($(date +%s) + 60))
while [ -z "$CONFLICT" ]; do
  CONFLICT=$(open_conflict || true)
  [ -n "$CONFLICT" ] && break
  [ "$(date +%s)" -lt "$deadline" ] || die "no open conflict on A for the Espresso; A's conflicts: $(curl -s --noproxy '*' "$A/api/conflicts")"
  sleep 0.25
done
until_ok 30 "A and B to reconnect" peer_online "$A" "$ID_B"
log "open conflict $CONFLICT on A; running the browser test"

# --- a chain's head office, when a nats-server is there (the Stores section) -----------------
HQ_URL=""
if [ -n "${NATS_SERVER:-}" ] && [ -x "$NATS_SERVER" ]; then
  QH=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$BIN" demo --chain --duration 200 --api-port "$QH" >"$WORK/hq.log" 2>&1 &
  PIDS+=($!)
  HQ_URL=http://127.0.0.1:$QH
  three_stores() {
    curl -sf --max-time 2 --noproxy '*' "$HQ_URL/api/chain/stores" | json "len(d) >= 3 and all(s['tickets'] > 0 for s in d)" | grep -qx True
  }
  until_ok 90 "the chain demo's head office to hear from 3 stores" three_stores
  log "chain demo running; head office at $HQ_URL"
else
  log "no NATS_SERVER: the head office's Stores section is not checked"
fi

# --- the browser -----------------------------------------------------------------------------
SHOTS=${SCREENSHOT_DIR:-$ROOT/docs}
mkdir -p "$SHOTS"
status=0
HQ_URL=$HQ_URL DASHBOARD_URL=$A PEER_ID=$ID_B SELL_URLS="$A,$B" SELL_PRODUCT_ID=$TEA CONFLICT_ID=$CONFLICT CHECK_RECORD=1 \
  SCREENSHOT_DIR=$SHOTS CHROMIUM=$CHROMIUM timeout 240 node tests/browser/dashboard.test.mjs || status=$?
[ "$status" = 0 ] || die "the browser test failed (exit $status)"

# Keep the committed pictures small when the tools are there (Debian: pngquant, optipng).
for png in "$SHOTS/dashboard.png" "$SHOTS/dashboard-small.png"; do
  if command -v pngquant >/dev/null 2>&1; then
    pngquant --force --skip-if-larger --quality 70-95 --strip --output "$png" "$png" || true
  fi
  if command -v optipng >/dev/null 2>&1; then optipng -quiet -o2 "$png" || true; fi
  log "$(basename "$png"): $(($(stat -c %s "$png") / 1024)) KiB"
done
OK=1
log "passed in $(($(date +%s) - STARTED)) s"

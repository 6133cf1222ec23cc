#!/usr/bin/env bash
# Real, independent clients against a release build of corecast, over ws://
# and wss://, on each backend: Python `websockets`, Node `ws` and headless
# Chromium each round-trip text and binary through /echo; over wss://,
# OpenSSL's s_client asks to renegotiate and must be refused, and updates
# its TLS 1.3 keys, which must be followed. Then our
# JavaScript client (clients/js/corecast.mjs) in Node (a dropped connection
# recovered, a last value, a server restart) and in Chromium (a dropped
# connection recovered, a last value). Last, Chromium against
# --allowed-origin and --jwt-key with a token openssl signs. Installs what it
# needs (a pip venv, an npm package, Debian's chromium) and stops what it
# starts. Called by .ci/run; run it alone after `cargo build --release`.
#
#   tests/clients/run.sh            BACKENDS="epoll uring" by default
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
HERE=$ROOT/tests/clients
PORT=${CLIENTS_PORT:-19101}
PAGE_PORT=${CLIENTS_PAGE_PORT:-19102}
JS_PORT=${CLIENTS_JS_PORT:-19103}
WORK=$(mktemp -d)
SERVER=
PAGES=
BROWSER=
cleanup() {
  for pid in $SERVER $BROWSER $PAGES; do
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

# A throwaway self-signed certificate for localhost and 127.0.0.1.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -addext basicConstraints=critical,CA:FALSE \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null

python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q --disable-pip-version-check 'websockets>=13'
cp "$HERE/echo_client.mjs" "$HERE/js_client_test.mjs" "$ROOT/clients/js/corecast.mjs" "$WORK/"
# The pages Chromium opens, with the client module beside them.
mkdir -p "$WORK/pages"
cp "$HERE/echo_page.html" "$HERE/js_client_page.html" "$HERE/access_page.html" "$ROOT/clients/js/corecast.mjs" "$WORK/pages/"
(cd "$WORK" && npm install --silent --no-audit --no-fund --no-save ws@8 >/dev/null)
if ! command -v chromium >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
# The page Chromium opens, served over plain HTTP (a page may open wss://).
# Its request log carries the page's verdict (GET /verdict?PASS…).
python3 -m http.server "$PAGE_PORT" --bind 127.0.0.1 --directory "$WORK/pages" >/dev/null 2>"$WORK/pages.log" &
PAGES=$!

wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2
  return 1
}
wait_port "$PAGE_PORT"

# Opens PAGE in headless Chromium and waits (30 s at most) for its verdict.
chromium_page() {
  local page=$1 what=$2 verdict=
  : >"$WORK/pages.log"
  chromium --headless=new --no-sandbox --disable-gpu --ignore-certificate-errors \
    --user-data-dir="$WORK/chromium" "http://127.0.0.1:$PAGE_PORT/$page" >/dev/null 2>&1 &
  BROWSER=$!
  for _ in $(seq 300); do
    verdict=$(grep -ao 'GET /verdict?[^ ]*' "$WORK/pages.log" | head -1 | sed 's/.*verdict?//' || true)
    [ -n "$verdict" ] && break
    sleep 0.1
  done
  kill -9 "$BROWSER" 2>/dev/null || true
  wait "$BROWSER" 2>/dev/null || true
  BROWSER=
  verdict=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.unquote(sys.argv[1]))' "$verdict")
  echo "chromium $(chromium --version 2>/dev/null | awk '{print $2}'): $what: ${verdict:-no verdict in 30 s}"
  if [ "${verdict%% *}" != PASS ]; then
    echo "chromium did not pass: $what; server log:" >&2
    tail -20 "$WORK/server.log" >&2
    exit 1
  fi
}

for io in ${BACKENDS:-epoll uring}; do
  for scheme in ws wss; do
    flags=(serve --listen "127.0.0.1:$PORT" --io "$io")
    [ "$scheme" = wss ] && flags+=(--tls-cert "$WORK/cert.pem" --tls-key "$WORK/key.pem")
    ./target/release/corecast "${flags[@]}" >"$WORK/server.log" 2>&1 &
    SERVER=$!
    wait_port "$PORT"
    url="$scheme://127.0.0.1:$PORT/echo"
    echo "--- $io, $url"
    "$WORK/venv/bin/python" "$HERE/echo_client.py" "$url" "$WORK/cert.pem"
    node "$WORK/echo_client.mjs" "$url" "$WORK/cert.pem"
    chromium_page "echo_page.html?url=$url" "$url"
    http=http
    [ "$scheme" = wss ] && http=https
    chromium_page "js_client_page.html?url=$scheme://127.0.0.1:$PORT/ws&http=$http://127.0.0.1:$PORT" \
      "js client $scheme://127.0.0.1:$PORT/ws"
    if [ "$scheme" = wss ]; then
      # OpenSSL as a TLS 1.2 client asks to renegotiate ("R"): refused
      # with an alert and the connection closed.
      reneg=$( (sleep 0.5; printf 'R\n'; sleep 1.5) | timeout 10 openssl s_client -connect "127.0.0.1:$PORT" -tls1_2 2>&1 || true)
      if printf '%s' "$reneg" | grep -q "no renegotiation"; then
        echo "openssl s_client: $url: a TLS 1.2 renegotiation is refused (no_renegotiation), connection closed"
      else
        echo "openssl s_client: $url: renegotiation was not refused:" >&2
        printf '%s\n' "$reneg" | tail -5 >&2
        exit 1
      fi
      # OpenSSL as a TLS 1.3 client updates its keys asking for ours ("K"),
      # then without asking ("k"), a request after each: our record layer
      # (src/server/tls/record.rs) answers the first with one KeyUpdate of
      # its own and reads both requests under the new keys.
      ku=$( (sleep 0.5; printf 'K\n'; sleep 0.3; printf 'GET /healthz HTTP/1.1\nHost: x\n\n'; sleep 1
        printf 'k\n'; sleep 0.3; printf 'GET /healthz HTTP/1.1\nHost: x\n\n'; sleep 1) \
        | timeout 10 openssl s_client -connect "127.0.0.1:$PORT" -tls1_3 -crlf -msg 2>&1 || true)
      if [ "$(printf '%s\n' "$ku" | grep -c '^<<< TLS 1.3, Handshake \[length 0005\], KeyUpdate')" = 1 ] \
        && [ "$(printf '%s\n' "$ku" | grep -c '^HTTP/1.1 200 OK')" = 2 ]; then
        echo "openssl s_client: $url: TLS 1.3 key updates (asked for and not) are followed, one answered"
      else
        echo "openssl s_client: $url: TLS 1.3 key updates not handled:" >&2
        printf '%s\n' "$ku" | grep -E "KeyUpdate|HTTP/1.1|alert" >&2
        exit 1
      fi
    fi
    kill -TERM "$SERVER"
    wait "$SERVER"
    SERVER=
    # The JavaScript client in Node: it starts and restarts its own server.
    node "$WORK/js_client_test.mjs" ./target/release/corecast "$JS_PORT" "$io" "$scheme" \
      "$WORK/cert.pem" "$WORK/key.pem"
  done
done
# Origins and tokens in a browser: a token made by openssl (HS256, not by
# our code) in the query, the page's Origin checked against
# --allowed-origin, and a cross-site text/plain POST from the page.
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
head -c 48 /dev/urandom | openssl base64 -A | tr -d '=+/' >"$WORK/jwt.key"
jwt_header=$(printf '{"alg":"HS256","typ":"JWT"}' | b64url)
jwt_claims=$(printf '{"sub":"page","exp":%d,"corecast":{"subscribe":["t"],"publish":["t"]}}' \
  "$(($(date +%s) + 600))" | b64url)
jwt_sig=$(printf '%s.%s' "$jwt_header" "$jwt_claims" \
  | openssl dgst -sha256 -hmac "$(cat "$WORK/jwt.key")" -binary | b64url)
jwt="$jwt_header.$jwt_claims.$jwt_sig"
for io in ${BACKENDS:-epoll uring}; do
  for origin in "http://127.0.0.1:$PAGE_PORT" "https://elsewhere.example"; do
    ./target/release/corecast serve --listen "127.0.0.1:$PORT" --io "$io" \
      --jwt-key "HS256=$WORK/jwt.key" --allowed-origin "$origin" >"$WORK/server.log" 2>&1 &
    SERVER=$!
    wait_port "$PORT"
    expect=allowed
    [ "$origin" = "https://elsewhere.example" ] && expect=refused
    echo "--- $io, tokens and --allowed-origin $origin"
    chromium_page "access_page.html?ws=ws://127.0.0.1:$PORT&http=http://127.0.0.1:$PORT&token=$jwt&expect=$expect" \
      "access ($expect) with --allowed-origin $origin"
    kill -TERM "$SERVER"
    wait "$SERVER"
    SERVER=
  done
done
echo "real clients: all passed"

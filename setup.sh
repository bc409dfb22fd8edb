#!/usr/bin/env bash
# imsrc setup: creates .venv, installs imsrc (exact versions from constraints.txt), prepares the data directory,
# starts the embedded database and applies migrations.
#   ./setup.sh          set up
#   ./setup.sh serve    set up, then run the web page and API (extra arguments go to `imsrc serve`)
#   ./setup.sh test     also install the test tools, then run the test suite (extra arguments go to pytest)
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PY="$VENV/bin/python"
STAMP="$VENV/.imsrc-installed"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'setup.sh: error: %s\n' "$*" >&2; exit 1; }

find_python() {
    for candidate in "${PYTHON:-}" python3.11 python3.12 python3.13 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            echo "$candidate"; return 0
        fi
    done
    return 1
}

# $1: runtime (the service alone) or test (adds the test extra). The stamp remembers which level was installed
# from which pyproject.toml + constraints.txt, so an unchanged checkout never reinstalls, and a venv set up for the
# tests also serves.
install() {
    level="$1"
    if [ ! -x "$PY" ]; then
        base=$(find_python) || die "Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)"
        say "creating $VENV with $base"
        "$base" -m venv "$VENV" || die "could not create $VENV (on Debian/Ubuntu: apt install python3-venv)"
    fi
    sum=$(cat pyproject.toml constraints.txt | cksum)
    have=$(cat "$STAMP" 2>/dev/null || true)
    if [ "$have" = "test $sum" ] || [ "$have" = "$level $sum" ]; then return 0; fi
    target='.'
    [ "$level" = test ] && target='.[test]'
    say "installing imsrc ($level) and its dependencies into $VENV (torch is large; the first time takes a while)"
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip install --quiet -c constraints.txt -e "$target"
    echo "$level $sum" > "$STAMP"
}

prepare() {
    mkdir -p "${IMSRC_DATA_DIR:-./data}"
    "$VENV/bin/imsrc" db start
    "$VENV/bin/imsrc" migrate
}

browser_deps() {
    # The browser tests drive Debian's Chromium through Playwright; install it when we can.
    if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then return 0; fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing chromium for the browser tests"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ||
            say "could not install chromium; browser tests will be skipped"
    else
        say "chromium not found and cannot be installed here; browser tests will be skipped"
    fi
}

cmd="${1:-setup}"
[ $# -gt 0 ] && shift
case "$cmd" in
    setup)
        install runtime; prepare
        say "ready: ./setup.sh serve  (or $VENV/bin/imsrc --help)" ;;
    serve)
        install runtime; prepare
        exec "$VENV/bin/imsrc" serve "$@" ;;
    test)
        install test; browser_deps
        exec "$PY" -m pytest "$@" ;;
    *)
        die "unknown command '$cmd' (use: ./setup.sh [serve|test])" ;;
esac

# Shared by the HTTP benchmarks (sourced, not run): installs wrk if missing,
# builds a release flywheel, starts it on 127.0.0.1 with a fresh embedded store
# in a temp dir (stopped on exit; define `extra_cleanup` for more), and sets
#   base  the server's URL      sk  its secret key      tmp  the temp dir
# plus helpers: to_us (wrk latency → µs), median, note_busy (sets busy=yes when
# builds or tests run beside the measurement).
# Expects: root, bin.

if ! command -v wrk >/dev/null 2>&1; then
    echo "wrk is not installed: installing it (Debian package)" >&2
    if [ "$(id -u)" -eq 0 ]; then
        apt-get install -y wrk >/dev/null || { apt-get update && apt-get install -y wrk >/dev/null; }
    else
        sudo apt-get install -y wrk >/dev/null || { sudo apt-get update && sudo apt-get install -y wrk >/dev/null; }
    fi
fi

echo "building flywheel (release)…" >&2
(cd "$root" && cargo build --release -p flywheel --quiet)

tmp="$(mktemp -d -t flywheel-bench.XXXXXX)"
server_pid=""
cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$server_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    # A script that started more processes cleans them up in its own hook.
    if declare -F extra_cleanup >/dev/null; then extra_cleanup; fi
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A clean environment for the server: no FLYWHEEL_* overrides, no ./flywheel.toml
# (cwd is the temp dir), and warn-level logs so logging is not what we measure.
unset_flywheel=()
for var in $(compgen -e | grep '^FLYWHEEL_' || true); do
    unset_flywheel+=(-u "$var")
done
(
    cd "$tmp"
    exec env "${unset_flywheel[@]}" RUST_LOG=warn \
        "$bin" serve --data-dir "$tmp/data" --bind 127.0.0.1:0
) >"$tmp/server.out" 2>"$tmp/server.err" &
server_pid=$!

base="" sk=""
for _ in $(seq 300); do
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "the server exited during start-up:" >&2
        cat "$tmp/server.out" "$tmp/server.err" >&2
        exit 1
    fi
    base="$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$tmp/server.out" | head -n1 || true)"
    sk="$(sed -n 's/^ *secret key: *\(sk_[0-9A-Za-z]*\).*$/\1/p' "$tmp/server.out" | head -n1)"
    [ -n "$base" ] && [ -n "$sk" ] && break
    sleep 0.1
done
if [ -z "$base" ] || [ -z "$sk" ]; then
    echo "did not see the listening address and secret key within 30 s:" >&2
    cat "$tmp/server.out" "$tmp/server.err" >&2
    exit 1
fi
case "$base" in
    http://127.0.0.1:*) ;;
    *) echo "refusing to target $base" >&2; exit 1 ;;
esac

# Latency text from wrk ("812.00us", "1.20ms", "2.00s") in microseconds.
to_us() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) f = 1; else if (v ~ /ms$/) f = 1000; else if (v ~ /s$/) f = 1000000; else f = 1
        printf "%.0f", n * f
    }'
}

median() { tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# Other builds or tests on this 2-core machine skew a run: note any we see.
busy=""
note_busy() {
    if pgrep -x rustc >/dev/null || pgrep -x cargo >/dev/null || pgrep -x cargo-nextest >/dev/null; then
        busy=yes
    fi
}


#!/usr/bin/env bash
# Resident memory of an idle daemon with N clients (authorization code clients, not yet
# authorized: no network). Prints the median of RUNS runs, in KiB, for each N.
#   bash benches/idle-rss.sh [N...]      (default: 1 100 1000)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
BIN=target/release/oauth2mci
RUNS=${RUNS:-5}
[ $# -gt 0 ] || set -- 1 100 1000
for n in "$@"; do
    samples=()
    for run in $(seq "$RUNS"); do
        dir=$(mktemp -d)
        {
            printf 'paths: {state: state, runtime: run}\nclients:\n'
            for i in $(seq "$n"); do
                printf '  c%d:\n    provider: {authorize_url: "https://auth.example/a", token_url: "https://auth.example/t"}\n    client_id: app%d\n    sinks: [{path: tokens/c%d}]\n' "$i" "$i" "$i"
            done
        } > "$dir/config.yaml"
        "$BIN" daemon --config "$dir/config.yaml" 2>/dev/null &
        pid=$!
        for _ in $(seq 100); do [ -S "$dir/run/oauth2mci.sock" ] && break; sleep 0.05; done
        OAUTH2MCI_SOCKET="$dir/run/oauth2mci.sock" "$BIN" status >/dev/null
        sleep 2
        samples+=("$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")")
        kill -TERM "$pid"; wait "$pid" || true
        rm -rf "$dir"
    done
    median=$(printf '%s\n' "${samples[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    echo "clients=$n idle_rss_kib_median=$median samples=${samples[*]}"
done

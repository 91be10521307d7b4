#!/usr/bin/env bash
# The Ray test of scripts/ray_eval.py (scripts/test.sh runs it after `cargo test --release`):
# a local 3-node Ray cluster on loopback (head with no CPUs, 2 one-CPU workers), then the bars in
# scripts/_ray_test.py: sharded == single-process, a killed worker is retried, corrupt shards are refused.
# Bounded by a hard time limit (RAY_TEST_LIMIT seconds, default 600); always takes its cluster down
# and fails if any process of it is left. TIME_ONNX_BIN overrides the binary under test;
# RAY_TEST_KEEP=1 keeps the temporary folder (reports, Ray logs) for a look afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${_RAY_TEST_BOUNDED:-}" ]; then  # re-run under `timeout` so that nothing here can hang
    export _RAY_TEST_BOUNDED=1
    exec timeout -k 20 "${RAY_TEST_LIMIT:-600}" "$0" "$@"
fi
start=$SECONDS
BIN=$(realpath "${TIME_ONNX_BIN:-target/release/time-onnx}")
[ -x "$BIN" ] || { echo "test_ray.sh: no binary $BIN (run cargo build --release first)" >&2; exit 1; }

TMP=$(mktemp -d /tmp/ray-test.XXXXXX)  # short: Ray's unix socket paths live under it
export RAY_USAGE_STATS_ENABLED=0
# No thread pinning: Ray gives each worker OMP_NUM_THREADS=<its CPUs> (1 here) while the
# single-process run below has the machine's default, and bar 1 holds anyway (the edit's LAPACK
# runs on one OpenBLAS thread in every process, see edit::solve).
# How this cluster's processes are found, stopped by pid and proved gone, without touching any
# other Ray on this machine: each `ray start` runs in a session of its own (setsid), which every
# process it leads to inherits (GCS, raylets, agents, workers, their time-onnx children), and with
# MARK in its environment (found on the processes that do not retitle themselves: Ray's
# setproctitle can overwrite the environment that /proc shows).
MARK="TIME_ONNX_RAY_TEST=$TMP"
sessions=" "
own_sid=$(sed 's/.*) //' /proc/$$/stat | cut -d' ' -f4)
cluster_pids() {  # running (not zombie) processes of this cluster
    {
        grep -lzx -- "$MARK" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3
        cat /proc/[0-9]*/stat 2>/dev/null |
            awk -v s="$sessions" '{ p = $1; sub(/^.*\) /, ""); if ($1 != "Z" && index(s, " " $4 " ")) print p }'
    } | sort -u
}
note_sessions() {  # the sessions of the marked processes: each `ray start`'s
    local p sid
    for p in $(grep -lzx -- "$MARK" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3); do
        sid=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | cut -d' ' -f4) || continue
        [ -n "$sid" ] && [ "$sid" != "$own_sid" ] && [ "${sessions/ $sid /}" = "$sessions" ] && sessions="$sessions$sid "
    done
    return 0
}
cleanup() {
    local rc=$? pids left i t0=$SECONDS
    trap - EXIT TERM INT
    note_sessions
    for sig in TERM KILL; do  # TERM lets Ray shut down; KILL whatever is still there after 2 s
        pids=$(cluster_pids)
        [ -z "$pids" ] && break
        kill -s "$sig" $pids 2>/dev/null || true
        for i in $(seq 20); do [ -z "$(cluster_pids)" ] && break; sleep 0.1; done
    done
    left=$(cluster_pids)
    if [ -n "$left" ]; then
        echo "FAIL  cleanup: Ray processes of this cluster remain:" >&2
        ps -o pid,stat,args -p "$(echo $left | tr ' ' ,)" >&2 || true
        rc=1
    else
        echo "PASS  cleanup: no process of this Ray cluster remains (stopped in $((SECONDS - t0)) s)"
    fi
    if [ -n "${RAY_TEST_KEEP:-}" ]; then echo "kept $TMP"; else rm -rf "$TMP"; fi
    echo "test_ray.sh: $([ "$rc" = 0 ] && echo PASS || echo "FAIL (exit $rc)") in $((SECONDS - start)) s"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 124' TERM INT  # `timeout` sends TERM: still clean up

# The venv: rebuilt only when scripts/requirements-ray.txt changes (its sha256 is stamped inside).
VENV=third_party/venv-ray
REQS=scripts/requirements-ray.txt
want=$(sha256sum "$REQS" | cut -d' ' -f1)
if [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
    echo "== (re)creating $VENV from $REQS"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --disable-pip-version-check -q -r "$REQS"
    echo "$want" >"$VENV/.requirements.sha256"
fi

PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
node=(--node-ip-address=127.0.0.1 --object-store-memory=100000000 --disable-usage-stats)
# Ray itself kills a dead worker's process group; off here, so that bar 2 proves that
# PR_SET_PDEATHSIG alone takes a killed worker's time-onnx down (as on clusters without it).
# (The own session also keeps `timeout`'s signal to its process group off the cluster: cleanup stops it.)
ray_start() {
    setsid -w env "$MARK" RAY_process_group_cleanup_enabled=0 "$VENV/bin/ray" start "$@" "${node[@]}" \
        >>"$TMP/cluster.log" 2>&1 || { cat "$TMP/cluster.log" >&2; echo "test_ray.sh: ray start $* failed" >&2; exit 1; }
    note_sessions
}
echo "== Ray cluster on 127.0.0.1:$PORT (head: 0 CPUs; 2 workers: 1 CPU each)"
# A temp dir per node, as on separate machines (one shared would have each node's log monitor
# forward every worker's output again).
ray_start --head --port="$PORT" --num-cpus=0 --include-dashboard=false --temp-dir="$TMP/head"
ray_start --address="127.0.0.1:$PORT" --num-cpus=1 --temp-dir="$TMP/w1"
ray_start --address="127.0.0.1:$PORT" --num-cpus=1 --temp-dir="$TMP/w2"
echo "   up after $((SECONDS - start)) s"

"$VENV/bin/python" scripts/_ray_test.py --address "127.0.0.1:$PORT" --binary "$BIN" --tmp "$TMP"

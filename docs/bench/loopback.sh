#!/usr/bin/env bash
# Loopback benchmark: put and get of one large file with qxfer and with scp to a
# private local sshd, in the same run, printing medians, ratios and peak RSS.
#
#   docs/bench/loopback.sh            # 1 GiB, 3 runs of each
#   SIZE_MIB=256 RUNS=5 docs/bench/loopback.sh
#
# Needs root only to install openssh-server when it is missing. The sshd runs
# on 127.0.0.1:${SSH_PORT:-2222} with its own keys and config in a temp dir;
# nothing in ~/.ssh is touched.
set -euo pipefail

RUNS=${RUNS:-3}
SIZE_MIB=${SIZE_MIB:-1024}
SSH_PORT=${SSH_PORT:-2222}
repo=$(cd "$(dirname "$0")/../.." && pwd)

if ! command -v /usr/sbin/sshd >/dev/null || ! command -v /usr/bin/time >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server time >/dev/null
fi
cargo build --release --quiet --manifest-path "$repo/Cargo.toml"
QX=$repo/target/release/qxfer

work=$(mktemp -d /tmp/qxfer-bench.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work"/{src,root,down,scp-dst,scp-down,cfg,certs}

# A private sshd: own host key, own authorized_keys, loopback only.
. "$repo/docs/bench/sshd.sh"
start_sshd "$work" 127.0.0.1 "$SSH_PORT"
SSH_OPTS=(-P "$SSH_PORT" -i "$work/userkey" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes)

echo "making a ${SIZE_MIB} MiB random file..." >&2
head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom > "$work/src/big.bin"

# Server and client share a private config dir: the server admits that
# user's client identity, and nothing touches the real ~/.config.
export QXFER_CONFIG_DIR=$work/cfg
"$QX" serve --listen 127.0.0.1:0 --root "$work/root" --certs "$work/certs" > "$work/serve.out" 2>/dev/null &
server_pid=$!
pids+=($server_pid)
for _ in $(seq 50); do grep -q '^listening' "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
addr=$(sed -n 's/^listening on udp //p' "$work/serve.out")
export QXFER_SERVER=$addr
# Wait for sshd to accept.
for _ in $(seq 50); do scp "${SSH_OPTS[@]}" -q "$work/authorized_keys" "root@127.0.0.1:$work/scp-dst/probe" 2>/dev/null && break; sleep 0.1; done
rm -f "$work/scp-dst/probe"

# timed NAME CMD...: runs CMD after a sync (so earlier writeback does not
# bleed in), appends "seconds maxrss_kib" to $work/NAME.
timed() {
    local name=$1; shift
    sync
    /usr/bin/time -f "%e %M" -o "$work/t" "$@" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; exit 1; }
    cat "$work/t" >> "$work/$name"
}

for i in $(seq "$RUNS"); do
    echo "run $i/$RUNS" >&2
    timed qxfer-put "$QX" -q put "$work/src/big.bin"
    timed qxfer-get "$QX" -q get big.bin -o "$work/down"
    cmp -s "$work/src/big.bin" "$work/down/big.bin" || { echo "qxfer get: content differs" >&2; exit 1; }
    rm -f "$work/root/big.bin" "$work/down/big.bin"
    timed scp-put scp "${SSH_OPTS[@]}" -q "$work/src/big.bin" "root@127.0.0.1:$work/scp-dst/big.bin"
    timed scp-put-sync sh -c "scp ${SSH_OPTS[*]} -q '$work/src/big.bin' 'root@127.0.0.1:$work/scp-dst/big2.bin' && sync"
    cp --reflink=auto "$work/src/big.bin" "$work/scp-dst/get.bin" 2>/dev/null || cp "$work/src/big.bin" "$work/scp-dst/get.bin"
    timed scp-get scp "${SSH_OPTS[@]}" -q "root@127.0.0.1:$work/scp-dst/get.bin" "$work/scp-down/big.bin"
    rm -f "$work"/scp-dst/* "$work"/scp-down/*
done
server_hwm=$(awk '/VmHWM/ {print $2}' "/proc/$server_pid/status")

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
med_t() { cut -d' ' -f1 "$work/$1" | median; }
max_rss() { cut -d' ' -f2 "$work/$1" | sort -n | tail -1; }

printf '\n%s MiB file, %s runs, loopback, medians (%s)\n\n' "$SIZE_MIB" "$RUNS" "$(date -u +%F)"
printf '| %-24s | %9s | %9s | %14s |\n' "transfer" "seconds" "MB/s" "peak RSS (MiB)"
printf '|%s|%s|%s|%s|\n' "--------------------------" "-----------" "-----------" "----------------"
for n in qxfer-put qxfer-get scp-put scp-put-sync scp-get; do
    s=$(med_t $n)
    printf '| %-24s | %9.2f | %9.1f | %14.1f |\n' "$n" "$s" "$(echo "$SIZE_MIB * 1.048576 / $s" | bc -l)" "$(echo "$(max_rss $n) / 1024" | bc -l)"
done
printf '| %-24s | %9s | %9s | %14.1f |\n' "qxfer server (all runs)" "" "" "$(echo "$server_hwm / 1024" | bc -l)"
printf '\nratios (qxfer time / scp time, below 1 means qxfer is faster):\n'
printf '  put: %.2f (vs scp+sync: %.2f)   get: %.2f\n' \
    "$(echo "$(med_t qxfer-put) / $(med_t scp-put)" | bc -l)" \
    "$(echo "$(med_t qxfer-put) / $(med_t scp-put-sync)" | bc -l)" \
    "$(echo "$(med_t qxfer-get) / $(med_t scp-get)" | bc -l)"

# Hashing next to transferring: the same file read once plainly and once
# through BLAKE3 on one thread, as qxfer's disk thread does during put/get.
printf '\nhashing the same file (cargo run --release --example hashbench):\n\n'
(cd "$repo" && cargo run -q --release --example hashbench -- "$work/src/big.bin" "$RUNS")
printf 'qxfer put %.2f s and get %.2f s include hashing on both sides.\n' "$(med_t qxfer-put)" "$(med_t qxfer-get)"

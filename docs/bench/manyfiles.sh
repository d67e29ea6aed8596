#!/usr/bin/env bash
# Many small files over an emulated wide-area link: `qxfer put -r` against
# `rsync -a` and `scp -r` (both over ssh) in the same run, printing medians
# and ratios. Per-file round trips, not bandwidth, decide this case.
#
#   docs/bench/manyfiles.sh                 # 2,000 files of 4 KiB in 50 dirs, 50 ms RTT
#   FILES=500 RTT=100 RUNS=3 SCP_RUNS=1 docs/bench/manyfiles.sh
#
# Needs root (network namespaces) and ../shared/tools/linkem. It installs
# openssh-server, rsync and ping when missing. The sshd and the qxfer server
# run in the server namespace with their own keys and config in a temp dir.
set -euo pipefail

FILES=${FILES:-2000}
DIRS=${DIRS:-50}
RTT=${RTT:-50}
RATE=${RATE:-200}
RUNS=${RUNS:-3}
SCP_RUNS=${SCP_RUNS:-1}
repo=$(cd "$(dirname "$0")/../.." && pwd)
linkem=${LINKEM:-$repo/../shared/tools/linkem}

need=()
command -v /usr/sbin/sshd >/dev/null || need+=(openssh-server)
command -v rsync >/dev/null || need+=(rsync)
command -v ping >/dev/null || need+=(iputils-ping)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --quiet --manifest-path "$repo/Cargo.toml"
QX=$repo/target/release/qxfer

work=$(mktemp -d /tmp/qxfer-many.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    "$linkem" down >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

"$linkem" up --rtt "$RTT" --rate "$RATE" >/dev/null
S="ip netns exec qxs"
C="ip netns exec qxc"

# The tree: FILES files of 4 KiB spread over DIRS directories.
mkdir -p "$work/src/tree" "$work/cfg" "$work/certs"
for d in $(seq 1 "$DIRS"); do mkdir -p "$work/src/tree/d$d"; done
for i in $(seq 1 "$FILES"); do
    head -c 4096 /dev/urandom > "$work/src/tree/d$(( (i % DIRS) + 1 ))/f$i"
done

# sshd on the server side of the link.
. "$repo/docs/bench/sshd.sh"
start_sshd "$work" 10.99.0.2 22 ip netns exec qxs
SSH="ssh -i $work/userkey -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes"

# qxfer server on the same side; client and server share a config dir, so
# the server admits the client identity as it would for one user.
export QXFER_CONFIG_DIR=$work/cfg
$S "$QX" serve --listen 10.99.0.2:65432 --root "$work/root" --certs "$work/certs" > "$work/serve.out" 2>/dev/null &
pids+=($!)
for _ in $(seq 50); do grep -q '^listening' "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
for _ in $(seq 50); do $C $SSH root@10.99.0.2 true 2>/dev/null && break; sleep 0.2; done

timed() {
    local name=$1; shift
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; exit 1; }
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc -l >> "$work/$name"
}

for i in $(seq "$RUNS"); do
    echo "run $i/$RUNS" >&2
    rm -rf "$work/root/tree" "$work/rsync-dst"
    timed qxfer $C "$QX" -q put -r "$work/src/tree" --server 10.99.0.2:65432
    [ "$(find "$work/root/tree" -type f | wc -l)" -eq "$FILES" ] || { echo "qxfer: files missing" >&2; exit 1; }
    timed rsync $C rsync -a -e "$SSH" "$work/src/tree/" "root@10.99.0.2:$work/rsync-dst/"
done
for i in $(seq "$SCP_RUNS"); do
    echo "scp run $i/$SCP_RUNS (slow: round trips per file)" >&2
    rm -rf "$work/scp-dst"
    timed scp $C scp -r -q -i "$work/userkey" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes "$work/src/tree" "root@10.99.0.2:$work/scp-dst"
done

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
med() { median < "$work/$1"; }
printf '\n%s files of 4 KiB in %s directories, %s ms RTT, %s Mbit/s, medians (%s)\n\n' "$FILES" "$DIRS" "$RTT" "$RATE" "$(date -u +%F)"
printf '| %-22s | %5s | %9s | %9s |\n' "tool" "runs" "seconds" "files/s"
printf '|%s|%s|%s|%s|\n' "------------------------" "-------" "-----------" "-----------"
for n in qxfer rsync scp; do
    [ -s "$work/$n" ] || continue
    s=$(med $n)
    printf '| %-22s | %5s | %9.2f | %9.0f |\n' "$n" "$(wc -l < "$work/$n")" "$s" "$(echo "$FILES / $s" | bc -l)"
done
printf '\nratio qxfer time / rsync time: %.2f\n' "$(echo "$(med qxfer) / $(med rsync)" | bc -l)"
if [ -s "$work/scp" ]; then
    printf 'ratio qxfer time / scp time: %.3f\n' "$(echo "$(med qxfer) / $(med scp)" | bc -l)"
fi

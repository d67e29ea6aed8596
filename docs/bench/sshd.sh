# Sourced by the benchmark scripts: a private sshd for the scp/rsync baselines.
#
#   start_sshd WORK ADDR PORT [PREFIX...]
#
# writes a host key, a user key, authorized_keys and sshd_config into WORK
# (nothing in ~/.ssh is touched), starts sshd on ADDR:PORT (PREFIX, e.g.
# `ip netns exec qxs`, runs it elsewhere) and appends its pid to the
# caller's `pids` array. The user key is WORK/userkey.
start_sshd() {
    local work=$1 addr=$2 port=$3
    shift 3
    ssh-keygen -q -t ed25519 -N '' -f "$work/hostkey"
    ssh-keygen -q -t ed25519 -N '' -f "$work/userkey"
    cp "$work/userkey.pub" "$work/authorized_keys"
    chmod 600 "$work/authorized_keys"
    mkdir -p /run/sshd
    cat > "$work/sshd_config" <<CFG
Port $port
ListenAddress $addr
HostKey $work/hostkey
AuthorizedKeysFile $work/authorized_keys
PasswordAuthentication no
PermitRootLogin prohibit-password
StrictModes no
PidFile $work/sshd.pid
UsePAM no
Subsystem sftp /usr/lib/openssh/sftp-server
CFG
    "$@" /usr/sbin/sshd -D -f "$work/sshd_config" &
    pids+=($!)
}

#!/usr/bin/env bash
# Launch mor_megatron.pretrain with torchrun (c10d rendezvous) on one node or on each of N nodes.
# Run the same command on every node; only --node-rank differs. See `launch/torchrun.sh -h`.
# shellcheck disable=SC2015  # `check && check || die` is meant: die when either check fails
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: launch/torchrun.sh [options] -- <arguments for mor_megatron.pretrain>

  launch/torchrun.sh -- --config configs/tiny.yaml                       # this node, all GPUs (or 1 CPU process)
  launch/torchrun.sh --nnodes 2 --node-rank 0 -- --config C.yaml          # on node 0 (hosts the rendezvous)
  launch/torchrun.sh --nnodes 2 --node-rank 1 --master-addr 10.0.0.5 -- --config C.yaml   # on node 1

Options (each falls back to the environment variable shown, then to the default):
  --nnodes N            NNODES                       number of nodes [1]
  --nproc-per-node G    NPROC_PER_NODE, GPUS_PER_NODE processes per node [GPUs seen by nvidia-smi -L
                                                     (limited by CUDA_VISIBLE_DEVICES), or 1 on CPU]
  --node-rank R         NODE_RANK                    this node's rank, 0..N-1 [0]; rank 0 hosts the rendezvous
  --master-addr A       MASTER_ADDR                  rendezvous address = address of node rank 0
                                                     [1 node: 127.0.0.1; N nodes on rank 0: this node's address]
  --iface NAME          MOR_IFACE                    network interface whose address (IPv4, else global IPv6,
                                                     `ip -o addr show dev NAME`) is this node's address [the
                                                     first name in GLOO_SOCKET_IFNAME, else NCCL_SOCKET_IFNAME]
  --master-port P       MASTER_PORT                  rendezvous port [29500]
  --rdzv-id ID          RDZV_ID                      job id shared by all nodes [$SLURM_JOB_ID, else mor]
  --local-addr A        LOCAL_ADDR                   address this node advertises to the others
                                                     [127.0.0.1 when the rendezvous is on loopback, else this
                                                     node's address]
  --max-restarts K      MAX_RESTARTS                 in-job restarts: a failed worker (crash, SIGKILL) makes torchrun
                                                     restart the node's worker group up to K times; the new workers
                                                     resume from the newest complete checkpoint [0]
  --dry-run             DRY_RUN=1                    print the command instead of running it
  -h, --help                                         this text

Other environment:
  PYTHON        interpreter [the active venv's python, else python3]
  MOR_ENTRY     python module torchrun runs [mor_megatron.pretrain]
  DS_ACCELERATOR  set to cpu when no GPU is found (DeepSpeed otherwise looks for CUDA)
  TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds workers get after SIGTERM (checkpoint) before SIGKILL [60]
  TORCH_DISABLE_SHARE_RDZV_TCP_STORE  1: each (re)started worker group gets a fresh store, so a
                                  --max-restarts restart cannot hang on the dead group's keys [1]
  MOR_DEVICE, MOR_DIST_BACKEND    compute device / process-group backend (mor_megatron/device.py)
                                  [cuda:LOCAL_RANK and nccl on GPUs, cpu and gloo otherwise]
  On GPU nodes these default when unset: TORCH_NCCL_ASYNC_ERROR_HANDLING=1, NCCL_IB_TIMEOUT=22,
  NCCL_IB_RETRY_CNT=7, NCCL_DEBUG=WARN, CUDA_DEVICE_MAX_CONNECTIONS=1.

This node's address: that of --iface when an interface is named, else this node's own address
(first of `hostname -I`, else `hostname --ip-address`); never 0.0.0.0/::. Name the interface when
that first address is not on the network the nodes share (a container bridge, a management LAN).
With several nodes and GLOO_SOCKET_IFNAME unset, GLOO_SOCKET_IFNAME is exported as the interface
that holds the advertised address: gloo would otherwise bind to what the host name resolves to
(often loopback), and torch would advertise that name, which other hosts cannot reach.

Security: the rendezvous endpoint is never 0.0.0.0/::; it is the address you name or this node's
own address. torch's TCP store still listens on the port on all interfaces of node rank 0 (a torch
limitation), so keep MASTER_PORT firewalled to the cluster network.
EOF
}

die() { echo "torchrun.sh: error: $*" >&2; exit 2; }

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

# Settings: flag > environment > default (defaults that need probing are filled in below).
NNODES_V="${NNODES:-1}"
NPROC_V="${NPROC_PER_NODE:-${GPUS_PER_NODE:-}}"
NODE_RANK_V="${NODE_RANK:-0}"
MASTER_ADDR_V="${MASTER_ADDR:-}"
MASTER_PORT_V="${MASTER_PORT:-29500}"
RDZV_ID_V="${RDZV_ID:-${SLURM_JOB_ID:-mor}}"
LOCAL_ADDR_V="${LOCAL_ADDR:-}"
IFACE_V="${MOR_IFACE:-}"
MAX_RESTARTS_V="${MAX_RESTARTS:-0}"
DRY="${DRY_RUN:-0}"
ENTRY="${MOR_ENTRY:-mor_megatron.pretrain}"

# Options before `--`; everything after it goes to the trainer untouched. Accepts `--opt V` and `--opt=V`.
take() {  # the option's value, after `=` or as the next argument; sets val and shift_n
    if [ "$has_eq" = 1 ]; then shift_n=1; return; fi
    [ $# -ge 2 ] || die "$opt needs a value"
    val="$2"; shift_n=2
}
while [ $# -gt 0 ]; do
    opt="$1"; val=""; has_eq=0
    case "$opt" in --*=*) val="${opt#*=}"; opt="${opt%%=*}"; has_eq=1 ;; esac
    case "$opt" in
        -h|--help) usage; exit 0 ;;
        --dry-run) [ "$has_eq" = 0 ] || die "--dry-run takes no value"; DRY=1; shift ;;
        --) shift; break ;;
        --nnodes|--nproc-per-node|--node-rank|--master-addr|--master-port|--rdzv-id|--local-addr|--iface|--max-restarts)
            take "$@"; shift "$shift_n"
            case "$opt" in
                --nnodes) NNODES_V="$val" ;;
                --nproc-per-node) NPROC_V="$val" ;;
                --node-rank) NODE_RANK_V="$val" ;;
                --master-addr) MASTER_ADDR_V="$val" ;;
                --master-port) MASTER_PORT_V="$val" ;;
                --rdzv-id) RDZV_ID_V="$val" ;;
                --local-addr) LOCAL_ADDR_V="$val" ;;
                --iface) IFACE_V="$val" ;;
                --max-restarts) MAX_RESTARTS_V="$val" ;;
            esac ;;
        *) die "unknown option '$1' (launcher options first, then -- and the trainer's arguments; see -h)" ;;
    esac
done

# Count the GPUs this node may use: nvidia-smi -L, narrowed by CUDA_VISIBLE_DEVICES when that is set.
gpu_count() {
    local n=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    fi
    if [ "$n" -gt 0 ] && [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
        case "$CUDA_VISIBLE_DEVICES" in
            ""|-1|NoDevFiles) n=0 ;;
            *) n=$(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES") ;;
        esac
    fi
    echo "$n"
}

is_uint "$NNODES_V" && [ "$NNODES_V" -ge 1 ] || die "nnodes must be an integer >= 1, got '$NNODES_V'"
is_uint "$NODE_RANK_V" || die "node rank must be an integer >= 0, got '$NODE_RANK_V'"
[ "$NODE_RANK_V" -lt "$NNODES_V" ] || die "node rank $NODE_RANK_V is out of range for $NNODES_V node(s) (0..$((NNODES_V - 1)))"
is_uint "$MASTER_PORT_V" && [ "$MASTER_PORT_V" -ge 1 ] && [ "$MASTER_PORT_V" -le 65535 ] \
    || die "master port must be an integer in 1..65535, got '$MASTER_PORT_V'"
is_uint "$MAX_RESTARTS_V" || die "max restarts must be an integer >= 0, got '$MAX_RESTARTS_V'"
[[ "$RDZV_ID_V" =~ ^[A-Za-z0-9_.-]+$ ]] || die "rendezvous id may hold only letters, digits, '_', '.', '-', got '$RDZV_ID_V'"
[[ "$ENTRY" =~ ^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$ ]] || die "MOR_ENTRY must be a python module name, got '$ENTRY'"

GPUS=$(gpu_count)
if [ -z "$NPROC_V" ]; then
    NPROC_V=$(( GPUS > 0 ? GPUS : 1 ))
fi
is_uint "$NPROC_V" && [ "$NPROC_V" -ge 1 ] || die "nproc per node must be an integer >= 1, got '$NPROC_V'"

# This node's own address: the first of `hostname -I`, else what its name resolves to.
own_addr() {
    local a=""
    a=$(hostname -I 2>/dev/null | awk '{print $1}') || true
    [ -n "$a" ] || a=$(hostname --ip-address 2>/dev/null | awk '{print $1}') || true
    echo "$a"
}

# An interface's address: its first IPv4 one, else its first global IPv6 one (link-local ones
# need a scope id that other hosts cannot use).
iface_addr() {
    local a
    a=$(ip -o -4 addr show dev "$1" 2>/dev/null | awk '{split($4, p, "/"); print p[1]; exit}') || true
    [ -n "$a" ] || a=$(ip -o -6 addr show dev "$1" scope global 2>/dev/null | awk '{split($4, p, "/"); print p[1]; exit}') || true
    echo "$a"
}

# The interface that holds an address, if any (gloo binds to an interface, not an address).
iface_of() {
    ip -o addr show 2>/dev/null | awk -v a="$1" '{split($4, p, "/"); if (p[1] == a) { print $2; exit }}' || true
}

# An address the nodes are to reach: one concrete host, never a wildcard.
check_addr() {  # $1 = what it is, $2 = the address
    case "$2" in
        0.0.0.0|::|"[::]"|"*"|"[::0]"|0) die "$1 '$2' is a wildcard; name a concrete address of this cluster's network (e.g. the node's cluster IP, or --iface)" ;;
    esac
    [[ "$2" =~ ^[][A-Za-z0-9_.:%-]+$ ]] || die "$1 '$2' is not a host name or IP address"
}

# The named interface: --iface / MOR_IFACE, else the first name gloo or NCCL were told to use
# (NCCL's `=name` is exact, `^names` excludes and names none, a plain name may be a prefix).
IFACE_FROM="--iface/MOR_IFACE"
if [ -z "$IFACE_V" ]; then
    for var in GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME; do
        name="${!var:-}"; name="${name%%,*}"; exact=0
        [[ "$name" == =* ]] && { name="${name#=}"; exact=1; }
        [[ -z "$name" || "$name" == ^* ]] && continue
        if [ "$var" = NCCL_SOCKET_IFNAME ] && [ "$exact" = 0 ] && command -v ip >/dev/null 2>&1 \
                && ! ip link show dev "$name" >/dev/null 2>&1; then
            name=$(ip -o link show 2>/dev/null | awk -F': ' -v p="$name" 'index($2, p) == 1 { sub(/@.*/, "", $2); print $2; exit }') || true
            name="${name:-${!var%%,*}}"
        fi
        IFACE_V="$name"; IFACE_FROM="$var"; break
    done
fi
NODE_ADDR=""  # this node's address: the named interface's, else its own (looked up when needed)
if [ -n "$IFACE_V" ]; then
    command -v ip >/dev/null 2>&1 || die "$IFACE_FROM names interface '$IFACE_V' but the ip command (iproute2) is missing; install it, or pass --local-addr and --master-addr instead"
    if ! ip link show dev "$IFACE_V" >/dev/null 2>&1; then
        known=$(ip -o link show 2>/dev/null | awk -F': ' '{ sub(/@.*/, "", $2); printf "%s%s", sep, $2; sep = ", " }') || true
        die "network interface '$IFACE_V' (from $IFACE_FROM) does not exist on this node; name one of: ${known:-none found} (ip -o link)"
    fi
    NODE_ADDR=$(iface_addr "$IFACE_V")
    [ -n "$NODE_ADDR" ] || die "network interface '$IFACE_V' (from $IFACE_FROM) has no IPv4 or global IPv6 address; name an interface that has one (ip -o addr), or pass --local-addr and --master-addr"
fi
node_addr() { [ -n "$NODE_ADDR" ] && echo "$NODE_ADDR" || own_addr; }

# The rendezvous address: named, or (1 node) loopback, or (N nodes, rank 0) this node's address.
# Never a wildcard: nodes must reach one concrete host, and binding intent stays explicit.
if [ -z "$MASTER_ADDR_V" ]; then
    if [ "$NNODES_V" -eq 1 ]; then
        MASTER_ADDR_V=127.0.0.1
    elif [ "$NODE_RANK_V" -eq 0 ]; then
        MASTER_ADDR_V=$(node_addr)
        [ -n "$MASTER_ADDR_V" ] || die "cannot determine this node's address for the rendezvous; pass --iface, or --master-addr (or MASTER_ADDR)"
    else
        die "--master-addr (or MASTER_ADDR) is required on node rank $NODE_RANK_V of $NNODES_V: the address of node rank 0"
    fi
fi
check_addr "master address" "$MASTER_ADDR_V"

# IPv6 literals need brackets in HOST:PORT.
if [[ "$MASTER_ADDR_V" == *:* && "$MASTER_ADDR_V" != \[* ]]; then
    ENDPOINT="[$MASTER_ADDR_V]:$MASTER_PORT_V"
else
    ENDPOINT="$MASTER_ADDR_V:$MASTER_PORT_V"
fi

# The address this node advertises. On loopback every node is this machine: loopback too, so a
# host name that does not resolve cannot break the workers' own store. Otherwise this node's
# address, not torch's choice (what the host name resolves to, often loopback on other hosts).
if [ -z "$LOCAL_ADDR_V" ]; then
    case "$MASTER_ADDR_V" in
        127.*|localhost|::1|"[::1]") LOCAL_ADDR_V=127.0.0.1 ;;
        *) LOCAL_ADDR_V=$(node_addr) ;;
    esac
fi
[ -z "$LOCAL_ADDR_V" ] || check_addr "local address" "$LOCAL_ADDR_V"

# gloo binds to an interface, found from GLOO_SOCKET_IFNAME or else the host name (often
# loopback): with several nodes, make it the one that holds the address this node advertises.
GLOO_SET=0
if [ "$NNODES_V" -gt 1 ] && [ -z "${GLOO_SOCKET_IFNAME:-}" ]; then
    case "$LOCAL_ADDR_V" in
        127.*|localhost|::1|"[::1]"|"") gloo_if="" ;;
        *) gloo_if="$IFACE_V"; [ -n "$gloo_if" ] || gloo_if=$(iface_of "$LOCAL_ADDR_V") ;;
    esac
    if [ -n "$gloo_if" ]; then export GLOO_SOCKET_IFNAME="$gloo_if"; GLOO_SET=1; fi
fi

# No GPU: DeepSpeed must not probe for CUDA.
if [ "$GPUS" -eq 0 ] && [ -z "${DS_ACCELERATOR:-}" ]; then
    export DS_ACCELERATOR=cpu
fi
# GPU nodes: NCCL defaults (exported values win), the same for one node and for SLURM jobs.
if [ "$GPUS" -gt 0 ]; then
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"  # a failed rank aborts the job instead of hanging it
    export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"        # tolerate transient InfiniBand stalls
    export NCCL_IB_RETRY_CNT="${NCCL_IB_RETRY_CNT:-7}"
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"  # megatron-core's TP/SP overlap needs ordered kernels
fi
# Workers get this long after SIGTERM (they write a checkpoint) before torchrun kills them.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-60}"
# A restarted worker group (--max-restarts) must not share the rendezvous TCPStore with the group
# before it: its keys are not prefixed per attempt, so the new workers read the dead ones' gloo
# addresses and hang in their first new_group (pytorch/pytorch#135712; tests/test_restarts.py).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"

# The interpreter: $PYTHON, the active venv, then python3 on PATH.
if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    PY="$VIRTUAL_ENV/bin/python"
else
    PY=$(command -v python3 || command -v python || true)
fi
[ -n "$PY" ] && command -v "$PY" >/dev/null 2>&1 || die "no python interpreter found (set PYTHON or activate the venv)"

CMD=("$PY" -m mor_megatron.torchrun  # torch.distributed.run, with one-line failures
    --nnodes "$NNODES_V"
    --nproc-per-node "$NPROC_V"
    --node-rank "$NODE_RANK_V"
    --rdzv-backend c10d
    --rdzv-endpoint "$ENDPOINT"
    --rdzv-id "$RDZV_ID_V"
    --max-restarts "$MAX_RESTARTS_V")
# Multi-node: node rank 0 hosts the rendezvous store, the others connect; explicit, so a name/IP
# mismatch fails fast instead of every node waiting for a host that never starts.
if [ "$NNODES_V" -gt 1 ]; then
    CMD+=(--rdzv-conf "is_host=$([ "$NODE_RANK_V" -eq 0 ] && echo 1 || echo 0)")
fi
[ -z "$LOCAL_ADDR_V" ] || CMD+=(--local-addr "$LOCAL_ADDR_V")
CMD+=(-m "$ENTRY" "$@")

# The environment this script decides, shown with the command so it can be pasted as is.
ENV_SHOWN=()
[ -z "${DS_ACCELERATOR:-}" ] || ENV_SHOWN+=("DS_ACCELERATOR=$DS_ACCELERATOR")
ENV_SHOWN+=("TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$TORCH_ELASTIC_SHUTDOWN_TIMEOUT" "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=$TORCH_DISABLE_SHARE_RDZV_TCP_STORE")
[ "$GLOO_SET" = 0 ] || ENV_SHOWN+=("GLOO_SOCKET_IFNAME=$GLOO_SOCKET_IFNAME")
if [ "$GPUS" -gt 0 ]; then
    for name in TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_IB_TIMEOUT NCCL_IB_RETRY_CNT NCCL_DEBUG CUDA_DEVICE_MAX_CONNECTIONS; do
        ENV_SHOWN+=("$name=${!name}")
    done
fi
LINE=$(printf '%q ' "${ENV_SHOWN[@]}" "${CMD[@]}")
LINE="${LINE% }"

if [ "$DRY" = 1 ]; then
    echo "$LINE"
    exit 0
fi
"$PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is None)' 2>/dev/null || die "torch is not importable by $PY (install requirements.txt)"
echo "[torchrun.sh] node $NODE_RANK_V/$NNODES_V, $NPROC_V proc(s), rendezvous $ENDPOINT: $LINE" >&2
# exec: signals (SIGTERM from SLURM or the user) reach torchrun, which forwards them to the workers.
exec "${CMD[@]}"

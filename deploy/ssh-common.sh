# shellcheck shell=bash
# ssh-common.sh: what flash.sh and collect.sh share, sourced by both (never run on its own): the SSH
# options on their command lines, the inventory, host validation, the per-host SSH connection, and the
# parallel job runner. Each rule lives here once; each script keeps its own steps.
#
# The sourcing script sets PROG and defines usage() and these hooks:
#   script_option ARG [VALUE...]  its own options: return 0 if ARG is one (TOOK_VALUE=1 if it took
#                                 VALUE), 1 if not
#   host_option KEY VALUE         apply one inventory setting KEY=VALUE in a host's job
#   host_job LINE                 one host's job (run_jobs runs it in the background)
# and may redefine check_setting / check_host_extra (below) to check more.
# shellcheck disable=SC2034  # the settings here are read by the scripts that source this file.

# ---------------------------------------------------------------------------------------------------
# Settings both scripts take (per-host overrides come from the inventory).
RSYNC_PATH=
PARALLEL=4
TRANSFER=auto
INVENTORY=
HOST_LINES=()
INVENTORY_LINES=()
POSITIONAL=()
TOOK_VALUE=0
# BatchMode: never prompt for a password or a host key in the middle of a fleet run.
SSH_OPTS=(-o BatchMode=yes -o ConnectTimeout=10 -o ServerAliveInterval=15 -o ServerAliveCountMax=4)

# The end of each script's Options in --help: the options parse_options takes for both alike.
shared_option_help() {
	cat <<'EOF'
  --transfer METHOD     auto (rsync if both ends have it, else scp), rsync or scp (default auto)
  --rsync-path CMD      rsync command on the device (passed to rsync --rsync-path)
  -i, --identity KEY    SSH private key
  -F, --ssh-config FILE ssh_config file
  -o, --ssh-option OPT  extra ssh -o option, e.g. -o StrictHostKeyChecking=accept-new (repeatable)
  -h, --help            this help
EOF
}

die() {
	printf '%s: %s\n' "$PROG" "$*" >&2
	exit 2
}

need_value() {
	[[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"
}

# The command line: --opt=value is --opt value; the options above are taken here, the script's own
# by script_option; the rest goes to POSITIONAL.
parse_options() {
	local arg
	while [[ $# -gt 0 ]]; do
		arg=$1
		if [[ $arg == --*=* ]]; then
			set -- "${arg%%=*}" "${arg#*=}" "${@:2}"
			arg=$1
		fi
		TOOK_VALUE=0
		case $arg in
		-h | --help) usage; exit 0 ;;
		--inventory) need_value "$@"; INVENTORY=$2; TOOK_VALUE=1 ;;
		--parallel) need_value "$@"; PARALLEL=$2; TOOK_VALUE=1 ;;
		--transfer) need_value "$@"; TRANSFER=$2; TOOK_VALUE=1 ;;
		--rsync-path) need_value "$@"; RSYNC_PATH=$2; TOOK_VALUE=1 ;;
		-i | --identity) need_value "$@"; SSH_OPTS+=(-i "$2"); TOOK_VALUE=1 ;;
		-F | --ssh-config) need_value "$@"; SSH_OPTS+=(-F "$2"); TOOK_VALUE=1 ;;
		-o | --ssh-option) need_value "$@"; SSH_OPTS+=(-o "$2"); TOOK_VALUE=1 ;;
		--) shift; POSITIONAL+=("$@"); break ;;
		-*) script_option "$@" || die "unknown option $arg (see --help)" ;;
		*) POSITIONAL+=("$arg") ;;
		esac
		shift $((1 + TOOK_VALUE))
	done
}

check_shared_values() {
	[[ $PARALLEL =~ ^[1-9][0-9]*$ ]] || die "--parallel must be a positive integer, not '$PARALLEL'"
	[[ $TRANSFER == auto || $TRANSFER == rsync || $TRANSFER == scp ]] ||
		die "--transfer must be auto, rsync or scp, not '$TRANSFER'"
}

# --inventory FILE -> INVENTORY_LINES: its lines without comments, blank lines dropped.
read_inventory() {
	local line
	[[ -n $INVENTORY ]] || return 0
	[[ -f $INVENTORY ]] || die "inventory $INVENTORY not found"
	while IFS= read -r line || [[ -n $line ]]; do
		line=${line%%#*}
		[[ $line =~ [^[:space:]] ]] || continue
		INVENTORY_LINES+=("$line")
	done <"$INVENTORY"
}

# Split an inventory line into words, honouring quotes (xargs does the quote parsing, no eval).
split_words() {
	xargs -n1 printf '%s\n' <<<"$1"
}

# Every host line: a valid host, known settings, no host twice (two jobs on one device would race).
check_host_lines() {
	local i words=() seen=" "
	[[ ${#HOST_LINES[@]} -ge 1 ]] || die "no hosts given (HOST... or --inventory FILE)"
	for i in "${!HOST_LINES[@]}"; do
		check_host_line "${HOST_LINES[$i]}"
		mapfile -t words < <(split_words "${HOST_LINES[$i]}")
		[[ $seen != *" ${words[0]} "* ]] || die "host ${words[0]} is listed twice"
		seen+="${words[0]} "
		check_host_extra "${HOST_LINES[$i]}"
	done
}

# Keys in INVENTORY_KEYS are the script's own; keys in IGNORED_KEYS (if set) are accepted and ignored.
check_host_line() {
	local words=() w key
	mapfile -t words < <(split_words "$1") || die "cannot parse host line: $1"
	[[ ${#words[@]} -ge 1 ]] || die "empty host in: $1"
	parse_target "${words[0]}" >/dev/null ||
		die "bad host '$(clean "${words[0]}")': want user@host[:port] (letters, digits, . _ -; no leading -)"
	for w in "${words[@]:1}"; do
		key=${w%%=*}
		[[ $w == *=* && " $INVENTORY_KEYS ${IGNORED_KEYS:-} " == *" $key "* ]] ||
			die "inventory: unknown setting '$w' for ${words[0]}; valid keys: $INVENTORY_KEYS"
		check_setting "$key" "${w#*=}" "${words[0]}"
	done
}

# Hooks a script may redefine: check_setting KEY VALUE HOST, check_host_extra LINE.
check_setting() { :; }
check_host_extra() { :; }

# user@host[:port] -> "SSH_HOST<TAB>COPY_HOST<TAB>PORT" (COPY_HOST keeps [] around IPv6 for scp/rsync).
# Neither part may start with '-' (ssh, scp and rsync would read it as an option) or hold anything but
# a name; a user name is at most 32 characters (useradd's limit).
parse_target() {
	local spec=$1 user="" host port=""
	if [[ $spec == *@* ]]; then
		user=${spec%@*}
		spec=${spec##*@}
		[[ $user =~ ^[A-Za-z0-9_][A-Za-z0-9._-]{0,31}$ ]] || return 1
		user+=@
	fi
	if [[ $spec =~ ^\[([0-9A-Fa-f:.]+)\](:([0-9]+))?$ ]]; then
		host=${BASH_REMATCH[1]}
		port=${BASH_REMATCH[3]}
		printf '%s\t%s\t%s\n' "$user$host" "${user}[$host]" "$port"
	elif [[ $spec =~ ^([A-Za-z0-9_][A-Za-z0-9._-]*)(:([0-9]+))?$ ]]; then
		host=${BASH_REMATCH[1]}
		port=${BASH_REMATCH[3]}
		printf '%s\t%s\t%s\n' "$user$host" "$user$host" "$port"
	else
		return 1
	fi
}

# ---------------------------------------------------------------------------------------------------
# Output. A device's output may carry terminal escape sequences: none of its control characters reach
# the terminal (tab and newline are kept).
clean() { # TEXT -> TEXT with each control character as '?'
	printf '%s' "$1" | LC_ALL=C tr '\000-\010\013-\037\177' '?'
}

strip_controls() { # filter: delete the control characters
	LC_ALL=C tr -d '\000-\010\013-\037\177'
}

say() {
	printf '[%s] %s\n' "$LABEL" "$(clean "$*")" >&2
}

last_line() {
	local text=$1
	text=${text%$'\n'}
	printf '%s' "${text##*$'\n'}"
}

# Single-quote for the remote shell (ssh passes one command string).
shq() {
	printf "'%s'" "${1//\'/\'\\\'\'}"
}

# ---------------------------------------------------------------------------------------------------
# One host's job. Runs in a background subshell: globals set here stay in it.
WORK=
IDX=0
LABEL=
SSH_HOST=
COPY_HOST=
PORT=
HOST_SSH=()

# LINE (an inventory line): LABEL, SSH_HOST, COPY_HOST, PORT, host_option for each setting, HOST_SSH.
setup_host() {
	local words=() w
	mapfile -t words < <(split_words "$1")
	LABEL=${words[0]}
	IFS=$'\t' read -r SSH_HOST COPY_HOST PORT <<<"$(parse_target "${words[0]}")"
	for w in "${words[@]:1}"; do host_option "${w%%=*}" "${w#*=}"; done
	# One SSH connection per device, reused by every step and copy (a Wi-Fi handshake costs ~1 s each).
	HOST_SSH=("${SSH_OPTS[@]}" -o ControlMaster=auto -o "ControlPath=$WORK/cm.$IDX" -o ControlPersist=60)
	if [[ -n $PORT ]]; then HOST_SSH+=(-p "$PORT"); fi
}

close_connection() {
	ssh "${HOST_SSH[@]}" -O exit -- "$SSH_HOST" >/dev/null 2>&1 || true
}

# rsync -e takes one string; it honours single quotes (not backslashes), so quote each word.
rsync_rsh() {
	local out="ssh" arg
	for arg in "${HOST_SSH[@]}"; do
		[[ $arg != *"'"* ]] || die "ssh option with a single quote cannot be passed to rsync: $arg"
		out+=" '$arg'"
	done
	printf '%s' "$out"
}

# HOST_SSH for scp -> SCP_OPTS: scp spells the port -P; the rest of the ssh options are shared.
SCP_OPTS=()
scp_options() {
	local i
	SCP_OPTS=("${HOST_SSH[@]}")
	for i in "${!SCP_OPTS[@]}"; do [[ ${SCP_OPTS[$i]} == -p ]] && SCP_OPTS[i]=-P; done
	return 0
}

# REMOTE_HAS_RSYNC (1 or 0) -> the copy method: --transfer, or for auto rsync if both ends have it.
copy_method() {
	local method=$TRANSFER
	if [[ $method == auto ]]; then
		method=scp
		if command -v rsync >/dev/null && { [[ $1 == 1 ]] || [[ -n $RSYNC_PATH ]]; }; then
			method=rsync
		fi
	fi
	printf '%s' "$method"
}

# ---------------------------------------------------------------------------------------------------
# PREFIX: WORK, removed at exit; an interrupt stops every job.
start_work() {
	# Control sockets live here: keep the path short (unix socket paths are limited to ~100 bytes).
	WORK=$(mktemp -d "/tmp/$1.XXXXXX")
	trap 'rm -rf -- "$WORK"' EXIT
	trap 'trap - INT TERM; kill $(jobs -p) 2>/dev/null; exit 130' INT TERM
}

# host_job LINE (the script's) for every host line in the background, up to --parallel at a time
# (IDX is the host's index).
run_jobs() {
	local running=0
	for IDX in "${!HOST_LINES[@]}"; do
		if ((running >= PARALLEL)); then
			wait -n || true
			running=$((running - 1))
		fi
		host_job "${HOST_LINES[$IDX]}" &
		running=$((running + 1))
	done
	wait || true
}

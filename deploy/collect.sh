#!/usr/bin/env bash
# collect.sh: pull the presses each mushcam device kept (its captures folder) back to the workstation,
# so photos from the real camera can be labelled and trained on. See --help and docs/deploy.md.
set -euo pipefail

readonly PROG=${0##*/}

usage() {
	cat <<'EOF'
Usage: collect.sh [OPTIONS] --out DIR HOST...
       collect.sh [OPTIONS] --out DIR --inventory FILE

Copy every complete press (CAPTURES_DIR/<stamp>-<VERDICT>/ with frame_N.jpg and result.json, as the
daemon writes them with [captures] enabled = true) from each device into DIR/<name>/<press>/.
For each host, up to --parallel at a time:
  1. list the device's presses and the sha256 of each of their files (on the device);
  2. copy only the presses not yet in DIR/<name>/ into DIR/<name>/.incoming/ (rsync if both ends have
     it, resuming a copy cut off midway; else scp of only the missing presses);
  3. check every copied file's sha256 against the device's listing, then rename the press into
     DIR/<name>/<press>/: a press folder appears locally only when complete;
  4. only with --prune-collected: delete on the device the presses whose local copy was just
     checked file by file against the device's listing. Nothing on the device is deleted otherwise.
Re-running is cheap: presses already collected are not copied again.

HOST is user@host[:port], host, or an ssh_config alias. SSH uses keys only (BatchMode=yes).
<name> is HOST without user@, with every character outside A-Za-z0-9._- replaced by '_'
(pi@pi1:2222 -> pi1_2222), or the inventory's name= setting.

Options:
  --out DIR             where the presses go (created if missing)
  --inventory FILE      hosts, one per line: HOST [key=value ...]; '#' starts a comment. Keys:
                        captures_dir, rsync_path, name (the same file flash.sh reads; its other keys
                        are accepted and ignored)
  --captures-dir DIR    captures folder on the device (default /var/lib/mushcam/captures); the SSH
                        user must be able to read it (and write it, for --prune-collected)
  --prune-collected     delete on the device the presses verified complete locally
  --parallel N          devices collected at once (default 4)
  --transfer METHOD     auto (rsync if both ends have it, else scp), rsync or scp (default auto)
  --rsync-path CMD      rsync command on the device (passed to rsync --rsync-path)
  -i, --identity KEY    SSH private key
  -F, --ssh-config FILE ssh_config file
  -o, --ssh-option OPT  extra ssh -o option, e.g. -o StrictHostKeyChecking=accept-new (repeatable)
  -h, --help            this help

Exit status: 0 every host ok, 1 any host failed, 2 usage error.
Needs bash >= 4.3, ssh, and rsync or scp here; bash, coreutils (sha256sum) on the device.
EOF
}

die() {
	printf '%s: %s\n' "$PROG" "$*" >&2
	exit 2
}

# ---------------------------------------------------------------------------------------------------
# Settings (per-host overrides come from the inventory).
CAPTURES_DIR=/var/lib/mushcam/captures
RSYNC_PATH=
PARALLEL=4
TRANSFER=auto
PRUNE=0
OUT=
INVENTORY=
HOST_LINES=()
# BatchMode: never prompt for a password or a host key in the middle of a fleet run.
SSH_OPTS=(-o BatchMode=yes -o ConnectTimeout=10 -o ServerAliveInterval=15 -o ServerAliveCountMax=4)
readonly INVENTORY_KEYS="captures_dir rsync_path name"
# flash.sh's inventory keys: one inventory file serves both scripts.
readonly IGNORED_KEYS="model_root status_file mushcam systemctl service allowed_signers config"
# A press folder as the daemon names it, and the files in it: plain names only, so no name read from
# the device can climb out of DIR or reach a shell as anything but a word.
readonly PRESS_RE='^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$'
readonly FILE_RE='^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$'

need_value() {
	[[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"
}

parse_args() {
	local positional=() inventory_lines=() arg line words=()
	while [[ $# -gt 0 ]]; do
		arg=$1
		if [[ $arg == --*=* ]]; then
			set -- "${arg%%=*}" "${arg#*=}" "${@:2}"
			arg=$1
		fi
		case $arg in
		-h | --help) usage; exit 0 ;;
		--out) need_value "$@"; OUT=$2; shift ;;
		--inventory) need_value "$@"; INVENTORY=$2; shift ;;
		--captures-dir) need_value "$@"; CAPTURES_DIR=$2; shift ;;
		--prune-collected) PRUNE=1 ;;
		--parallel) need_value "$@"; PARALLEL=$2; shift ;;
		--transfer) need_value "$@"; TRANSFER=$2; shift ;;
		--rsync-path) need_value "$@"; RSYNC_PATH=$2; shift ;;
		-i | --identity) need_value "$@"; SSH_OPTS+=(-i "$2"); shift ;;
		-F | --ssh-config) need_value "$@"; SSH_OPTS+=(-F "$2"); shift ;;
		-o | --ssh-option) need_value "$@"; SSH_OPTS+=(-o "$2"); shift ;;
		--) shift; positional+=("$@"); break ;;
		-*) die "unknown option $arg (see --help)" ;;
		*) positional+=("$arg") ;;
		esac
		shift
	done

	[[ -n $OUT ]] || die "no --out DIR given (see --help)"
	[[ $PARALLEL =~ ^[1-9][0-9]*$ ]] || die "--parallel must be a positive integer, not '$PARALLEL'"
	[[ $TRANSFER == auto || $TRANSFER == rsync || $TRANSFER == scp ]] ||
		die "--transfer must be auto, rsync or scp, not '$TRANSFER'"
	check_captures_dir "$CAPTURES_DIR" || die "--captures-dir must be a plain absolute path (letters, digits, / . _ + -), not '$CAPTURES_DIR'"

	for arg in "${positional[@]}"; do HOST_LINES+=("$(printf '%q' "$arg")"); done
	if [[ -n $INVENTORY ]]; then
		[[ -f $INVENTORY ]] || die "inventory $INVENTORY not found"
		while IFS= read -r line || [[ -n $line ]]; do
			line=${line%%#*}
			[[ $line =~ [^[:space:]] ]] || continue
			inventory_lines+=("$line")
		done <"$INVENTORY"
		HOST_LINES+=("${inventory_lines[@]}")
	fi
	[[ ${#HOST_LINES[@]} -ge 1 ]] || die "no hosts given (HOST... or --inventory FILE)"
	local i seen=" " names=" " name
	for i in "${!HOST_LINES[@]}"; do
		check_host_line "${HOST_LINES[$i]}"
		mapfile -t words < <(split_words "${HOST_LINES[$i]}")
		[[ $seen != *" ${words[0]} "* ]] || die "host ${words[0]} is listed twice"
		seen+="${words[0]} "
		name=$(host_name "${HOST_LINES[$i]}")
		# Two hosts writing one folder would mix their presses.
		[[ $names != *" $name "* ]] || die "two hosts would collect into $OUT/$name: give one a name= in the inventory"
		names+="$name "
	done
}

# The device's captures folder goes into a remote command line and rsync/scp paths: plain paths only.
check_captures_dir() {
	[[ $1 =~ ^/[A-Za-z0-9._/+-]*$ && $1 != *..* ]]
}

# Split an inventory line into words, honouring quotes (xargs does the quote parsing, no eval).
split_words() {
	xargs -n1 printf '%s\n' <<<"$1"
}

check_host_line() {
	local words=() w key
	mapfile -t words < <(split_words "$1") || die "cannot parse host line: $1"
	[[ ${#words[@]} -ge 1 ]] || die "empty host in: $1"
	parse_target "${words[0]}" >/dev/null || die "bad host '${words[0]}': want user@host[:port] or an ssh_config alias"
	for w in "${words[@]:1}"; do
		key=${w%%=*}
		[[ $w == *=* && " $INVENTORY_KEYS $IGNORED_KEYS " == *" $key "* ]] ||
			die "inventory: unknown setting '$w' for ${words[0]}; valid keys: $INVENTORY_KEYS"
		case $key in
		captures_dir) check_captures_dir "${w#*=}" || die "inventory: captures_dir for ${words[0]} must be a plain absolute path" ;;
		name) [[ ${w#*=} =~ $PRESS_RE ]] || die "inventory: name for ${words[0]} must be letters, digits, . _ - (not starting with . or -)" ;;
		esac
	done
}

# user@host[:port] -> "SSH_HOST<TAB>COPY_HOST<TAB>PORT" (COPY_HOST keeps [] around IPv6 for scp/rsync).
# Neither the user nor the host may start with '-': ssh, scp and rsync would read it as an option.
parse_target() {
	local spec=$1 user="" host port=""
	if [[ $spec == *@* ]]; then
		user=${spec%@*}
		spec=${spec##*@}
		[[ $user =~ ^[A-Za-z0-9_][A-Za-z0-9._-]*$ ]] || return 1
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

# The local folder name of a host line: name=, else HOST without user@, other characters as '_'.
host_name() {
	local words=() w name
	mapfile -t words < <(split_words "$1")
	name=${words[0]##*@}
	name=${name//[^A-Za-z0-9._-]/_}
	name=${name##+([_.])}
	name=${name:-host} # never the --out folder itself
	for w in "${words[@]:1}"; do
		[[ ${w%%=*} == name ]] && name=${w#*=}
	done
	printf '%s' "$name"
}

# ---------------------------------------------------------------------------------------------------
# Remote agent. These r_* functions run ON THE DEVICE: each remote step sends their source (declare -f)
# to `bash -s` and calls one of them. Keeping them here lets shellcheck check them like the rest.

# shellcheck disable=SC2317  # this group only defines the agent; it runs on the device, never here.
{
r_main() {
	set -euo pipefail
	local op=$1
	shift
	case $op in
	list) r_list "$@" ;;
	prune) r_prune "$@" ;;
	*)
		echo "collect agent: unknown step $op" >&2
		return 2
		;;
	esac
}

# CAPTURES PRESS_RE FILE_RE: "rsync=0|1", then "<sha256>  <press>/<file>" for every regular file of
# every complete press (a folder not starting with '.', holding result.json; the daemon writes a
# press into a hidden .tmp-* folder and renames it, so such a folder is complete).
r_list() {
	local root=$1 press_re=$2 file_re=$3 dir press file
	if command -v rsync >/dev/null; then echo "rsync=1"; else echo "rsync=0"; fi
	command -v sha256sum >/dev/null || {
		echo "sha256sum not found on the device (install coreutils)" >&2
		return 1
	}
	if [[ ! -d $root ]]; then
		echo "captures folder $root does not exist on the device: set [captures] enabled = true, or check --captures-dir" >&2
		return 1
	fi
	[[ -r $root && -x $root ]] || {
		echo "captures folder $root is not readable by $(id -un)" >&2
		return 1
	}
	cd -- "$root"
	for dir in */; do
		press=${dir%/}
		[[ $press =~ $press_re && ! -L $press && -f $press/result.json ]] || continue
		for file in "$press"/*; do
			[[ -f $file && ! -L $file && ${file#*/} =~ $file_re ]] || continue
			sha256sum -- "$file"
		done
	done
}

# CAPTURES PRESS...: delete these presses (names re-checked here: never anything but a press folder).
r_prune() {
	local root=$1 press_re=$2 press
	shift 2
	for press in "$@"; do
		[[ $press =~ $press_re && -d $root/$press && ! -L $root/$press ]] || continue
		rm -rf -- "${root:?}/$press" && echo "pruned=$press"
	done
}
}

# ---------------------------------------------------------------------------------------------------
# Local side of one host. Runs in a background subshell: globals set here stay in it.

WORK=
IDX=0
LABEL=
NAME=
SSH_HOST=
COPY_HOST=
PORT=
HOST_SSH=()

say() {
	printf '[%s] %s\n' "$LABEL" "$*" >&2
}

# Device output is shown to the user: no escape sequences or other control characters from it.
clean() {
	LC_ALL=C tr -d '\000-\010\013-\037\177'
}

# Single-quote for the remote shell (ssh passes one command string).
shq() {
	printf "'%s'" "${1//\'/\'\\\'\'}"
}

agent_source() {
	declare -f r_main r_list r_prune
	# </dev/null: nothing the agent runs may eat the rest of the script from bash's stdin.
	echo 'r_main "$@" </dev/null'
}

remote() {
	local command_line="bash -s --" arg
	for arg in "$@"; do command_line+=" $(shq "$arg")"; done
	# shellcheck disable=SC2029  # expanding here is the point: every argument is already quoted by shq.
	agent_source | ssh "${HOST_SSH[@]}" -- "$SSH_HOST" "$command_line"
}

# Run a remote step, capturing its (cleaned) output in REPLY_OUT; log it when it fails.
REPLY_OUT=
step() {
	local rc=0 line
	REPLY_OUT=$(remote "$@" 2>&1 | clean) || rc=$?
	if [[ $rc -ne 0 && -n $REPLY_OUT ]]; then
		while IFS= read -r line; do say "  $line"; done <<<"$REPLY_OUT"
	fi
	return "$rc"
}

last_line() {
	local text=$1
	text=${text%$'\n'}
	printf '%s' "${text##*$'\n'}"
}

record() { # STATUS NEW HAVE PRUNED DETAIL
	printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >"$WORK/result.$IDX"
}

setup_host() {
	local words=() w
	mapfile -t words < <(split_words "$1")
	LABEL=${words[0]}
	NAME=$(host_name "$1")
	IFS=$'\t' read -r SSH_HOST COPY_HOST PORT <<<"$(parse_target "${words[0]}")"
	for w in "${words[@]:1}"; do
		case ${w%%=*} in
		captures_dir) CAPTURES_DIR=${w#*=} ;;
		rsync_path) RSYNC_PATH=${w#*=} ;;
		esac
	done
	# One SSH connection per device, reused by every step and copy.
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

local_sha256() {
	if command -v sha256sum >/dev/null; then
		sha256sum -- "$1" | cut -d' ' -f1
	else
		shasum -a 256 -- "$1" | cut -d' ' -f1 # macOS
	fi
}

# DIR LISTFILE: exit 0 if DIR holds exactly the files LISTFILE names ("<sha> <file>" lines), same bytes.
press_matches() {
	local dir=$1 list=$2 sha file n=0 have
	while read -r sha file; do
		[[ -f $dir/$file && ! -L $dir/$file ]] || return 1
		[[ $(local_sha256 "$dir/$file") == "$sha" ]] || return 1
		n=$((n + 1))
	done <"$list"
	have=$(find "$dir" -mindepth 1 | wc -l)
	[[ $have -eq $n ]]
}

# METHOD INCOMING FILES...: copy CAPTURES_DIR/<press>/<file> for each press/file into INCOMING/.
transfer() {
	local method=$1 incoming=$2
	shift 2
	if [[ $method == rsync ]]; then
		# --files-from: exactly the listed files, nothing else the folder holds; --partial keeps a file
		# cut off midway for the next run. -t, not -a: local files belong to the collecting user.
		local args=(-t --partial --timeout=60 --files-from=- -e "$(rsync_rsh)")
		[[ -n $RSYNC_PATH ]] && args+=(--rsync-path="$RSYNC_PATH")
		printf '%s\n' "$@" | rsync "${args[@]}" -- "$COPY_HOST:$CAPTURES_DIR/" "$incoming/" 2>&1
	else
		local opts=("${HOST_SSH[@]}") i f press
		# scp spells the port -P; the rest of the ssh options are shared.
		for i in "${!opts[@]}"; do [[ ${opts[$i]} == -p ]] && opts[i]=-P; done
		# One scp per press (its files in one call, over the shared connection), into a fresh folder.
		local -A groups=()
		for f in "$@"; do groups[${f%%/*}]+=" $f"; done
		for press in "${!groups[@]}"; do
			rm -rf -- "${incoming:?}/$press"
			mkdir -p -- "$incoming/$press"
			local srcs=() names=()
			read -r -a names <<<"${groups[$press]}"
			for f in "${names[@]}"; do srcs+=("$COPY_HOST:$CAPTURES_DIR/$f"); done
			scp -q -p "${opts[@]}" -- "${srcs[@]}" "$incoming/$press/" 2>&1 || return 1
		done
	fi
}

collect_host() {
	local listing method dest incoming line sha path press rsync_remote presses=() missing=() files=()
	local new=0 have=0 pruned=0 bad=0 verified=() out rc=0
	setup_host "$1"
	record FAILED 0 0 0 "stopped unexpectedly"
	dest=$OUT/$NAME
	incoming=$dest/.incoming
	mkdir -p -- "$incoming" || {
		record FAILED 0 0 0 "cannot create $incoming"
		return 0
	}

	say "listing presses in $CAPTURES_DIR"
	if ! step list "$CAPTURES_DIR" "$PRESS_RE" "$FILE_RE"; then
		record FAILED 0 0 0 "list: $(last_line "$REPLY_OUT")"
		close_connection
		return 0
	fi
	listing=$REPLY_OUT
	rsync_remote=0
	# One list file per press ("<sha> <file>"), from lines that look exactly like sha256sum's output.
	rm -rf -- "$WORK/list.$IDX"
	mkdir -p -- "$WORK/list.$IDX"
	while IFS= read -r line; do
		if [[ $line == rsync=1 ]]; then
			rsync_remote=1
			continue
		fi
		[[ $line =~ ^([0-9a-f]{64})\ \ ([^/]+)/([^/]+)$ ]] || continue
		sha=${BASH_REMATCH[1]} press=${BASH_REMATCH[2]} path=${BASH_REMATCH[3]}
		[[ $press =~ $PRESS_RE && $path =~ $FILE_RE ]] || continue
		[[ -f $WORK/list.$IDX/$press ]] || presses+=("$press")
		printf '%s %s\n' "$sha" "$path" >>"$WORK/list.$IDX/$press"
	done <<<"$listing"

	for press in "${presses[@]}"; do
		if [[ -d $dest/$press ]]; then
			have=$((have + 1))
			# Already collected: for --prune-collected it must still match the device file by file.
			if [[ $PRUNE == 1 ]] && press_matches "$dest/$press" "$WORK/list.$IDX/$press"; then
				verified+=("$press")
			fi
		else
			missing+=("$press")
			while read -r sha path; do files+=("$press/$path"); done <"$WORK/list.$IDX/$press"
		fi
	done
	say "${#presses[@]} press(es) on the device, $have already here, ${#missing[@]} to copy"

	if [[ ${#missing[@]} -gt 0 ]]; then
		method=$TRANSFER
		if [[ $method == auto ]]; then
			method=scp
			if command -v rsync >/dev/null && { [[ $rsync_remote == 1 ]] || [[ -n $RSYNC_PATH ]]; }; then
				method=rsync
			fi
		fi
		say "copying with $method into $incoming"
		out=$(transfer "$method" "$incoming" "${files[@]}" | clean) || rc=$?
		if [[ $rc -ne 0 ]]; then
			[[ -n $out ]] && while IFS= read -r line; do say "  $line"; done <<<"$out"
			# Presses copied whole before the failure are still checked and kept below; the rest of
			# .incoming stays for the next run to resume.
			say "copy did not complete"
		fi
		for press in "${missing[@]}"; do
			if [[ -d $incoming/$press ]] && press_matches "$incoming/$press" "$WORK/list.$IDX/$press"; then
				mv -T -- "$incoming/$press" "$dest/$press"
				new=$((new + 1))
				verified+=("$press")
			else
				bad=$((bad + 1))
				# A finished copy that does not match the listing (the device changed it meanwhile?)
				# is started afresh next time; after a cut-off copy, what arrived is kept to resume.
				[[ $rc -eq 0 ]] && rm -rf -- "${incoming:?}/$press"
			fi
		done
	fi

	if [[ $PRUNE == 1 && ${#verified[@]} -gt 0 ]]; then
		if step prune "$CAPTURES_DIR" "$PRESS_RE" "${verified[@]}"; then
			pruned=$(grep -c '^pruned=' <<<"$REPLY_OUT" || true)
		else
			say "warning: pruning on the device failed: $(last_line "$REPLY_OUT")"
		fi
	fi
	close_connection

	if [[ $bad -gt 0 ]]; then
		record FAILED "$new" "$have" "$pruned" "$bad press(es) not copied completely (${method} $(last_line "${out:-}")); re-run to resume"
	else
		record ok "$new" "$have" "$pruned" "$dest"
	fi
}

summary() {
	local i status new have pruned detail rows=() failed=0 w1=4 label words=()
	for i in "${!HOST_LINES[@]}"; do
		mapfile -t words < <(split_words "${HOST_LINES[$i]}")
		label=${words[0]}
		if [[ -f $WORK/result.$i ]]; then
			IFS=$'\t' read -r status new have pruned detail <"$WORK/result.$i"
		else
			status=FAILED new=0 have=0 pruned=0 detail="no result (interrupted?)"
		fi
		[[ $status == FAILED ]] && failed=1
		rows+=("$label"$'\t'"$status"$'\t'"$new"$'\t'"$have"$'\t'"$pruned"$'\t'"$detail")
		((${#label} > w1)) && w1=${#label}
	done
	printf '\n%-*s  %-6s  %5s  %5s  %6s  %s\n' "$w1" HOST RESULT NEW HAD PRUNED DETAIL
	local row h s n a p d
	for row in "${rows[@]}"; do
		IFS=$'\t' read -r h s n a p d <<<"$row"
		printf '%-*s  %-6s  %5s  %5s  %6s  %s\n' "$w1" "$h" "$s" "$n" "$a" "$p" "$d"
	done
	return "$failed"
}

main() {
	shopt -s extglob
	parse_args "$@"
	command -v ssh >/dev/null || die "ssh not found (install openssh-client)"
	mkdir -p -- "$OUT" || die "cannot create $OUT"
	# Control sockets live here: keep the path short (unix socket paths are limited to ~100 bytes).
	WORK=$(mktemp -d /tmp/collect.XXXXXX)
	trap 'rm -rf -- "$WORK"' EXIT
	trap 'trap - INT TERM; kill $(jobs -p) 2>/dev/null; exit 130' INT TERM

	local running=0
	for IDX in "${!HOST_LINES[@]}"; do
		if ((running >= PARALLEL)); then
			wait -n || true
			running=$((running - 1))
		fi
		collect_host "${HOST_LINES[$IDX]}" &
		running=$((running + 1))
	done
	wait || true

	if summary; then exit 0; else exit 1; fi
}

main "$@"

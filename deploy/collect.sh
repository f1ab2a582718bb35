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
EOF
	shared_option_help
	cat <<'EOF'

Exit status: 0 every host ok, 1 any host failed, 2 usage error.
Needs bash >= 4.3, ssh, and rsync or scp here; bash, coreutils (sha256sum) on the device.
EOF
}

# shellcheck source-path=SCRIPTDIR source=ssh-common.sh
# readlink -f: a symlink to this script (e.g. in ~/bin) still finds its neighbour.
source "$(dirname -- "$(readlink -f -- "${BASH_SOURCE[0]}")")/ssh-common.sh"

# ---------------------------------------------------------------------------------------------------
# Settings (per-host overrides come from the inventory; the SSH ones are in ssh-common.sh).
CAPTURES_DIR=/var/lib/mushcam/captures
PRUNE=0
OUT=
readonly INVENTORY_KEYS="captures_dir rsync_path name"
# flash.sh's inventory keys: one inventory file serves both scripts.
readonly IGNORED_KEYS="model_root status_file mushcam systemctl service allowed_signers config"
# A press folder as the daemon names it, and the files in it: plain names only, so no name read from
# the device can climb out of DIR or reach a shell as anything but a word.
readonly PRESS_RE='^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$'
readonly FILE_RE='^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$'

script_option() {
	case $1 in
	--out) need_value "$@"; OUT=$2; TOOK_VALUE=1 ;;
	--captures-dir) need_value "$@"; CAPTURES_DIR=$2; TOOK_VALUE=1 ;;
	--prune-collected) PRUNE=1 ;;
	*) return 1 ;;
	esac
}

parse_args() {
	local arg
	parse_options "$@"
	[[ -n $OUT ]] || die "no --out DIR given (see --help)"
	check_shared_values
	check_captures_dir "$CAPTURES_DIR" || die "--captures-dir must be a plain absolute path (letters, digits, / . _ + -), not '$CAPTURES_DIR'"

	for arg in "${POSITIONAL[@]}"; do HOST_LINES+=("$(printf '%q' "$arg")"); done
	read_inventory
	HOST_LINES+=("${INVENTORY_LINES[@]}")
	check_host_lines
}

# Two hosts writing one folder would mix their presses.
COLLECT_NAMES=" "
check_host_extra() {
	local name
	name=$(host_name "$1")
	[[ $COLLECT_NAMES != *" $name "* ]] || die "two hosts would collect into $OUT/$name: give one a name= in the inventory"
	COLLECT_NAMES+="$name "
}

# The device's captures folder goes into a remote command line and rsync/scp paths: plain paths only.
check_captures_dir() {
	[[ $1 =~ ^/[A-Za-z0-9._/+-]*$ && $1 != *..* ]]
}

check_setting() { # KEY VALUE HOST
	case $1 in
	captures_dir) check_captures_dir "$2" || die "inventory: captures_dir for $3 must be a plain absolute path" ;;
	name) [[ $2 =~ $PRESS_RE ]] || die "inventory: name for $3 must be letters, digits, . _ - (not starting with . or -)" ;;
	esac
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

NAME=

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
	REPLY_OUT=$(remote "$@" 2>&1 | strip_controls) || rc=$?
	if [[ $rc -ne 0 && -n $REPLY_OUT ]]; then
		while IFS= read -r line; do say "  $line"; done <<<"$REPLY_OUT"
	fi
	return "$rc"
}

record() { # STATUS NEW HAVE PRUNED DETAIL
	printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >"$WORK/result.$IDX"
}

host_option() { # KEY VALUE
	case $1 in
	captures_dir) CAPTURES_DIR=$2 ;;
	rsync_path) RSYNC_PATH=$2 ;;
	esac
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
		local f press
		scp_options
		# One scp per press (its files in one call, over the shared connection), into a fresh folder.
		local -A groups=()
		for f in "$@"; do groups[${f%%/*}]+=" $f"; done
		for press in "${!groups[@]}"; do
			rm -rf -- "${incoming:?}/$press"
			mkdir -p -- "$incoming/$press"
			local srcs=() names=()
			read -r -a names <<<"${groups[$press]}"
			for f in "${names[@]}"; do srcs+=("$COPY_HOST:$CAPTURES_DIR/$f"); done
			scp -q -p "${SCP_OPTS[@]}" -- "${srcs[@]}" "$incoming/$press/" 2>&1 || return 1
		done
	fi
}

host_job() { # LINE: collect from one host
	local listing method dest incoming line sha path press rsync_remote presses=() missing=() files=()
	local new=0 have=0 pruned=0 bad=0 verified=() out rc=0
	setup_host "$1"
	NAME=$(host_name "$1")
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
		method=$(copy_method "$rsync_remote")
		say "copying with $method into $incoming"
		out=$(transfer "$method" "$incoming" "${files[@]}" | strip_controls) || rc=$?
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
	# Two runs into one DIR would both copy a press into the same incoming folder and one could prune
	# what the other is still verifying: one collect.sh per DIR (the lock goes when this process does).
	# macOS has no flock(1) by default (its sha256 fallback is above): warn there rather than refuse.
	if command -v flock >/dev/null; then
		exec {LOCK_FD}>>"$OUT/.collect.lock" || die "cannot write $OUT/.collect.lock"
		flock -n "$LOCK_FD" || die "another collect.sh is writing to $OUT: wait for it to finish, or use another --out"
	else
		say "warning: no flock here: nothing stops a second collect.sh writing to $OUT at the same time"
	fi
	start_work collect
	run_jobs

	if summary; then exit 0; else exit 1; fi
}

main "$@"

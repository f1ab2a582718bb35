#!/usr/bin/env bash
# flash.sh: push a model bundle to mushcam devices over SSH and switch to it only once it is proven
# good on each device; put the previous release back on any failure. See --help and docs/deploy.md.
set -euo pipefail

readonly PROG=${0##*/}

usage() {
	cat <<'EOF'
Usage: flash.sh [OPTIONS] BUNDLE HOST...
       flash.sh [OPTIONS] BUNDLE --inventory FILE
       flash.sh [OPTIONS] --rollback HOST [--rollback HOST]...

Push a model bundle (a directory with model.json + model.tflite) to mushcam devices. For each host,
up to --parallel at a time:
  1. copy the bundle into MODEL_ROOT/releases/<version>-<sha12>.partial/, then rename it
     (<version> from the card, <sha12> = first 12 hex of model.tflite's sha256 in the card);
  2. check every sha256 on the device against the card (and the card against the local one);
  3. run `MUSHCAM selftest --model RELEASE` on the device;
  4. switch MODEL_ROOT/current to the release atomically (new symlink + mv -T);
  5. `SYSTEMCTL reload SERVICE` (or start, if it is not running) and wait until the service is active
     and its status file reports the new model's version and sha256.
If any step fails, `current` goes back to the previous release (reloaded), the new release is renamed
<name>.failed, and the device keeps serving what it served before. A copy cut off midway leaves only
<name>.partial (resumed by the next run). After a success the last --keep releases are kept
(never current's target). Re-running with the release already current just checks it.

HOST is user@host[:port], host, or an ssh_config alias. SSH uses keys only (BatchMode=yes).

Options:
  --inventory FILE      hosts, one per line: HOST [key=value ...]; '#' starts a comment. Keys override
                        the options below for that host: model_root, status_file, mushcam, systemctl,
                        service, allowed_signers, config, rsync_path
                        (quote values with spaces: mushcam="sudo -n mushcam")
  --parallel N          devices flashed at once (default 4)
  --dry-run             print what would be done and change nothing (a flash connects to nothing;
                        a rollback connects to find the release it would go back to)
  --rollback HOST       point HOST's `current` back at its previous good release, reload, mark the
                        abandoned release .failed (repeatable; no BUNDLE; with --inventory, only
                        HOST's settings are taken from it)
  --model-root DIR      model root on the device (default /var/lib/mushcam/models)
  --status-file FILE    status file the daemon writes (default /run/mushcam/status.json)
  --mushcam CMD         mushcam command on the device (default mushcam)
  --systemctl CMD       systemctl command on the device (default systemctl; e.g. "sudo -n systemctl")
  --service NAME        systemd service (default mushcam)
  --keep K              releases to keep per device, current included (default 3, minimum 1)
  --timeout SECONDS     how long to wait for the daemon to report the new model (default 30)
  --require-signature   refuse unsigned bundles here, and pass --require-signature to the selftest
  --allowed-signers F   allowed-signers file on the device (default /etc/mushcam/allowed_signers)
  --device-config FILE  the daemon's config on the device (default /etc/mushcam/config.toml); if it
                        exists, the selftest applies its require_signature/allowed_signers too
  --transfer METHOD     auto (rsync if both ends have it, else scp), rsync or scp (default auto)
  --rsync-path CMD      rsync command on the device (passed to rsync --rsync-path)
  -i, --identity KEY    SSH private key
  -F, --ssh-config FILE ssh_config file
  -o, --ssh-option OPT  extra ssh -o option, e.g. -o StrictHostKeyChecking=accept-new (repeatable)
  -h, --help            this help

Exit status: 0 every host ok, 1 any host failed, 2 usage error or bad bundle.
Needs bash >= 4.3, ssh, python3 and rsync or scp here; bash, python3, coreutils (sha256sum) on the device.
EOF
}

die() {
	printf '%s: %s\n' "$PROG" "$*" >&2
	exit 2
}

# ---------------------------------------------------------------------------------------------------
# Settings (per-host overrides come from the inventory).
MODEL_ROOT=/var/lib/mushcam/models
STATUS_FILE=/run/mushcam/status.json
MUSHCAM=mushcam
SYSTEMCTL=systemctl
SERVICE=mushcam
ALLOWED_SIGNERS=/etc/mushcam/allowed_signers
DEVICE_CONFIG=/etc/mushcam/config.toml
RSYNC_PATH=
REQUIRE_SIGNATURE=0
KEEP=3
PARALLEL=4
TIMEOUT=30
TRANSFER=auto
DRY_RUN=0
ROLLBACK=0
INVENTORY=
BUNDLE=
HOST_LINES=()
# BatchMode: never prompt for a password or a host key in the middle of a fleet push.
SSH_OPTS=(-o BatchMode=yes -o ConnectTimeout=10 -o ServerAliveInterval=15 -o ServerAliveCountMax=4)
readonly INVENTORY_KEYS="model_root status_file mushcam systemctl service allowed_signers config rsync_path"

need_value() {
	[[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"
}

parse_args() {
	local positional=() rollback_hosts=() inventory_lines=() arg line first words=()
	while [[ $# -gt 0 ]]; do
		arg=$1
		if [[ $arg == --*=* ]]; then
			set -- "${arg%%=*}" "${arg#*=}" "${@:2}"
			arg=$1
		fi
		case $arg in
		-h | --help) usage; exit 0 ;;
		--inventory) need_value "$@"; INVENTORY=$2; shift ;;
		--parallel) need_value "$@"; PARALLEL=$2; shift ;;
		--dry-run) DRY_RUN=1 ;;
		--rollback) need_value "$@"; ROLLBACK=1; rollback_hosts+=("$2"); shift ;;
		--model-root) need_value "$@"; MODEL_ROOT=$2; shift ;;
		--status-file) need_value "$@"; STATUS_FILE=$2; shift ;;
		--mushcam) need_value "$@"; MUSHCAM=$2; shift ;;
		--systemctl) need_value "$@"; SYSTEMCTL=$2; shift ;;
		--service) need_value "$@"; SERVICE=$2; shift ;;
		--keep) need_value "$@"; KEEP=$2; shift ;;
		--timeout) need_value "$@"; TIMEOUT=$2; shift ;;
		--require-signature) REQUIRE_SIGNATURE=1 ;;
		--allowed-signers) need_value "$@"; ALLOWED_SIGNERS=$2; shift ;;
		--device-config) need_value "$@"; DEVICE_CONFIG=$2; shift ;;
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

	[[ $PARALLEL =~ ^[1-9][0-9]*$ ]] || die "--parallel must be a positive integer, not '$PARALLEL'"
	[[ $KEEP =~ ^[1-9][0-9]*$ ]] || die "--keep must be a positive integer, not '$KEEP'"
	[[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a positive number of seconds, not '$TIMEOUT'"
	[[ $TRANSFER == auto || $TRANSFER == rsync || $TRANSFER == scp ]] ||
		die "--transfer must be auto, rsync or scp, not '$TRANSFER'"

	if [[ -n $INVENTORY ]]; then
		[[ -f $INVENTORY ]] || die "inventory $INVENTORY not found"
		while IFS= read -r line || [[ -n $line ]]; do
			line=${line%%#*}
			[[ $line =~ [^[:space:]] ]] || continue
			inventory_lines+=("$line")
		done <"$INVENTORY"
	fi
	if [[ $ROLLBACK == 1 ]]; then
		[[ ${#positional[@]} -eq 0 ]] || die "--rollback takes no BUNDLE or other hosts: give each host with --rollback HOST"
		# Only the hosts named with --rollback; the inventory only supplies their settings.
		for arg in "${rollback_hosts[@]}"; do
			first=$(printf '%q' "$arg")
			for line in "${inventory_lines[@]}"; do
				mapfile -t words < <(split_words "$line")
				if [[ ${words[0]} == "$arg" ]]; then
					first=$line
					break
				fi
			done
			HOST_LINES+=("$first")
		done
	else
		[[ ${#positional[@]} -ge 1 ]] || die "no BUNDLE given (see --help)"
		BUNDLE=${positional[0]%/}
		for arg in "${positional[@]:1}"; do HOST_LINES+=("$(printf '%q' "$arg")"); done
		HOST_LINES+=("${inventory_lines[@]}")
	fi
	[[ ${#HOST_LINES[@]} -ge 1 ]] || die "no hosts given (HOST... or --inventory FILE)"
	local i seen=" "
	for i in "${!HOST_LINES[@]}"; do
		check_host_line "${HOST_LINES[$i]}"
		mapfile -t words < <(split_words "${HOST_LINES[$i]}")
		# Two jobs on one device would race on its `current` link.
		[[ $seen != *" ${words[0]} "* ]] || die "host ${words[0]} is listed twice"
		seen+="${words[0]} "
	done
}

# Split an inventory line into words, honouring quotes (xargs does the quote parsing, no eval).
split_words() {
	xargs -n1 printf '%s\n' <<<"$1"
}

check_host_line() {
	local words=() w key
	mapfile -t words < <(split_words "$1") || die "cannot parse host line: $1"
	[[ ${#words[@]} -ge 1 ]] || die "empty host in: $1"
	parse_target "${words[0]}" >/dev/null || die "bad host '${words[0]}': want user@host[:port]"
	for w in "${words[@]:1}"; do
		key=${w%%=*}
		[[ $w == *=* && " $INVENTORY_KEYS " == *" $key "* ]] ||
			die "inventory: unknown setting '$w' for ${words[0]}; valid keys: $INVENTORY_KEYS"
	done
}

# user@host[:port] -> "SSH_HOST<TAB>COPY_HOST<TAB>PORT" (COPY_HOST keeps [] around IPv6 for scp/rsync).
parse_target() {
	local spec=$1 user="" host port=""
	if [[ $spec == *@* ]]; then
		user=${spec%@*}@
		spec=${spec##*@}
	fi
	if [[ $spec =~ ^\[([0-9A-Fa-f:.]+)\](:([0-9]+))?$ ]]; then
		host=${BASH_REMATCH[1]}
		port=${BASH_REMATCH[3]}
		printf '%s\t%s\t%s\n' "$user$host" "${user}[$host]" "$port"
	elif [[ $spec =~ ^([A-Za-z0-9._-]+)(:([0-9]+))?$ ]]; then
		host=${BASH_REMATCH[1]}
		port=${BASH_REMATCH[3]}
		printf '%s\t%s\t%s\n' "$user$host" "$user$host" "$port"
	else
		return 1
	fi
}

# ---------------------------------------------------------------------------------------------------
# The local bundle: read the card once, refuse early what no device should receive.
CARD_VERSION=
CARD_SHA=
RELEASE=
VERIFY_ARGS=()

load_bundle() {
	[[ -d $BUNDLE ]] || die "bundle $BUNDLE is not a directory"
	[[ -f $BUNDLE/model.json ]] || die "$BUNDLE/model.json not found: is $BUNDLE a model bundle?"
	command -v python3 >/dev/null || die "python3 not found (needed to read the model card)"
	local out line
	# The device checks the hashes; here we only check the card's shape and that the files exist.
	out=$(python3 -c '
import json, re, sys
bundle = sys.argv[1]
def fail(msg):
    print(f"{bundle}/model.json: {msg}", file=sys.stderr)
    sys.exit(2)
try:
    with open(f"{bundle}/model.json", encoding="utf-8") as f:
        card = json.load(f)
except (OSError, ValueError) as err:
    fail(f"unreadable ({err}); re-export the bundle")
if not isinstance(card, dict) or card.get("format") != "mushcam-bundle/1":
    fail("format is not mushcam-bundle/1; re-export the bundle")
version = card.get("version")
if not isinstance(version, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}", version):
    fail(f"version {version!r} is not a plain name (letters, digits, . _ + -)")
files = card.get("files")
if not isinstance(files, dict) or not isinstance(files.get("model.tflite"), str):
    fail("files has no model.tflite sha256")
print(f"version\t{version}")
for name, sha in files.items():
    parts = name.split("/")
    if (not re.fullmatch(r"[A-Za-z0-9._/-]+", name) or name.startswith("/")
            or ".." in parts or "" in parts or "." in parts):
        fail(f"files entry {name!r} is not a plain relative path")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        fail(f"files[{name!r}] is not a sha256 hex digest")
    print(f"file\t{name}\t{sha}")
' "$BUNDLE")
	while IFS=$'\t' read -r -a line; do
		case ${line[0]} in
		version) CARD_VERSION=${line[1]} ;;
		file)
			[[ -f $BUNDLE/${line[1]} ]] || die "$BUNDLE/${line[1]}: listed in the card but missing"
			[[ ${line[1]} == model.tflite ]] && CARD_SHA=${line[2]}
			VERIFY_ARGS+=("${line[1]}" "${line[2]}")
			;;
		esac
	done <<<"$out"
	RELEASE=$CARD_VERSION-${CARD_SHA:0:12}
	# The card and its signature are not in `files`; check their copies against the local ones.
	VERIFY_ARGS+=(model.json "$(local_sha256 "$BUNDLE/model.json")")
	if [[ -f $BUNDLE/model.json.sig ]]; then
		VERIFY_ARGS+=(model.json.sig "$(local_sha256 "$BUNDLE/model.json.sig")")
	elif [[ $REQUIRE_SIGNATURE == 1 ]]; then
		die "$BUNDLE is unsigned (no model.json.sig) and --require-signature is set; sign it with: mushcam-train sign $BUNDLE --key KEY"
	fi
}

local_sha256() {
	if command -v sha256sum >/dev/null; then
		sha256sum -- "$1" | cut -d' ' -f1
	else
		shasum -a 256 -- "$1" | cut -d' ' -f1 # macOS
	fi
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
	prepare) r_prepare "$@" ;;
	clear_partial) r_clear_partial "$@" ;;
	finalize) r_finalize "$@" ;;
	verify) r_verify "$@" ;;
	selftest) r_selftest "$@" ;;
	point) r_point "$@" ;;
	health) r_health "$@" ;;
	mark_failed) r_mark_failed "$@" ;;
	prune) r_prune "$@" ;;
	rollback_target) r_rollback_target "$@" ;;
	*)
		echo "flash agent: unknown step $op" >&2
		return 2
		;;
	esac
}

# Name of the release `current` points at, or nothing.
r_current() {
	local target
	target=$(readlink -- "$1/current" 2>/dev/null) || return 0
	echo "${target##*/}"
}

r_prepare() {
	local root=$1 name=$2
	command -v sha256sum >/dev/null || {
		echo "sha256sum not found on the device (install coreutils)" >&2
		return 1
	}
	command -v python3 >/dev/null || {
		echo "python3 not found on the device (the mushcam daemon needs it too)" >&2
		return 1
	}
	if [[ ! -d $root ]]; then
		echo "model root $root does not exist on the device: run deploy/install.sh there, or check --model-root" >&2
		return 1
	fi
	if [[ -e $root/current && ! -L $root/current ]]; then
		echo "$root/current is not a symlink; move it into $root/releases/ and link it" >&2
		return 1
	fi
	mkdir -p -- "$root/releases"
	[[ -w $root/releases ]] || {
		echo "$root/releases is not writable by $(id -un)" >&2
		return 1
	}
	echo "current=$(r_current "$root")"
	if [[ -d $root/releases/$name ]]; then echo "exists=1"; else echo "exists=0"; fi
	if command -v rsync >/dev/null; then echo "rsync=1"; else echo "rsync=0"; fi
}

r_clear_partial() {
	rm -rf -- "$1/releases/$2.partial"
}

r_finalize() {
	local rel=$1/releases/$2
	# Readable by the daemon's user, writable only by the deploying one, whatever the workstation's modes.
	chmod -R u=rwX,go=rX -- "$rel.partial"
	mv -T -- "$rel.partial" "$rel"
	# mtime = when the release arrived (rsync copied the bundle's own mtime); pruning and
	# rollback order releases by it.
	touch -- "$rel"
}

# DIR then pairs FILE SHA256: print every mismatch, fail if any.
r_verify() {
	local dir=$1 bad=0 file want got
	shift
	while [[ $# -ge 2 ]]; do
		file=$1 want=$2
		shift 2
		if [[ ! -f $dir/$file ]]; then
			echo "$file: missing on the device"
			bad=1
			continue
		fi
		got=$(sha256sum -- "$dir/$file")
		got=${got%% *}
		if [[ $got != "$want" ]]; then
			echo "$file: sha256 mismatch (device ${got:0:12}, expected ${want:0:12})"
			bad=1
		fi
	done
	return "$bad"
}

# DIR MUSHCAM CONFIG [ARGS...]: the device's own selftest of the release. With the daemon's config
# (if present) the selftest enforces the same signature policy the daemon will at reload.
r_selftest() {
	local dir=$1 config=$3 cmd=()
	read -r -a cmd <<<"$2"
	shift 3
	if [[ -n $config && -f $config ]]; then
		set -- --config "$config" "$@"
	fi
	"${cmd[@]}" selftest --model "$dir" "$@" 2>&1
}

# Point `current` at releases/NAME (atomically: a new link renamed over the old), or remove it if
# NAME is empty (restoring a device that had no release before).
r_point() {
	local root=$1 name=$2 tmp
	if [[ -z $name ]]; then
		rm -f -- "$root/current"
		return 0
	fi
	[[ -d $root/releases/$name ]] || {
		echo "$root/releases/$name does not exist" >&2
		return 1
	}
	tmp=$root/.current.$$
	ln -sfn -- "releases/$name" "$tmp"
	mv -T -- "$tmp" "$root/current"
	touch -- "$root/releases/$name"
}

# STATUS CARD SINCE: exit 0 if the status file reports the card's model from a running daemon, 2 (and
# say why) if the daemon wrote after SINCE (epoch s; 0 = never) that it refused to reload, 1 otherwise.
r_status_matches() {
	python3 -c '
import json, sys
from datetime import datetime
try:
    with open(sys.argv[2], encoding="utf-8") as f:
        card = json.load(f)
    with open(sys.argv[1], encoding="utf-8") as f:
        status = json.load(f)
    if (status.get("state") == "running"
            and status.get("model_sha256") == card["files"]["model.tflite"]
            and status.get("model_version") == card["version"]
            and isinstance(status.get("pid"), int) and status["pid"] > 0):
        sys.exit(0)
    since = int(sys.argv[3])
    error = status.get("last_reload_error")
    if since and error and datetime.fromisoformat(status["updated"]).timestamp() >= since:
        print(f"the daemon refused the reload: {error}")
        sys.exit(2)
except (OSError, ValueError, KeyError, TypeError, AttributeError):
    pass
sys.exit(1)
' "$1" "$2" "$3"
}

# STATUS SYSTEMCTL SERVICE ROOT TIMEOUT RELOAD: optionally reload, then wait until the service is
# active and reports current's model; print the status file on one line after "STATUS ".
r_health() {
	local status=$1 service=$3 root=$4 timeout=$5 reload=$6 sc=() deadline state since=0 rc
	read -r -a sc <<<"$2"
	if [[ $reload == 1 ]]; then
		since=$(date +%s)
		# A stopped service (a fresh install, a crash) is started on the new model rather than
		# reloaded: the device should end up serving either way.
		local action=reload
		"${sc[@]}" is-active --quiet "$service" || action=start
		if ! "${sc[@]}" "$action" "$service" 2>&1; then
			echo "'$2 $action $service' failed"
			return 1
		fi
	fi
	deadline=$((SECONDS + timeout))
	while true; do
		# `reload` only sends SIGHUP (Type=notify, ExecReload=kill -HUP): the daemon reloads after the
		# command returns, so wait for its status file rather than trusting the exit code.
		if "${sc[@]}" is-active --quiet "$service"; then
			rc=0
			r_status_matches "$status" "$root/current/model.json" "$since" || rc=$?
			if [[ $rc == 0 ]]; then
				printf 'STATUS %s\n' "$(tr -d '\n' <"$status")"
				return 0
			fi
			[[ $rc == 2 ]] && return 1
		fi
		if [[ $SECONDS -ge $deadline ]]; then
			state=$("${sc[@]}" is-active "$service" 2>&1) || true
			echo "after ${timeout}s $service is '${state:-unknown}' and $status does not report $(r_current "$root"): $(tr -d '\n' <"$status" 2>/dev/null || echo 'no status file')"
			return 1
		fi
		sleep 0.25
	done
}

r_mark_failed() {
	local root=$1 name=$2 rel
	rel=$root/releases/$name
	if [[ $(r_current "$root") == "$name" ]]; then
		echo "not marking $name failed: it is current" >&2
		return 1
	fi
	if [[ -d $rel || -d $rel.partial ]]; then
		rm -rf -- "$rel.failed"
		if [[ -d $rel ]]; then mv -T -- "$rel" "$rel.failed"; else mv -T -- "$rel.partial" "$rel.failed"; fi
		touch -- "$rel.failed"
	fi
}

# Keep the newest KEEP good releases (current counts and is never removed), the newest KEEP failed
# ones (for a post-mortem), and no stale .partial copies.
r_prune() {
	local root=$1 keep=$2 current dir name good=0 failed=0
	current=$(r_current "$root")
	[[ -n $current ]] && good=1
	while IFS= read -r name; do
		name=${name%/}
		dir=$root/releases/$name
		[[ $name == "$current" ]] && continue
		case $name in
		*.partial) rm -rf -- "$dir" && echo "removed stale $name" ;;
		*.failed)
			failed=$((failed + 1))
			if [[ $failed -gt $keep ]]; then rm -rf -- "$dir" && echo "removed $name"; fi
			;;
		*)
			good=$((good + 1))
			if [[ $good -gt $keep ]]; then rm -rf -- "$dir" && echo "removed $name"; fi
			;;
		esac
	done < <(cd -- "$root/releases" && ls -1dt -- */ 2>/dev/null)
}

# Print current's name and the newest good release that is not current (the rollback target).
r_rollback_target() {
	local root=$1 current name
	current=$(r_current "$root")
	[[ -n $current ]] || {
		echo "$root/current does not exist: nothing to roll back" >&2
		return 1
	}
	echo "current=$current"
	while IFS= read -r name; do
		name=${name%/}
		case $name in *.partial | *.failed | "$current") continue ;; esac
		[[ -f $root/releases/$name/model.json ]] || continue
		echo "target=$name"
		return 0
	done < <(cd -- "$root/releases" && ls -1dt -- */ 2>/dev/null)
	echo "no earlier good release in $root/releases to roll back to" >&2
	return 1
}
}

# ---------------------------------------------------------------------------------------------------
# Local side of one host. Runs in a background subshell: globals set here stay in it.

WORK=
IDX=0
LABEL=
SSH_HOST=
COPY_HOST=
PORT=
HOST_SSH=()
SELFTEST_ARGS=()

say() {
	printf '[%s] %s\n' "$LABEL" "$*" >&2
}

# Single-quote for the remote shell (ssh passes one command string).
shq() {
	printf "'%s'" "${1//\'/\'\\\'\'}"
}

agent_source() {
	declare -f r_main r_current r_prepare r_clear_partial r_finalize r_verify r_selftest r_point \
		r_status_matches r_health r_mark_failed r_prune r_rollback_target
	# </dev/null: nothing the agent runs may eat the rest of the script from bash's stdin.
	echo 'r_main "$@" </dev/null'
}

remote() {
	local command_line="bash -s --" arg
	for arg in "$@"; do command_line+=" $(shq "$arg")"; done
	# shellcheck disable=SC2029  # expanding here is the point: every argument is already quoted by shq.
	agent_source | ssh "${HOST_SSH[@]}" "$SSH_HOST" "$command_line"
}

# Run a remote step, capturing its output in REPLY_OUT; log it when it fails.
REPLY_OUT=
step() {
	local rc=0 line
	REPLY_OUT=$(remote "$@" 2>&1) || rc=$?
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

record() { # STATUS RELEASE DETAIL
	printf '%s\t%s\t%s\n' "$1" "$2" "$3" >"$WORK/result.$IDX"
}

kv() { # KEY TEXT: value of KEY=... in TEXT
	local line
	while IFS= read -r line; do
		[[ $line == "$1="* ]] && printf '%s' "${line#*=}" && return 0
	done <<<"$2"
	return 0
}

setup_host() {
	local words=() w
	mapfile -t words < <(split_words "$1")
	LABEL=${words[0]}
	IFS=$'\t' read -r SSH_HOST COPY_HOST PORT <<<"$(parse_target "${words[0]}")"
	for w in "${words[@]:1}"; do
		case ${w%%=*} in
		model_root) MODEL_ROOT=${w#*=} ;;
		status_file) STATUS_FILE=${w#*=} ;;
		mushcam) MUSHCAM=${w#*=} ;;
		systemctl) SYSTEMCTL=${w#*=} ;;
		service) SERVICE=${w#*=} ;;
		allowed_signers) ALLOWED_SIGNERS=${w#*=} ;;
		config) DEVICE_CONFIG=${w#*=} ;;
		rsync_path) RSYNC_PATH=${w#*=} ;;
		esac
	done
	# One SSH connection per device, reused by every step (a Wi-Fi handshake costs ~1 s each).
	HOST_SSH=("${SSH_OPTS[@]}" -o ControlMaster=auto -o "ControlPath=$WORK/cm.$IDX" -o ControlPersist=60)
	if [[ -n $PORT ]]; then HOST_SSH+=(-p "$PORT"); fi
}

close_connection() {
	ssh "${HOST_SSH[@]}" -O exit "$SSH_HOST" >/dev/null 2>&1 || true
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

transfer() { # METHOD
	local dest=$MODEL_ROOT/releases/$RELEASE.partial
	if [[ $1 == rsync ]]; then
		# -rt, not -a: the device's files belong to the deploying user, not to a workstation uid,
		# and a symlink in a bundle is skipped rather than recreated on the device.
		local args=(-rt --partial --delete --timeout=60 -e "$(rsync_rsh)")
		[[ -n $RSYNC_PATH ]] && args+=(--rsync-path="$RSYNC_PATH")
		rsync "${args[@]}" -- "$BUNDLE/" "$COPY_HOST:$dest/" 2>&1
	else
		local args=(-q -r -p) opts=("${HOST_SSH[@]}")
		# scp spells the port -P; the rest of the ssh options are shared.
		local i
		for i in "${!opts[@]}"; do [[ ${opts[$i]} == -p ]] && opts[i]=-P; done
		step clear_partial "$MODEL_ROOT" "$RELEASE" || return 1
		scp "${args[@]}" "${opts[@]}" -- "$BUNDLE" "$COPY_HOST:$dest" 2>&1
	fi
}

selftest_args() {
	SELFTEST_ARGS=("$MODEL_ROOT/releases/$RELEASE" "$MUSHCAM" "$DEVICE_CONFIG")
	if [[ $REQUIRE_SIGNATURE == 1 ]]; then
		SELFTEST_ARGS+=(--require-signature --allowed-signers "$ALLOWED_SIGNERS")
	fi
}

serving() { # health output -> "version (sha12), pid N"
	python3 -c '
import json, sys
for line in sys.argv[1].splitlines():
    if line.startswith("STATUS "):
        try:
            s = json.loads(line[7:])
            print("%s (%s), pid %s" % (s.get("model_version"), str(s.get("model_sha256"))[:12], s.get("pid")))
        except ValueError:
            break
        sys.exit(0)
print("?")
' "$1"
}

# After a failed step: back to PREVIOUS, mark RELEASE failed, reload, and record why.
undo() { # PREVIOUS SWITCHED(0/1) WHAT
	local previous=$1 switched=$2 what=$3 note
	if [[ $switched == 1 ]]; then
		if step point "$MODEL_ROOT" "$previous"; then
			note="current back to ${previous:-nothing}"
			if [[ -n $previous ]]; then
				if step health "$STATUS_FILE" "$SYSTEMCTL" "$SERVICE" "$MODEL_ROOT" "$TIMEOUT" 1; then
					note+=", serving $(serving "$REPLY_OUT")"
				else
					note+=", BUT the daemon does not report it: $(last_line "$REPLY_OUT")"
				fi
			fi
		else
			note="COULD NOT restore current to ${previous:-nothing}: $(last_line "$REPLY_OUT")"
		fi
	else
		note="current untouched (${previous:-none})"
	fi
	step mark_failed "$MODEL_ROOT" "$RELEASE" || note+="; could not mark it failed"
	say "FAILED: $what; $note"
	record FAILED "$RELEASE" "$what; $note"
}

flash_host() {
	local prep previous exists method rc=0 out line
	setup_host "$1"
	record FAILED "$RELEASE" "stopped unexpectedly"
	if [[ $DRY_RUN == 1 ]]; then
		say "would copy $BUNDLE to $COPY_HOST:$MODEL_ROOT/releases/$RELEASE.partial ($TRANSFER), rename it, check $((${#VERIFY_ARGS[@]} / 2)) sha256s, run '$MUSHCAM selftest --model $MODEL_ROOT/releases/$RELEASE', switch $MODEL_ROOT/current, '$SYSTEMCTL reload $SERVICE', wait ${TIMEOUT}s for $STATUS_FILE, keep $KEEP releases"
		record "would flash" "$RELEASE" "dry run: nothing done"
		return 0
	fi

	say "connecting"
	if ! step prepare "$MODEL_ROOT" "$RELEASE"; then
		record FAILED "$RELEASE" "connect/prepare: $(last_line "$REPLY_OUT")"
		close_connection
		return 0
	fi
	prep=$REPLY_OUT
	previous=$(kv current "$prep")
	exists=$(kv exists "$prep")

	if [[ $previous == "$RELEASE" ]]; then
		say "$RELEASE is already current; checking it"
		if ! step verify "$MODEL_ROOT/releases/$RELEASE" "${VERIFY_ARGS[@]}"; then
			# Do not undo: it is what the device runs, and there is nothing better to go back to here.
			record FAILED "$RELEASE" "already current but its files differ from the card: $(last_line "$REPLY_OUT"); flash another release or fix by hand"
		elif step health "$STATUS_FILE" "$SYSTEMCTL" "$SERVICE" "$MODEL_ROOT" 2 0 ||
			step health "$STATUS_FILE" "$SYSTEMCTL" "$SERVICE" "$MODEL_ROOT" "$TIMEOUT" 1; then
			record unchanged "$RELEASE" "already current, serving $(serving "$REPLY_OUT")"
		else
			record FAILED "$RELEASE" "already current but the daemon does not report it: $(last_line "$REPLY_OUT")"
		fi
		close_connection
		return 0
	fi

	if [[ $exists == 1 ]]; then
		say "$RELEASE already on the device; not copying again"
	else
		method=$TRANSFER
		if [[ $method == auto ]]; then
			method=scp
			if command -v rsync >/dev/null && { [[ $(kv rsync "$prep") == 1 ]] || [[ -n $RSYNC_PATH ]]; }; then
				method=rsync
			fi
		fi
		say "copying with $method to $MODEL_ROOT/releases/$RELEASE.partial"
		out=$(transfer "$method") || rc=$?
		if [[ $rc -ne 0 ]]; then
			[[ -n $out ]] && while IFS= read -r line; do say "  $line"; done <<<"$out"
			# Not the release's fault: leave the .partial copy for the next run to resume.
			say "FAILED: copy did not complete; current untouched"
			record FAILED "$RELEASE" "copy ($method) failed: $(last_line "$out"); current untouched (${previous:-none})"
			close_connection
			return 0
		fi
		if ! step finalize "$MODEL_ROOT" "$RELEASE"; then
			record FAILED "$RELEASE" "rename of the copy failed: $(last_line "$REPLY_OUT"); current untouched"
			close_connection
			return 0
		fi
	fi

	say "checking sha256s on the device"
	if ! step verify "$MODEL_ROOT/releases/$RELEASE" "${VERIFY_ARGS[@]}"; then
		undo "$previous" 0 "sha256 check: $(last_line "$REPLY_OUT")"
		close_connection
		return 0
	fi

	say "running the selftest"
	selftest_args
	if ! step selftest "${SELFTEST_ARGS[@]}"; then
		undo "$previous" 0 "selftest: $(last_line "$REPLY_OUT")"
		close_connection
		return 0
	fi

	say "switching current from ${previous:-nothing} to $RELEASE"
	if ! step point "$MODEL_ROOT" "$RELEASE"; then
		undo "$previous" 0 "switch: $(last_line "$REPLY_OUT")"
		close_connection
		return 0
	fi

	say "reloading $SERVICE and waiting for it to report $RELEASE"
	if ! step health "$STATUS_FILE" "$SYSTEMCTL" "$SERVICE" "$MODEL_ROOT" "$TIMEOUT" 1; then
		undo "$previous" 1 "health: $(last_line "$REPLY_OUT")"
		close_connection
		return 0
	fi
	local now
	now=$(serving "$REPLY_OUT")

	if step prune "$MODEL_ROOT" "$KEEP"; then
		[[ -n $REPLY_OUT ]] && while IFS= read -r line; do say "  $line"; done <<<"$REPLY_OUT"
	else
		say "warning: pruning old releases failed"
	fi
	say "ok: serving $now"
	record ok "$RELEASE" "serving $now (was ${previous:-nothing})"
	close_connection
}

rollback_host() {
	local current target
	setup_host "$1"
	record FAILED "-" "stopped unexpectedly"
	if ! step rollback_target "$MODEL_ROOT"; then
		record FAILED "-" "rollback: $(last_line "$REPLY_OUT")"
		close_connection
		return 0
	fi
	current=$(kv current "$REPLY_OUT")
	target=$(kv target "$REPLY_OUT")
	if [[ $DRY_RUN == 1 ]]; then
		record "would roll back" "$target" "dry run: from $current"
		close_connection
		return 0
	fi
	say "rolling back from $current to $target"
	RELEASE=$current
	if ! step point "$MODEL_ROOT" "$target"; then
		record FAILED "$current" "rollback switch: $(last_line "$REPLY_OUT")"
	elif step health "$STATUS_FILE" "$SYSTEMCTL" "$SERVICE" "$MODEL_ROOT" "$TIMEOUT" 1; then
		local now
		now=$(serving "$REPLY_OUT")
		# The release we left is marked so that the next rollback goes further back, not forth.
		step mark_failed "$MODEL_ROOT" "$current" || say "warning: could not mark $current failed"
		say "ok: serving $now"
		record "rolled back" "$target" "serving $now; $current marked .failed"
	else
		# Rollback target unhealthy: put back what was serving.
		local why
		why=$(last_line "$REPLY_OUT")
		if step point "$MODEL_ROOT" "$current"; then
			step health "$STATUS_FILE" "$SYSTEMCTL" "$SERVICE" "$MODEL_ROOT" "$TIMEOUT" 1 || true
		fi
		record FAILED "$current" "$target did not come up ($why); current back to $current"
	fi
	close_connection
}

summary() {
	local i status release detail rows=() failed=0 w1=4 w2=6 w3=7 label words=()
	for i in "${!HOST_LINES[@]}"; do
		mapfile -t words < <(split_words "${HOST_LINES[$i]}")
		label=${words[0]}
		if [[ -f $WORK/result.$i ]]; then
			IFS=$'\t' read -r status release detail <"$WORK/result.$i"
		else
			status=FAILED release=- detail="no result (interrupted?)"
		fi
		[[ $status == FAILED ]] && failed=1
		rows+=("$label"$'\t'"$status"$'\t'"$release"$'\t'"$detail")
		((${#label} > w1)) && w1=${#label}
		((${#status} > w2)) && w2=${#status}
		((${#release} > w3)) && w3=${#release}
	done
	printf '\n%-*s  %-*s  %-*s  %s\n' "$w1" HOST "$w2" RESULT "$w3" RELEASE DETAIL
	local row h s r d
	for row in "${rows[@]}"; do
		IFS=$'\t' read -r h s r d <<<"$row"
		printf '%-*s  %-*s  %-*s  %s\n' "$w1" "$h" "$w2" "$s" "$w3" "$r" "$d"
	done
	return "$failed"
}

main() {
	parse_args "$@"
	command -v ssh >/dev/null || die "ssh not found (install openssh-client)"
	if [[ $ROLLBACK == 0 ]]; then
		load_bundle
		printf '%s: %s as release %s to %d host(s)\n' "$PROG" "$BUNDLE" "$RELEASE" "${#HOST_LINES[@]}" >&2
	fi
	# Control sockets live here: keep the path short (unix socket paths are limited to ~100 bytes).
	WORK=$(mktemp -d /tmp/flash.XXXXXX)
	trap 'rm -rf -- "$WORK"' EXIT
	trap 'trap - INT TERM; kill $(jobs -p) 2>/dev/null; exit 130' INT TERM

	local running=0
	for IDX in "${!HOST_LINES[@]}"; do
		if ((running >= PARALLEL)); then
			wait -n || true
			running=$((running - 1))
		fi
		if [[ $ROLLBACK == 1 ]]; then
			rollback_host "${HOST_LINES[$IDX]}" &
		else
			flash_host "${HOST_LINES[$IDX]}" &
		fi
		running=$((running + 1))
	done
	wait || true

	if summary; then exit 0; else exit 1; fi
}

main "$@"

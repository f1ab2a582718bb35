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

Push a model bundle (a directory with model.json + model.tflite, regular files only) to mushcam
devices. For each host, up to --parallel at a time, `MUSHCAM release receive` on the device takes the
lock on MODEL_ROOT for the whole flash (a second flash to the same device fails at once), then:
  1. this script copies the bundle into MODEL_ROOT/releases/<version>-<sha12>.partial/
     (<version> from the card, <sha12> = first 12 hex of model.tflite's sha256 in the card);
  2. the device copies that into the store and verifies the copy: every sha256 in the card, the card
     (and signature) against the local ones, the signature policy, and the selftest on its samples;
  3. it switches MODEL_ROOT/current to the release atomically (a new symlink renamed over the old);
  4. `SYSTEMCTL reload SERVICE` (or start, if it is not running) and waits until the service is active
     and its status file, written after the reload by systemd's MainPID, reports this release.
If any step fails, `current` goes back to the previous release (reloaded), the new release is renamed
<name>.failed, and the device keeps serving what it served before. A copy cut off midway leaves only
<name>.partial (resumed by the next run). After a success the last --keep releases are kept
(never current's target). Re-running with the release already current just checks it.

HOST is user@host[:port], host, or an ssh_config alias. SSH uses keys only (BatchMode=yes). Two
hosts that `ssh -G` resolves to the same host name and port with the same model root are refused.

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
EOF
	shared_option_help
	cat <<'EOF'

Exit status: 0 every host ok, 1 any host failed, 2 usage error or bad bundle.
Needs bash >= 4.3, ssh, python3 and rsync or scp here; mushcam (deploy/install.sh) on the device.
EOF
}

# shellcheck source-path=SCRIPTDIR source=ssh-common.sh
# readlink -f: a symlink to this script (e.g. in ~/bin) still finds its neighbour.
source "$(dirname -- "$(readlink -f -- "${BASH_SOURCE[0]}")")/ssh-common.sh"

# ---------------------------------------------------------------------------------------------------
# Settings (per-host overrides come from the inventory; the SSH ones are in ssh-common.sh).
MODEL_ROOT=/var/lib/mushcam/models
STATUS_FILE=/run/mushcam/status.json
MUSHCAM=mushcam
SYSTEMCTL=systemctl
SERVICE=mushcam
ALLOWED_SIGNERS=/etc/mushcam/allowed_signers
DEVICE_CONFIG=/etc/mushcam/config.toml
REQUIRE_SIGNATURE=0
KEEP=3
TIMEOUT=30
DRY_RUN=0
ROLLBACK=0
ROLLBACK_HOSTS=()
BUNDLE=
readonly INVENTORY_KEYS="model_root status_file mushcam systemctl service allowed_signers config rsync_path"

script_option() {
	case $1 in
	--dry-run) DRY_RUN=1 ;;
	--rollback) need_value "$@"; ROLLBACK=1; ROLLBACK_HOSTS+=("$2"); TOOK_VALUE=1 ;;
	--model-root) need_value "$@"; MODEL_ROOT=$2; TOOK_VALUE=1 ;;
	--status-file) need_value "$@"; STATUS_FILE=$2; TOOK_VALUE=1 ;;
	--mushcam) need_value "$@"; MUSHCAM=$2; TOOK_VALUE=1 ;;
	--systemctl) need_value "$@"; SYSTEMCTL=$2; TOOK_VALUE=1 ;;
	--service) need_value "$@"; SERVICE=$2; TOOK_VALUE=1 ;;
	--keep) need_value "$@"; KEEP=$2; TOOK_VALUE=1 ;;
	--timeout) need_value "$@"; TIMEOUT=$2; TOOK_VALUE=1 ;;
	--require-signature) REQUIRE_SIGNATURE=1 ;;
	--allowed-signers) need_value "$@"; ALLOWED_SIGNERS=$2; TOOK_VALUE=1 ;;
	--device-config) need_value "$@"; DEVICE_CONFIG=$2; TOOK_VALUE=1 ;;
	*) return 1 ;;
	esac
}

parse_args() {
	local arg line first words=()
	parse_options "$@"
	check_shared_values
	[[ $KEEP =~ ^[1-9][0-9]*$ ]] || die "--keep must be a positive integer, not '$KEEP'"
	[[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a positive number of seconds, not '$TIMEOUT'"

	read_inventory
	if [[ $ROLLBACK == 1 ]]; then
		[[ ${#POSITIONAL[@]} -eq 0 ]] || die "--rollback takes no BUNDLE or other hosts: give each host with --rollback HOST"
		# Only the hosts named with --rollback; the inventory only supplies their settings.
		for arg in "${ROLLBACK_HOSTS[@]}"; do
			first=$(printf '%q' "$arg")
			for line in "${INVENTORY_LINES[@]}"; do
				mapfile -t words < <(split_words "$line")
				if [[ ${words[0]} == "$arg" ]]; then
					first=$line
					break
				fi
			done
			HOST_LINES+=("$first")
		done
	else
		[[ ${#POSITIONAL[@]} -ge 1 ]] || die "no BUNDLE given (see --help)"
		BUNDLE=${POSITIONAL[0]%/}
		for arg in "${POSITIONAL[@]:1}"; do HOST_LINES+=("$(printf '%q' "$arg")"); done
		HOST_LINES+=("${INVENTORY_LINES[@]}")
	fi
	# Each host once (see check_duplicates for aliases).
	check_host_lines
}

# The same device under two names (an alias, user@ip:port, ip:port) is refused too: what ssh would
# connect to (`ssh -G` resolves the config without connecting) plus the model root names a device.
check_duplicates() {
	local i words=() ssh_host port root resolved key
	local -A owner=()
	for i in "${!HOST_LINES[@]}"; do
		mapfile -t words < <(split_words "${HOST_LINES[$i]}")
		IFS=$'\t' read -r ssh_host _ port <<<"$(parse_target "${words[0]}")"
		root=$(host_setting model_root "$MODEL_ROOT" "${words[@]:1}")
		local args=("${SSH_OPTS[@]}")
		[[ -n $port ]] && args+=(-p "$port")
		resolved=$(ssh -G "${args[@]}" -- "$ssh_host" 2>/dev/null |
			awk '$1 == "hostname" { h = $2 } $1 == "port" { p = $2 } END { if (h != "") print h ":" p }') ||
			true
		[[ -n $resolved ]] || die "cannot resolve host ${words[0]} with ssh -G (check -F / ssh_config)"
		key="$resolved $root"
		[[ -z ${owner[$key]:-} ]] ||
			die "hosts ${owner[$key]} and ${words[0]} are the same device ($resolved, model root $root): listed twice"
		owner[$key]=${words[0]}
	done
}

# host_setting KEY DEFAULT WORD...: KEY=value from an inventory line's settings, else DEFAULT.
host_setting() {
	local key=$1 value=$2 w
	shift 2
	for w in "$@"; do [[ $w == "$key="* ]] && value=${w#*=}; done
	printf '%s' "$value"
}

# ---------------------------------------------------------------------------------------------------
# The local bundle: read the card once, refuse early what no device should receive.
CARD_VERSION=
CARD_SHA=
CARD_FILE_SHA=
SIG_FILE_SHA=
FILE_COUNT=0
RELEASE=

load_bundle() {
	[[ -d $BUNDLE ]] || die "bundle $BUNDLE is not a directory"
	[[ -f $BUNDLE/model.json ]] || die "$BUNDLE/model.json not found: is $BUNDLE a model bundle?"
	command -v python3 >/dev/null || die "python3 not found (needed to read the model card)"
	local out line
	# The device verifies the copy it serves; here: the card's shape (read once: its hash is of the
	# bytes parsed), that the files exist, and nothing but regular files and folders, before any copy
	# (scp follows a symlink: a bundle's link to ~/.ssh/id_ed25519 would publish the key).
	out=$(python3 -c '
import hashlib, json, os, re, stat, sys
bundle = sys.argv[1]
def fail(msg):
    print(f"{bundle}/{msg}", file=sys.stderr)
    sys.exit(2)
for top, dirs, files in os.walk(bundle):
    for name in sorted(dirs + files):
        path = os.path.join(top, name)
        mode = os.lstat(path).st_mode
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            kind = "a symlink" if stat.S_ISLNK(mode) else "a special file"
            fail(f"{os.path.relpath(path, bundle)} is {kind}: a bundle holds only regular files and folders; refused before any copy")
def digest(name):
    with open(f"{bundle}/{name}", "rb") as f:
        data = f.read((1 << 20) + 1)
    if len(data) > 1 << 20:
        fail(f"{name}: larger than 1 MB; not a model card")
    return data, hashlib.sha256(data).hexdigest()
try:
    data, card_sha = digest("model.json")
    card = json.loads(data)
except (OSError, ValueError, RecursionError) as err:
    fail(f"model.json: unreadable ({str(err)[:200]}); re-export the bundle")
if not isinstance(card, dict) or card.get("format") != "mushcam-bundle/1":
    fail("model.json: format is not mushcam-bundle/1; re-export the bundle")
version = card.get("version")
if not isinstance(version, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}", version):
    fail(f"model.json: version {version!r:.120} is not a plain name (letters, digits, . _ + -)")
files = card.get("files")
if not isinstance(files, dict) or not isinstance(files.get("model.tflite"), str):
    fail("model.json: files has no model.tflite sha256")
print(f"version\t{version}")
print(f"card\t{card_sha}")
if os.path.isfile(f"{bundle}/model.json.sig"):
    print("sig\t" + digest("model.json.sig")[1])
for name, sha in files.items():
    parts = name.split("/")
    if (not re.fullmatch(r"[A-Za-z0-9._/-]+", name) or name.startswith("/")
            or ".." in parts or "" in parts or "." in parts):
        fail(f"model.json: files entry {name!r:.120} is not a plain relative path")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        fail(f"model.json: files[{name!r}] is not a sha256 hex digest")
    print(f"file\t{name}\t{sha}")
' "$BUNDLE")
	while IFS=$'\t' read -r -a line; do
		case ${line[0]} in
		version) CARD_VERSION=${line[1]} ;;
		card) CARD_FILE_SHA=${line[1]} ;;
		sig) SIG_FILE_SHA=${line[1]} ;;
		file)
			[[ -f $BUNDLE/${line[1]} ]] || die "$BUNDLE/${line[1]}: listed in the card but missing"
			[[ ${line[1]} == model.tflite ]] && CARD_SHA=${line[2]}
			FILE_COUNT=$((FILE_COUNT + 1))
			;;
		esac
	done <<<"$out"
	RELEASE=$CARD_VERSION-${CARD_SHA:0:12}
	if [[ -z $SIG_FILE_SHA && $REQUIRE_SIGNATURE == 1 ]]; then
		die "$BUNDLE is unsigned (no model.json.sig) and --require-signature is set; sign it with: mushcam-train sign $BUNDLE --key KEY"
	fi
}

# ---------------------------------------------------------------------------------------------------
# One host. Runs in a background subshell: globals set here stay in it. Everything that changes the
# device is done there by `mushcam release` (device/release.py); this side copies and reports.

# The command line for `MUSHCAM ARGS...` on the device, every word quoted.
device_command() {
	local words=() out="" arg
	read -r -a words <<<"$MUSHCAM"
	for arg in "${words[@]}" "$@"; do out+="$(shq "$arg") "; done
	printf '%s' "${out% }"
}

# Options every `mushcam release` command on the device takes.
service_args() {
	SERVICE_ARGS=(--root "$MODEL_ROOT" --config "$DEVICE_CONFIG" --systemctl "$SYSTEMCTL" --service "$SERVICE"
		--status-file "$STATUS_FILE" --timeout "$TIMEOUT")
	if [[ $REQUIRE_SIGNATURE == 1 ]]; then
		SERVICE_ARGS+=(--require-signature --allowed-signers "$ALLOWED_SIGNERS")
	fi
}
SERVICE_ARGS=()

remote() {
	# shellcheck disable=SC2029  # expanding here is the point: device_command quoted every word.
	ssh "${HOST_SSH[@]}" -- "$SSH_HOST" "$(device_command "$@")" </dev/null
}

record() { # STATUS RELEASE DETAIL
	printf '%s\t%s\t%s\n' "$(clean "$1")" "$(clean "$2")" "$(clean "$3")" >"$WORK/result.$IDX"
}

kv() { # KEY TEXT: value of KEY=... among TEXT's tab-separated fields
	local field fields=()
	IFS=$'\t' read -r -a fields <<<"$2"
	for field in "${fields[@]}"; do
		[[ $field == "$1="* ]] && printf '%s' "${field#*=}" && return 0
	done
	return 0
}

host_option() { # KEY VALUE
	case $1 in
	model_root) MODEL_ROOT=$2 ;;
	status_file) STATUS_FILE=$2 ;;
	mushcam) MUSHCAM=$2 ;;
	systemctl) SYSTEMCTL=$2 ;;
	service) SERVICE=$2 ;;
	allowed_signers) ALLOWED_SIGNERS=$2 ;;
	config) DEVICE_CONFIG=$2 ;;
	rsync_path) RSYNC_PATH=$2 ;;
	esac
}

transfer() { # METHOD
	local dest=$MODEL_ROOT/releases/$RELEASE.partial
	if [[ $1 == rsync ]]; then
		# -rt, not -a: the device's files belong to the deploying user, not to a workstation uid.
		local args=(-rt --partial --delete --timeout=60 -e "$(rsync_rsh)")
		[[ -n $RSYNC_PATH ]] && args+=(--rsync-path="$RSYNC_PATH")
		rsync "${args[@]}" -- "$BUNDLE/" "$COPY_HOST:$dest/" 2>&1
	else
		scp_options
		scp -q -r -p "${SCP_OPTS[@]}" -- "$BUNDLE" "$COPY_HOST:$dest" 2>&1
	fi
}

# Read the device's lines until one starting with WANT (or RESULT) or the end; log the others.
# Sets LINE to that line ("" at the end) and LAST to the last other line.
LINE=
LAST=
read_until() { # FD WANT
	local line
	LINE=
	while IFS= read -r line <&"$1"; do
		case $line in
		"$2"$'\t'* | RESULT$'\t'*)
			LINE=$line
			return 0
			;;
		LOG$'\t'*) say "${line#LOG$'\t'}" ;;
		*)
			say "  $line"
			LAST=$line
			;;
		esac
	done
	return 0
}

# RESULT<TAB>STATUS<TAB>RELEASE<TAB>DETAIL -> the summary row, and a line in the log.
record_result() {
	local status release detail
	IFS=$'\t' read -r _ status release detail <<<"$1"
	record "$status" "$release" "$detail"
	if [[ $status == FAILED ]]; then say "FAILED: $detail"; else say "$status: $detail"; fi
}

flash_host() {
	local to from pid ready method rc=0 out go=$WORK/go.$IDX replies=$WORK/replies.$IDX
	setup_host "$1"
	service_args
	record FAILED "$RELEASE" "stopped unexpectedly"
	if [[ $DRY_RUN == 1 ]]; then
		say "would copy $BUNDLE to $COPY_HOST:$MODEL_ROOT/releases/$RELEASE.partial ($TRANSFER), then run '$MUSHCAM release receive $RELEASE' there: verify the copy and its $FILE_COUNT sha256s, selftest, switch $MODEL_ROOT/current, '$SYSTEMCTL reload $SERVICE', wait ${TIMEOUT}s for $STATUS_FILE, keep $KEEP releases"
		record "would flash" "$RELEASE" "dry run: nothing done"
		return 0
	fi

	say "connecting"
	# A device that hangs up early must not kill this job with SIGPIPE before it records why.
	trap '' PIPE
	# One session for the whole flash: the device holds its lock until this session ends. It says
	# READY (whether to copy), then waits for `go` on its stdin (a fifo here).
	mkfifo "$go" "$replies"
	local receive=(release receive "$RELEASE" --card-sha256 "$CARD_FILE_SHA" --keep "$KEEP" "${SERVICE_ARGS[@]}")
	[[ -n $SIG_FILE_SHA ]] && receive+=(--signature-sha256 "$SIG_FILE_SHA")
	# shellcheck disable=SC2029  # device_command quoted every word.
	ssh "${HOST_SSH[@]}" -- "$SSH_HOST" "$(device_command "${receive[@]}")" <"$go" >"$replies" 2>&1 &
	pid=$!
	exec {to}>"$go" {from}<"$replies"

	read_until "$from" READY
	ready=$LINE
	if [[ $ready != READY$'\t'* ]]; then
		exec {to}>&-
		if [[ -n $ready ]]; then
			record_result "$ready"
		else
			local why=${LAST:-no answer}
			[[ $why == *"command not found"* || $why == *"No such file"* ]] &&
				why+=" (is mushcam installed on the device? deploy/install.sh links it into /usr/local/bin; or give --mushcam)"
			[[ $why == *"No such command"* ]] &&
				why+=" (the device's mushcam predates \`mushcam release\`: run deploy/install.sh there again)"
			record FAILED "$RELEASE" "connect/prepare: $why"
		fi
		exec {from}<&-
		wait "$pid" || true
		close_connection
		return 0
	fi

	if [[ $(kv copy "$ready") == 1 ]]; then
		method=$(copy_method "$(kv rsync "$ready")")
		# scp -r into an existing directory would nest the bundle inside it: the device clears it.
		if [[ $method == scp ]]; then
			printf 'clear\n' >&"$to" || true
			read_until "$from" CLEARED
		fi
		say "copying with $method to $MODEL_ROOT/releases/$RELEASE.partial"
		out=$(transfer "$method") || rc=$?
		if [[ $rc -ne 0 ]]; then
			[[ -n $out ]] && while IFS= read -r line; do say "  $line"; done <<<"$out"
			# Not the release's fault: leave the .partial copy for the next run to resume.
			printf 'abort\n' >&"$to" || true
			exec {to}>&-
			read_until "$from" NONE
			exec {from}<&-
			wait "$pid" || true
			say "FAILED: copy did not complete; current untouched"
			record FAILED "$RELEASE" "copy ($method) failed: $(last_line "$out"); current untouched ($(kv current "$ready" | sed 's/^$/none/'))"
			close_connection
			return 0
		fi
	fi
	printf 'go\n' >&"$to" || true
	exec {to}>&-
	read_until "$from" NONE
	exec {from}<&-
	wait "$pid" || true
	if [[ -n $LINE ]]; then
		record_result "$LINE"
	else
		record FAILED "$RELEASE" "the device stopped answering: ${LAST:-no result}"
	fi
	close_connection
}

rollback_host() {
	local out line
	setup_host "$1"
	service_args
	record FAILED "-" "stopped unexpectedly"
	local args=(release rollback --porcelain "${SERVICE_ARGS[@]}")
	[[ $DRY_RUN == 1 ]] && args+=(--dry-run)
	out=$(remote "${args[@]}" 2>&1) || true
	LINE=
	while IFS= read -r line; do
		case $line in
		RESULT$'\t'*) LINE=$line ;;
		LOG$'\t'*) say "${line#LOG$'\t'}" ;;
		*) [[ -n $line ]] && say "  $line" && LAST=$line ;;
		esac
	done <<<"$out"
	if [[ -n $LINE ]]; then
		record_result "$LINE"
	else
		record FAILED "-" "rollback: ${LAST:-no answer from the device}"
	fi
	close_connection
}

host_job() {
	if [[ $ROLLBACK == 1 ]]; then rollback_host "$1"; else flash_host "$1"; fi
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
	check_duplicates
	if [[ $ROLLBACK == 0 ]]; then
		load_bundle
		printf '%s: %s as release %s to %d host(s)\n' "$PROG" "$BUNDLE" "$RELEASE" "${#HOST_LINES[@]}" >&2
	fi
	start_work flash
	run_jobs

	if summary; then exit 0; else exit 1; fi
}

main "$@"

#!/usr/bin/env bash
# install.sh: set up a Raspberry Pi as a mushcam device. Run on the Pi, as root, from a checkout of the
# repository. Safe to run again (an upgrade): it never overwrites the config or a deployed model.
set -euo pipefail

readonly PROG=${0##*/}
readonly STEPS="apt user dirs venv config model i2c unit"

usage() {
	cat <<EOF
Usage: sudo deploy/install.sh [OPTIONS]

Install the mushcam device software on this Pi (no TensorFlow), in these steps:
  apt     apt packages: python3-picamera2 (the camera, from apt, not pip), python3-venv,
          python3-lgpio (GPIO), i2c-tools, rsync (for deploy/flash.sh)
  user    the service user 'mushcam' (groups gpio, video, i2c)
  dirs    /var/lib/mushcam/models/releases, /var/lib/mushcam/captures, /etc/mushcam
  venv    /opt/mushcam/venv (--system-site-packages, so picamera2 from apt is visible) with this
          checkout pip-installed into it: the device package only, never the 'train' extra;
          /usr/local/bin/mushcam links to its mushcam
  config  /etc/mushcam/config.toml with the defaults, only if it does not exist yet
  model   the checkout's shipped model as the first release (mushcam release install --activate),
          only if no model is current yet
  i2c     load i2c-dev at boot, and enable I2C with raspi-config if it is there
  unit    systemd/mushcam.service installed, enabled and (re)started if a model is current

Options:
  --dry-run            print what would be done, change nothing
  --root DIR           install under DIR instead of / (for tests and image builds; implies
                       --skip apt,user and does not call systemctl)
  --skip STEP[,STEP]   skip steps (of: $STEPS)
  --source DIR         the checkout to install (default: the one holding this script)
  --model DIR          first model bundle (default: SOURCE/models/mushcam-mnv2-7sp, if present)
  --deploy-user USER   let USER (who runs deploy/flash.sh over SSH) own the models and reload the
                       service with sudo; without it, deploy as root
  --no-start           enable the service but do not (re)start it
  -h, --help           this help
EOF
}

die() {
	printf '%s: %s\n' "$PROG" "$*" >&2
	exit 2
}

say() {
	printf '%s: %s\n' "$PROG" "$*" >&2
}

DRY_RUN=0
ROOT=
SKIP=" "
SOURCE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
MODEL=
DEPLOY_USER=
START=1

while [[ $# -gt 0 ]]; do
	case $1 in
	-h | --help) usage; exit 0 ;;
	--dry-run) DRY_RUN=1 ;;
	--root) [[ $# -ge 2 ]] || die "--root needs a directory"; ROOT=${2%/}; shift ;;
	--skip)
		[[ $# -ge 2 ]] || die "--skip needs steps"
		for step in ${2//,/ }; do
			[[ " $STEPS " == *" $step "* ]] || die "unknown step '$step' (steps: $STEPS)"
			SKIP+="$step "
		done
		shift
		;;
	--source) [[ $# -ge 2 ]] || die "--source needs a directory"; SOURCE=$2; shift ;;
	--model) [[ $# -ge 2 ]] || die "--model needs a directory"; MODEL=$2; shift ;;
	--deploy-user) [[ $# -ge 2 ]] || die "--deploy-user needs a user name"; DEPLOY_USER=$2; shift ;;
	--no-start) START=0 ;;
	*) die "unknown argument $1 (see --help)" ;;
	esac
	shift
done

[[ -f $SOURCE/pyproject.toml && -d $SOURCE/device ]] || die "$SOURCE is not a mushcam checkout"
[[ -n $MODEL ]] || MODEL=$SOURCE/models/mushcam-mnv2-7sp
if [[ -n $ROOT ]]; then
	# A tree under --root is not a running system: no packages, users or services to touch.
	SKIP+="apt user "
fi
if [[ $DRY_RUN == 0 && -z $ROOT && $EUID -ne 0 ]]; then
	die "run as root: sudo $0 $*"
fi

readonly OPT_DIR=$ROOT/opt/mushcam
readonly VENV=$OPT_DIR/venv
readonly ETC_DIR=$ROOT/etc/mushcam
readonly STATE_DIR=$ROOT/var/lib/mushcam
readonly MODELS_DIR=$STATE_DIR/models
readonly CAPTURES_DIR=$STATE_DIR/captures
readonly UNIT_PATH=$ROOT/etc/systemd/system/mushcam.service
readonly MODULES_CONF=$ROOT/etc/modules-load.d/mushcam.conf
readonly SUDOERS=$ROOT/etc/sudoers.d/mushcam-deploy
readonly APT_PACKAGES=(python3-picamera2 python3-venv python3-lgpio i2c-tools rsync)
readonly GROUPS_NEEDED=(gpio video i2c)

skipped() { [[ $SKIP == *" $1 "* ]]; }

# Every change goes through run or install_file, so --dry-run shows exactly what would change.
run() {
	printf '+ %s\n' "$*"
	[[ $DRY_RUN == 1 ]] || "$@"
}

# install_file PATH MODE CONTENT: write atomically (temp file + rename) if the content differs.
install_file() {
	local path=$1 mode=$2 content=$3 tmp
	if [[ -f $path && $(cat -- "$path") == "$content" ]]; then
		printf '= %s (unchanged)\n' "$path"
		return 0
	fi
	printf '+ write %s (mode %s)\n' "$path" "$mode"
	[[ $DRY_RUN == 1 ]] && return 0
	mkdir -p -- "$(dirname -- "$path")"
	tmp=$(mktemp "$path.XXXXXX")
	printf '%s\n' "$content" >"$tmp"
	chmod "$mode" "$tmp"
	mv -f -- "$tmp" "$path"
}

user_exists() { id -u "$1" >/dev/null 2>&1; }

step_apt() {
	run apt-get update
	run env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${APT_PACKAGES[@]}"
}

step_user() {
	local group
	# Raspberry Pi OS has these groups (its udev rules give them the device nodes); create them
	# elsewhere so that the unit's SupplementaryGroups= can be resolved.
	for group in "${GROUPS_NEEDED[@]}"; do
		getent group "$group" >/dev/null || run groupadd --system "$group"
	done
	if user_exists mushcam; then
		run usermod --append --groups "$(IFS=,; echo "${GROUPS_NEEDED[*]}")" mushcam
	else
		run useradd --system --user-group --home-dir /var/lib/mushcam --no-create-home \
			--shell /usr/sbin/nologin --groups "$(IFS=,; echo "${GROUPS_NEEDED[*]}")" mushcam
	fi
	if [[ -n $DEPLOY_USER ]]; then
		user_exists "$DEPLOY_USER" || die "deploy user $DEPLOY_USER does not exist"
		local systemctl
		systemctl=$(command -v systemctl || echo /usr/bin/systemctl)
		# Exactly the commands flash.sh runs with --systemctl "sudo -n systemctl"; nothing else.
		install_file "$SUDOERS" 0440 "# deploy/install.sh: $DEPLOY_USER may reload mushcam (deploy/flash.sh)
$DEPLOY_USER ALL=(root) NOPASSWD: $systemctl reload mushcam, $systemctl start mushcam, $systemctl is-active mushcam, $systemctl is-active --quiet mushcam, $systemctl show -p MainPID --value mushcam"
		if [[ $DRY_RUN == 0 ]] && ! visudo -cf "$SUDOERS" >/dev/null; then
			rm -f -- "$SUDOERS"
			die "the sudoers rule for $DEPLOY_USER did not validate; removed it"
		fi
	fi
}

# own [-R] OWNER[:GROUP] PATH: change ownership only where the owner exists (not under --root in
# a test, say).
own() {
	local recursive=()
	if [[ $1 == -R ]]; then
		recursive=(-R)
		shift
	fi
	local owner=${1%%:*} group=
	[[ $1 == *:* ]] && group=${1#*:}
	if [[ -n $ROOT && $EUID -ne 0 ]]; then
		printf '  (not changing owner of %s: not root)\n' "$2"
		return 0
	fi
	# In a dry run on a real system the user would exist by now (the user step comes first).
	if { [[ $DRY_RUN == 1 && -z $ROOT ]]; } ||
		{ user_exists "$owner" && { [[ -z $group ]] || getent group "$group" >/dev/null; }; }; then
		run chown "${recursive[@]}" "$1" "$2"
	else
		printf '  (not changing owner of %s: %s does not exist here)\n' "$2" "$1"
	fi
}

step_dirs() {
	local models_owner=root:root
	[[ -n $DEPLOY_USER ]] && models_owner=$DEPLOY_USER
	# Models: written only by whoever deploys (flash.sh), readable by the daemon (and everyone: a
	# model is not a secret). The daemon's unit mounts them read-only anyway.
	run mkdir -p "$MODELS_DIR/releases" "$CAPTURES_DIR" "$ETC_DIR"
	run chmod 0755 "$STATE_DIR" "$MODELS_DIR" "$MODELS_DIR/releases" "$ETC_DIR"
	own "$models_owner" "$MODELS_DIR"
	own "$models_owner" "$MODELS_DIR/releases"
	# Captures: the daemon's alone (photos may show where someone forages).
	run chmod 0750 "$CAPTURES_DIR"
	own mushcam:mushcam "$CAPTURES_DIR"
}

step_venv() {
	local python=python3 constraint=() numpy_major
	[[ -x $VENV/bin/python ]] || run "$python" -m venv --system-site-packages "$VENV"
	# Bookworm's picamera2 uses apt's numpy 1.x through compiled helpers (simplejpeg, av); numpy 2
	# from PyPI in the venv would shadow it and break them. Keep the venv on numpy 1.x there.
	numpy_major=$("$python" -c 'import numpy; print(numpy.__version__.split(".")[0])' 2>/dev/null || true)
	if [[ $numpy_major == 1 ]]; then
		run mkdir -p "$OPT_DIR"
		install_file "$OPT_DIR/constraints.txt" 0644 "numpy<2"
		constraint=(--constraint "$OPT_DIR/constraints.txt")
	fi
	# A regular (not editable) install of the checkout's base package: no 'train' extra, so no
	# TensorFlow; the venv does not depend on the checkout afterwards.
	run "$VENV/bin/python" -m pip install --upgrade "${constraint[@]}" "$SOURCE"
	# `mushcam` on PATH (flash.sh runs `mushcam release` over SSH; people run `mushcam selftest`). The
	# link names the venv where it will be on the device, also under --root (an image being built).
	run mkdir -p "$ROOT/usr/local/bin"
	run ln -sfn /opt/mushcam/venv/bin/mushcam "$ROOT/usr/local/bin/mushcam"
	if [[ $DRY_RUN == 0 ]] && "$VENV/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("tensorflow") is None)'; then
		say "warning: TensorFlow is importable in $VENV; the device does not need it (was the 'train' extra installed?)"
	fi
}

readonly DEFAULT_CONFIG='# mushcam daemon settings (deploy/install.sh wrote this once; it is never overwritten).
# Check it with: mushcam check-config /etc/mushcam/config.toml
model_dir = "/var/lib/mushcam/models/current"
camera = "picamera2"
frames_per_press = 3
status_file = "/run/mushcam/status.json"
# Refuse bundles whose model.json.sig does not verify against allowed_signers (see docs/deploy.md).
require_signature = false
allowed_signers = "/etc/mushcam/allowed_signers"

[gpio]
# BCM pin numbers (docs/wiring.md)
green = 17
red = 27
amber = 22
button = 5

[display]
kind = "ssd1306"
i2c_port = 1
i2c_address = 0x3C

[captures]
enabled = false
dir = "/var/lib/mushcam/captures"
max_mb = 200'

step_config() {
	if [[ -e $ETC_DIR/config.toml ]]; then
		printf '= %s exists; left as it is\n' "$ETC_DIR/config.toml"
	else
		install_file "$ETC_DIR/config.toml" 0644 "$DEFAULT_CONFIG"
	fi
}

# The first release, so a fresh device answers presses before anyone runs flash.sh. The device's
# release store has one owner, `mushcam release` (device/release.py): it copies the bundle in,
# verifies the copy (hashes, a plain version, no symlinks), self-tests it and switches `current`.
step_model() {
	if [[ -L $MODELS_DIR/current || -e $MODELS_DIR/current ]]; then
		printf '= %s exists; models are deployed with deploy/flash.sh\n' "$MODELS_DIR/current"
		return 0
	fi
	if [[ ! -f $MODEL/model.json ]]; then
		say "no model at $MODEL; deploy one with deploy/flash.sh before starting the service"
		return 0
	fi
	local mushcam=("$VENV/bin/mushcam")
	if [[ ! -x $VENV/bin/mushcam ]] && { [[ $DRY_RUN == 0 ]] || skipped venv; }; then
		# No venv (--skip venv): the checkout's device package on this python3.
		mushcam=(env "PYTHONPATH=$SOURCE" python3 -m device)
	fi
	run "${mushcam[@]}" release install "$MODEL" --root "$MODELS_DIR" --activate --config "$ETC_DIR/config.toml" ||
		die "the first model was refused (above); nothing was installed; fix it or pass --model DIR"
	# flash.sh prunes old releases as the deploy user: it must own them too.
	if [[ -n $DEPLOY_USER ]]; then
		own -R "$DEPLOY_USER" "$MODELS_DIR/releases"
		[[ ! -e $MODELS_DIR/.lock ]] || own "$DEPLOY_USER" "$MODELS_DIR/.lock"
	fi
}

step_i2c() {
	install_file "$MODULES_CONF" 0644 "# mushcam: the display is on I2C
i2c-dev"
	if [[ -z $ROOT ]] && command -v raspi-config >/dev/null; then
		# Sets dtparam=i2c_arm=on in config.txt (takes effect after a reboot).
		run raspi-config nonint do_i2c 0
	fi
}

step_unit() {
	local unit
	unit=$(cat -- "$SOURCE/systemd/mushcam.service")
	install_file "$UNIT_PATH" 0644 "$unit"
	[[ -z $ROOT ]] || return 0
	run systemctl daemon-reload
	run systemctl enable mushcam
	if [[ $START == 0 ]]; then
		say "not starting the service (--no-start)"
	elif [[ -e $MODELS_DIR/current || $DRY_RUN == 1 ]]; then
		# restart, not start: a re-run is an upgrade and must load the new code.
		run systemctl restart mushcam
	else
		say "no model deployed yet: run deploy/flash.sh, then: systemctl start mushcam"
	fi
}

for step in $STEPS; do
	if skipped "$step"; then
		printf '# %s: skipped\n' "$step"
		continue
	fi
	printf '# %s\n' "$step"
	"step_$step"
done
if [[ $DRY_RUN == 1 ]]; then
	say "dry run: nothing changed"
else
	say "done${ROOT:+ (under $ROOT)}"
fi

#!/usr/bin/env bash
# pi-check.sh: prove the device stack on the Pi's architecture (Debian 12 arm64, the base of Raspberry
# Pi OS) in an emulated root, and compare its answers with this machine's.
#
#   deploy/pi-check.sh                 build or refresh the root, install, self-test, compare (make pi-check)
#   deploy/pi-check.sh exec [--bind DIR]... -- CMD...
#                                      run CMD in the root, DIRs bind-mounted read-only at the same path
#                                      (mushcam-train evaluate --arch aarch64 uses this)
#
# Needs root (mount, chroot) and, once: mmdebstrap, qemu-user-static, binfmt-support, arch-test (installed by
# tests/system-deps.sh when missing). The root lives in $PI_CHECK_WORK (default work/pi-root): the
# debootstrapped base as a tarball, keyed by the mmdebstrap recipe; the installed root is rebuilt from
# it whenever this script, deploy/install.sh or pyproject.toml changes, and deploy/install.sh runs again
# on every check (an upgrade, as on a Pi), so the root always holds this checkout's device code.
set -euo pipefail

readonly PROG=${0##*/}
REPO=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO
WORK=${PI_CHECK_WORK:-$REPO/work/pi-root}
readonly MODEL=${MODEL:-models/mushcam-mnv2-7sp}
readonly HOST_VENV=${HOST_VENV:-$REPO/.venv}
readonly SUITE=bookworm
# The CPU qemu emulates: the Pi 4's Cortex-A72 (PI_CPU=cortex-a76 for a Pi 5). qemu's default, "max",
# has int8 dot-product and matrix instructions no Pi 4 has, and XNNPACK picks its int8 kernels (so its
# rounding) by the features it finds.
readonly PI_CPU=${PI_CPU:-cortex-a72}
# python3-numpy: Raspberry Pi OS has apt's numpy 1.x (picamera2 depends on it), which install.sh's
# venv sees through --system-site-packages; passwd: useradd for install.sh's user step.
readonly INCLUDE=python3,python3-venv,python3-pip,python3-numpy,ca-certificates,passwd
readonly MMDEBSTRAP=(mmdebstrap --arch=arm64 --variant=apt "--include=$INCLUDE" "$SUITE")
# Steps of deploy/install.sh that cannot run in a chroot, and why (printed with the results).
readonly SKIP_APT="apt: python3-picamera2 and python3-lgpio come from the Raspberry Pi archive, not Debian's"
readonly SKIP_UNIT="unit: no systemd runs in a chroot (systemctl cannot enable or start the service)"

die() {
	printf '%s: %s\n' "$PROG" "$*" >&2
	exit 2
}
say() { printf '%s: %s\n' "$PROG" "$*" >&2; }

[[ $(id -u) -eq 0 ]] || die "needs root (it mounts and chroots): sudo $0 $*"

sha() { sha256sum | cut -c1-16; }
BASE_KEY=$(printf '%s\n' "${MMDEBSTRAP[@]}" | sha)
RECIPE_KEY=$(cat "$REPO/deploy/pi-check.sh" "$REPO/deploy/install.sh" "$REPO/pyproject.toml" | sha)
readonly BASE_KEY RECIPE_KEY BASE_TAR=$WORK/base-$BASE_KEY.tar ROOT=$WORK/root STAMP=$WORK/root/.mushcam-recipe

# The emulator: aarch64 binaries run through qemu-aarch64-static, registered with binfmt_misc.
setup_qemu() {
	"$REPO/tests/system-deps.sh" mmdebstrap qemu-user-static binfmt-support arch-test
	if ! mountpoint -q /proc/sys/fs/binfmt_misc; then
		mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
	fi
	if ! grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null; then
		update-binfmts --enable qemu-aarch64
	fi
	grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 ||
		die "qemu-aarch64 is not registered with binfmt_misc (update-binfmts --enable qemu-aarch64 failed)"
}

# remove_root: only ever delete the root with nothing mounted in it, and never across file systems.
remove_root() {
	[[ -e $ROOT ]] || return 0
	if grep -q " ${ROOT}[/ ]" /proc/self/mounts; then
		die "$ROOT still has file systems mounted; unmount them before it can be removed"
	fi
	rm -rf --one-file-system -- "$ROOT"
}

# in_root [--bind DIR]... CMD...: CMD chrooted into the root, in a private mount namespace of its own
# (so nothing mounted there is visible to, or can change, this machine, and it all disappears with the
# process), with its own /proc and a bind of /dev. The host's /sys is never mounted: systemd in a chroot
# that shared it once re-mounted the host's /sys/fs/cgroup read-only.
in_root() {
	local binds=()
	while [[ ${1:-} == --bind ]]; do
		binds+=("$(realpath -- "$2")")
		shift 2
	done
	local env=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "QEMU_CPU=$PI_CPU")
	local v
	for v in $(compgen -e); do
		# pip's settings and proxies, as this machine uses them (but not its local wheel folders).
		case $v in
		PIP_FIND_LINKS) ;;
		PIP_* | http_proxy | https_proxy | no_proxy | HTTP_PROXY | HTTPS_PROXY | NO_PROXY) env+=("$v=${!v}") ;;
		esac
	done
	mkdir -p -- "$WORK/pip-cache"
	# shellcheck disable=SC2016 # the inner script expands its own arguments, in the new namespace
	unshare --mount --propagation private --fork --pid -- bash -euo pipefail -c '
		root=$1; cache=$2; nbinds=$3; shift 3
		mount -t proc proc "$root/proc"
		mount --bind /dev "$root/dev"
		# pip downloads kept outside the root, so a rebuilt root does not fetch every wheel again.
		mkdir -p "$root/root/.cache/pip"
		mount --bind "$cache" "$root/root/.cache/pip"
		for ((i = 0; i < nbinds; i++)); do
			mkdir -p -- "$root$1"
			mount --bind -- "$1" "$root$1"
			mount -o remount,bind,ro -- "$root$1"
			shift
		done
		exec chroot "$root" /usr/bin/env -i "$@"
	' in_root "$ROOT" "$WORK/pip-cache" "${#binds[@]}" "${binds[@]}" "${env[@]}" "$@"
}

build_root() {
	mkdir -p -- "$WORK"
	if [[ ! -f $BASE_TAR ]]; then
		say "building the Debian $SUITE arm64 base (mmdebstrap, a few minutes)"
		rm -f -- "$WORK"/base-*.tar "$BASE_TAR.partial"
		"${MMDEBSTRAP[@]}" --format=tar "$BASE_TAR.partial"
		mv -f -- "$BASE_TAR.partial" "$BASE_TAR"
	fi
	remove_root
	mkdir -p -- "$ROOT"
	tar -xf "$BASE_TAR" -C "$ROOT"
	# The host's CA bundle (it may trust a proxy's CA the root's ca-certificates does not) and pip
	# settings, without which pip in the root fails TLS or looks in the wrong index.
	cp -f /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
	[[ ! -f /etc/pip.conf ]] || cp -f /etc/pip.conf "$ROOT/etc/pip.conf"
	if [[ -f $HOME/.config/pip/pip.conf ]]; then
		mkdir -p "$ROOT/root/.config/pip"
		cp -f "$HOME/.config/pip/pip.conf" "$ROOT/root/.config/pip/pip.conf"
	fi
	cp -fL /etc/resolv.conf "$ROOT/etc/resolv.conf"
	printf '%s\n' "$RECIPE_KEY" >"$STAMP"
}

# The checkout as deploy/install.sh sees it on a Pi: its tracked and new files, no venv or work dir.
copy_checkout() {
	rm -rf --one-file-system -- "$ROOT/src/mushcam"
	mkdir -p -- "$ROOT/src/mushcam"
	(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
		[[ -e $f ]] && printf '%s\0' "$f"
	done | tar --null -T - -cf -) | tar -xf - -C "$ROOT/src/mushcam"
}

install_device() {
	local steps skip=()
	copy_checkout
	# install.sh's own step list (from its --help), so a reworked install.sh still runs here.
	steps=$(in_root bash /src/mushcam/deploy/install.sh --help | sed -n 's/.*skip steps (of: \(.*\)).*/\1/p')
	for s in apt unit; do
		[[ -z $steps || " $steps " == *" $s "* ]] && skip+=("$s")
	done
	say "skipped: $SKIP_APT"
	say "skipped: $SKIP_UNIT"
	in_root bash /src/mushcam/deploy/install.sh --source /src/mushcam --no-start \
		--skip "$(IFS=,; echo "${skip[*]}")" >"$WORK/install.log" 2>&1 ||
		{ tail -n 20 "$WORK/install.log" >&2; die "deploy/install.sh failed in the arm64 root (log: $WORK/install.log)"; }
	in_root /opt/mushcam/venv/bin/python -c 'import platform, numpy, PIL, ai_edge_litert; print(platform.machine(), "python", platform.python_version(), "numpy", numpy.__version__, "Pillow", PIL.__version__)'
	# What the emulated CPU offers (asimddp = int8 dot product, i8mm: none on a Cortex-A72).
	say "emulated CPU $PI_CPU: $(in_root /usr/bin/grep -m1 -i '^Features' /proc/cpuinfo || echo 'features unknown')"
}

ensure_root() {
	setup_qemu
	if [[ ! -f $STAMP || $(cat "$STAMP") != "$RECIPE_KEY" ]]; then
		build_root
	fi
	install_device
}

compare_samples() {
	local model_abs samples t
	model_abs=$(realpath -- "$REPO/$MODEL")
	samples=$model_abs/samples
	[[ -x $HOST_VENV/bin/mushcam ]] || die "no $HOST_VENV/bin/mushcam (make .venv/.device)"
	t=$(date +%s)
	in_root /opt/mushcam/venv/bin/mushcam selftest --model /var/lib/mushcam/models/current
	say "selftest in the arm64 root: $(($(date +%s) - t)) s"
	in_root --bind "$model_abs" /opt/mushcam/venv/bin/mushcam classify --json --probs --model "$model_abs" "$samples" \
		>"$WORK/aarch64.jsonl"
	"$HOST_VENV/bin/mushcam" classify --json --probs --model "$model_abs" "$samples" >"$WORK/x86_64.jsonl"
	"$HOST_VENV/bin/python" - "$WORK/x86_64.jsonl" "$WORK/aarch64.jsonl" <<'EOF'
import json, sys
from pathlib import Path

def rows(path):
    return {Path(r["path"]).name: r for r in map(json.loads, Path(path).read_text().splitlines())}

x86, arm = rows(sys.argv[1]), rows(sys.argv[2])
if set(x86) != set(arm):
    sys.exit(f"pi-check: different sample sets: {sorted(set(x86) ^ set(arm))}")
print(f"{'sample':<26}{'x86-64':>30}  {'aarch64':>30}  {'dconf':>7} {'dood':>7}")
bad = 0
for name in sorted(x86):
    a, b = x86[name], arm[name]
    if "error" in a or "error" in b:
        print(f"{name:<26} error: {a.get('error') or b.get('error')}")
        bad += 1
        continue
    same = a["verdict"] == b["verdict"] and a["label"] == b["label"]
    bad += a["verdict"] != b["verdict"]
    fmt = lambda r: f"{r['verdict']:<9} {r['label'][:12]:<12} {r['confidence']:.4f}"
    dood = "-" if a["ood_score"] is None else f"{abs(a['ood_score'] - b['ood_score']):.4f}"
    print(f"{name:<26}{fmt(a):>30}  {fmt(b):>30}  {abs(a['confidence'] - b['confidence']):7.4f} {dood:>7}"
          + ("" if same else "  <-- differs"))
print(f"{len(x86)} samples, {bad} verdict difference(s)")
sys.exit(1 if bad else 0)
EOF
}

if [[ ${1:-} == exec ]]; then
	shift
	args=()
	while [[ $# -gt 0 && $1 != -- ]]; do
		[[ $1 == --bind && $# -ge 2 ]] || die "usage: $PROG exec [--bind DIR]... -- CMD..."
		args+=(--bind "$2")
		shift 2
	done
	[[ ${1:-} == -- && $# -ge 2 ]] || die "usage: $PROG exec [--bind DIR]... -- CMD..."
	shift
	setup_qemu >&2
	[[ -f $STAMP && $(cat "$STAMP") == "$RECIPE_KEY" ]] || die "no up-to-date arm64 root in $ROOT: run make pi-check first"
	in_root "${args[@]}" "$@"
	exit
fi

start=$(date +%s)
ensure_root
compare_samples
say "ok: the shipped samples get the same verdicts on aarch64 ($(($(date +%s) - start)) s in all)"

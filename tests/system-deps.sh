#!/usr/bin/env bash
# system-deps.sh: install the Debian packages `make test` needs (or those named) when they are missing.
#
#   tests/system-deps.sh [--check] [PACKAGE...]
#
# Without packages: the test suite's own (see TEST_PACKAGES). A package counts as present when the
# command the tests use from it is found (so this also works where the tools came from elsewhere);
# a package not in that table is asked of dpkg. What to do about missing ones:
#   root with apt-get     apt-get update, then apt-get install
#   sudo without password the same through `sudo -n`
#   otherwise             one line naming the packages and how to install them; exit 1
# --check prints the decision (`ok`, `install: ...`, `sudo: ...` or `missing: ...`) and changes nothing;
# its exit status is that of the real run (0 nothing to do or could install, 1 cannot).
set -euo pipefail

# Package -> a command it provides. sshd, rsync, ssh-keygen: the deploy tests open a real SSH
# connection on 127.0.0.1; shellcheck: deploy/*.sh; systemd-analyze: `verify` of the unit;
# chromium and tmux: the laptop-mode tests (review page, Enter); python3-seccomp: the unit's
# SystemCallFilter= applied to the real daemon (tests/deploy_support/syscall_filter.py); the rest:
# deploy/pi-check.sh.
declare -A PROVIDES=(
	[openssh-server]=sshd [openssh-client]=ssh-keygen [rsync]=rsync [shellcheck]=shellcheck
	[systemd]=systemd-analyze [chromium]=chromium [tmux]=tmux
	[mmdebstrap]=mmdebstrap [qemu-user-static]=qemu-aarch64-static [binfmt-support]=update-binfmts [arch-test]=arch-test
)
readonly TEST_PACKAGES=(openssh-server openssh-client rsync shellcheck systemd chromium tmux python3-seccomp)
# Package -> a Python module it provides to Debian's own python3 (a venv's or pyenv's python3 on PATH
# would not see it).
declare -A MODULES=([python3-seccomp]=seccomp)
# Where sshd and update-binfmts live; not always on a user's PATH. Overridable for the tests, as is the
# system Python the modules are looked for in.
readonly SBIN_DIRS=${MUSHCAM_SBIN_DIRS-/usr/sbin:/sbin}
readonly SYSTEM_PYTHON=${MUSHCAM_SYSTEM_PYTHON:-/usr/bin/python3}

CHECK=0
if [[ ${1:-} == --check ]]; then
	CHECK=1
	shift
fi
if [[ $# -gt 0 ]]; then
	wanted=("$@")
else
	wanted=("${TEST_PACKAGES[@]}")
fi

present() {
	local pkg=$1 cmd=${PROVIDES[$1]:-} module=${MODULES[$1]:-}
	if [[ -n $module ]]; then
		"$SYSTEM_PYTHON" -c "import $module" >/dev/null 2>&1
	elif [[ -n $cmd ]]; then
		PATH=$PATH${SBIN_DIRS:+:$SBIN_DIRS} command -v "$cmd" >/dev/null
	else
		[[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null) == "install ok installed" ]]
	fi
}

missing=()
for pkg in "${wanted[@]}"; do
	present "$pkg" || missing+=("$pkg")
done
if [[ ${#missing[@]} -eq 0 ]]; then
	[[ $CHECK == 0 ]] || echo ok
	exit 0
fi

if ! command -v apt-get >/dev/null; then
	how=none
elif [[ $(id -u) -eq 0 ]]; then
	how=root
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
	how=sudo
else
	how=none
fi

if [[ $how == none ]]; then
	if [[ $CHECK == 1 ]]; then
		echo "missing: ${missing[*]}"
	else
		echo "system-deps: missing ${missing[*]}; install them (Debian/Ubuntu: sudo apt-get install ${missing[*]}) and run again" >&2
	fi
	exit 1
fi
if [[ $CHECK == 1 ]]; then
	[[ $how == root ]] && echo "install: ${missing[*]}" || echo "sudo: ${missing[*]}"
	exit 0
fi

sudo=()
[[ $how == root ]] || sudo=(sudo -n)
echo "system-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Wait for another apt run (up to 10 min) rather than fail on its lock.
lock=(-o DPkg::Lock::Timeout=600)
"${sudo[@]}" apt-get "${lock[@]}" update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "${lock[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
for pkg in "${missing[@]}"; do
	present "$pkg" || { echo "system-deps: $pkg is installed but ${PROVIDES[$pkg]:-it} is still not found" >&2; exit 1; }
done

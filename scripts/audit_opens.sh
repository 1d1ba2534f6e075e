#!/usr/bin/env bash
# Runs a command under strace and fails when it, or any process it starts, opened a file outside what a
# fresh clone may read: the repository, the setup cache ($QLORA_CACHE, scripts/setup.sh), temporary
# folders, the system (/usr, /etc, /lib*, /bin, /sbin, /proc, /sys, /dev, the font cache), the Swift toolchain, Python's
# installation (the demo formats JSON with it), and the caches SwiftPM, clang and git keep in $HOME.
# A test that reads ../shared/data, ~/Downloads or any other file on the developer's machine is named here.
#
#   scripts/audit_opens.sh COMMAND [ARG...]     (the Makefile's AUDIT variable; .ci/run sets it)
#
# Only opens that succeeded count (a probe of a missing path is not a read). The exit status is the
# command's when it failed, else 3 when the audit found a file outside, else 0. Without a working strace
# (not installed, or ptrace refused in this container) it says so and runs the command unaudited.
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: $0 COMMAND [ARG...]" >&2; exit 2; }

repo="$(cd "$(dirname "$0")/.." && pwd -P)"
cache="${QLORA_CACHE:-$HOME/.cache/swift-qlora}"

if ! command -v strace >/dev/null 2>&1 || ! strace -f --seccomp-bpf -qq -o /dev/null true 2>/dev/null; then
  echo "audit: strace is missing or cannot trace here; running without the file audit: $*" >&2
  exec "$@"
fi

roots=("$repo" "$cache" /tmp /var/tmp /usr /etc /lib /lib32 /lib64 /libx32 /bin /sbin /proc /sys /dev /run /var/cache/fontconfig
       "$HOME/.cache/org.swift.swiftpm" "$HOME/.cache/clang" "$HOME/.swiftpm" "$HOME/.gitconfig" "$HOME/.config/git")
[ -n "${TMPDIR:-}" ] && roots+=("$TMPDIR")
if swift_bin="$(command -v swift 2>/dev/null)"; then
  roots+=("$(dirname "$(dirname "$(dirname "$(readlink -f "$swift_bin")")")")")  # <toolchain>/usr/bin/swift
fi
if py="$(command -v python3 2>/dev/null)"; then
  roots+=("$(dirname "$(dirname "$py")")" "$(python3 -c 'import sys; print(sys.base_prefix)' 2>/dev/null || true)")
fi
log="$(mktemp)"
for r in "${roots[@]}"; do
  [ -n "$r" ] && [ -e "$r" ] && echo "$(readlink -f "$r")"
done | sort -u > "$log.roots"

strace -f --seccomp-bpf -qq -y -e trace=open,openat,openat2 -e signal=none -o "$log" "$@"
status=$?

# Successful opens print the new descriptor with its resolved path: `= 5</abs/path>`.
# Pipes and sockets (`pipe:[123]`, from process substitution) are not files, nor is anonymous memory
# (`/memfd:...`, which the headless browser of the page-rendering test maps), nor is the root folder itself,
# which OpenMPI's launcher opens as a directory (the data-parallel test); a file under it still counts.
outside=$(grep -oE '= [0-9]+<[^>]*>' "$log" | sed -E 's/^= [0-9]+<//; s/>$//' | grep '^/' | grep -v '^/memfd:' | grep -vx '/' | sort -u |
  awk 'NR == FNR { roots[++n] = $0; next }
       { ok = 0
         for (i = 1; i <= n; i++) {
           r = roots[i]
           if ($0 == r || r == "/" || index($0, r "/") == 1) { ok = 1; break }
         }
         if (!ok) print }' "$log.roots" -)
opens=$(grep -cE '= [0-9]+<' "$log")
rm -f "$log" "$log.roots"

if [ -n "$outside" ]; then
  echo "audit: FAILED: '$*' opened files outside the repository ($repo), the setup cache ($cache) and the system:" >&2
  echo "$outside" | head -n 50 | sed 's/^/audit:   /' >&2
  echo "audit: commit what a test needs under Tests/*/Resources, or fetch it in scripts/setup.sh" >&2
  [ $status -ne 0 ] && exit $status
  exit 3
fi
echo "audit: '$*' opened $opens files, all inside the repository, the setup cache and the system" >&2
exit $status

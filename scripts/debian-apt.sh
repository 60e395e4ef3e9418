#!/usr/bin/env bash
# Run apt-get against Debian suites this machine is not configured for (sid, trixie-backports),
# through the mirror it IS configured for, without touching the system's apt state.
#
#   scripts/debian-apt.sh STATE_DIR SUITES APT-GET-ARGS...
#   scripts/debian-apt.sh --mirror          # print the configured mirror and exit
#
# STATE_DIR holds a private sources.list and package lists (kept between runs: `apt-get update`
# then only fetches what changed); SUITES is a comma-separated list (e.g. sid,trixie-backports);
# the rest is given to apt-get, run in the current directory, e.g.
#   scripts/debian-apt.sh /var/cache/tdvmcall-apt sid download ovmf-inteltdx=2026.08+ds-2
#   scripts/debian-apt.sh /var/cache/tdvmcall-apt sid source --download-only sparse
#
# The mirror is read at run time from the machine's apt sources (deb822 *.sources files, then the
# one-line sources.list format): the first URI of the Debian archive (not its -security suites).
# No host name is written here. Packages are checked by apt against the system's Debian keyring.
set -euo pipefail

# APT_ETC: where apt's sources are read (the tests point it at a fixture; default /etc/apt)
etc=${APT_ETC:-/etc/apt}

mirror() {
  local f uri=""
  shopt -s nullglob
  for f in "$etc"/sources.list.d/*.sources; do
    # deb822 stanzas: take URIs of a stanza whose Suites are not -security ones
    uri=$(awk '
      BEGIN { RS = ""; FS = "\n" }
      {
        u = ""; s = ""; t = ""
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^URIs:/) { u = $i; sub(/^URIs:[ \t]*/, "", u); split(u, a, /[ \t]+/); u = a[1] }
          if ($i ~ /^Suites:/) s = $i
          if ($i ~ /^Types:/) t = $i
        }
        if (u != "" && t ~ /deb/ && s !~ /-security/) { print u; exit }
      }' "$f")
    [ -n "$uri" ] && break
  done
  if [ -z "$uri" ]; then
    for f in "$etc"/sources.list "$etc"/sources.list.d/*.list; do
      [ -r "$f" ] || continue
      uri=$(awk '$1 == "deb" && $0 !~ /-security/ {
        for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { print $i; exit }
      }' "$f")
      [ -n "$uri" ] && break
    done
  fi
  if [ -z "$uri" ]; then
    echo "debian-apt: no Debian mirror found in $etc/sources.list.d/*.sources or $etc/sources.list" >&2
    return 1
  fi
  echo "${uri%/}"
}

if [ "${1:-}" = "--mirror" ]; then
  mirror
  exit
fi
if [ $# -lt 3 ]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi

state=$1 suites=$2
shift 2
uri=$(mirror)
mkdir -p "$state/lists/partial" "$state/archives/partial"
list="$state/sources.list"
: >"$list.new"
IFS=, read -r -a suite_list <<<"$suites"
for s in "${suite_list[@]}"; do
  printf 'deb %s %s main\ndeb-src %s %s main\n' "$uri" "$s" "$uri" "$s" >>"$list.new"
done
mv "$list.new" "$list"

opts=(
  -o "Dir::Etc::sourcelist=$list"
  -o "Dir::Etc::sourceparts=-"
  -o "Dir::State::Lists=$state/lists"
  -o "Dir::Cache::archives=$state/archives"
  -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
  -o "APT::Get::List-Cleanup=0"
  -o "APT::Sandbox::User=root"  # downloads land in the caller's directory, which _apt may not reach
)
# the lists are fetched once per STATE_DIR and hour (apt sends If-Modified-Since anyway)
stamp="$state/lists/.updated"
if [ ! -e "$stamp" ] || [ -n "$(find "$stamp" -mmin +60 2>/dev/null)" ] \
  || ! grep -q "$(printf '%s\n' "${suite_list[@]}" | sort | tr '\n' ' ')" "$stamp" 2>/dev/null; then
  apt-get "${opts[@]}" -qq update >&2
  printf '%s\n' "${suite_list[@]}" | sort | tr '\n' ' ' >"$stamp"
fi
exec apt-get "${opts[@]}" "$@"

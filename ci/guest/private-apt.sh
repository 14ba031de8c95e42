# Sourced by ci/guest/fetch and ci/runner/compare-qemu: a private apt for a foreign Debian architecture.
#
#   private_apt DIR DEBARCH SUITE    exports APT_CONFIG=DIR/apt.conf; returns non-zero when apt-get update failed
#
# Its own sources, lists, archives, an empty dpkg status and no settings from /etc/apt, so that the system's apt is
# neither read nor changed (see ../shared/notes/emulation.md). KESTREL_DEBIAN_MIRROR overrides the archive it names
# (default: the host's Debian archive, else http://deb.debian.org/debian). Lists older than a day are refreshed, so
# that a pinned version missing from them is really gone from the archive.
private_apt() {
  local d="$1" debarch="$2" suite="$3" mirror="${KESTREL_DEBIAN_MIRROR:-}"
  if [ -z "$mirror" ]; then
    mirror="$(sed -n 's,^URIs:[[:space:]]*\(http[^[:space:]]*/debian\)/*$,\1,p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)"
    mirror="${mirror:-http://deb.debian.org/debian}"
  fi
  mkdir -p "$d/lists/partial" "$d/archives/partial" "$d/sources.list.d" "$d/apt.conf.d" "$d/preferences.d"
  [ -f "$d/status" ] || : >"$d/status"
  echo "deb [arch=$debarch signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" \
    >"$d/sources.list"
  cat >"$d/apt.conf" <<CONF
Dir::State "$d";
Dir::State::Lists "$d/lists";
Dir::State::status "$d/status";
Dir::Cache "$d";
Dir::Cache::Archives "$d/archives";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Dir::Etc::SourceList "$d/sources.list";
Dir::Etc::SourceParts "$d/sources.list.d";
Dir::Etc::Parts "$d/apt.conf.d";
Dir::Etc::Preferences "$d/preferences";
Dir::Etc::PreferencesParts "$d/preferences.d";
APT::Architecture "$debarch";
APT::Architectures { "$debarch"; };
APT::Sandbox::User "root";
Acquire::Languages "none";
CONF
  export APT_CONFIG="$d/apt.conf"
  if [ -z "$(find "$d/lists" -maxdepth 1 -name '*_Packages*' -mmin -1440 2>/dev/null)" ]; then
    printf 'private apt: apt-get update: %s %s from %s (APT_CONFIG %s)\n' "$suite" "$debarch" "$mirror" "$APT_CONFIG" >&2
    apt-get update -qq -o DPkg::Lock::Timeout=300 >&2 || {
      printf 'private apt: apt-get update for %s %s failed\n' "$suite" "$debarch" >&2
      return 1
    }
  fi
}

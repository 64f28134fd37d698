#!/bin/bash
# Renders the gateway config on a VM from the template Terraform wrote (config.yaml.in) and the
# profiles' members, which live in the project metadata (metadata.tf, one line per member:
# "PROFILE ROLE SLOT_CIDR PUBLIC_IP"). Every placeholder "@MEMBERS:<profile>:<what>@" becomes a
# YAML list:
#   active   this VM's alias IPs in the slot ranges of the profile's active members  (bind)
#   standby  the same for its standby members                                        (standby)
#   ips      the public IPs of all its members                                       (expect_ip)
# Alias IPs differ per VM and are known only here. The member list is checked first (every line
# well formed, every profile known and with an active member, an alias of this VM in every slot);
# a bad one is reported and changes nothing. The file is written beside DST and renamed over it
# (atomic: the gateway's reload.watch never reads half a file) and the gateway reloads by itself;
# open tunnels stay.
#   render-config.sh [--watch] SRC DST KEY
# --watch: render, then wait for the metadata item to change (?wait_for_change=true) and render
# again, for ever (egressgate-members.service). Tests set ALIAS_IPS and EGRESS_MEMBERS instead of
# asking the metadata server (once only).
set -euo pipefail

watch=no
if [[ "${1:-}" == "--watch" ]]; then
  watch=yes
  shift
fi
src=${1:-/etc/egressgate/config.yaml.in}
dst=${2:-/run/egressgate/conf/config.yaml}
key=${3:-egressgate-egress-members}
gid=${EGRESSGATE_GID:-10001}
wait_sec=${WAIT_TIMEOUT_SEC:-300}
md="http://metadata.google.internal/computeMetadata/v1"

log() { echo "render-config: $*" >&2; }

md_get() { # md_get PATH [CURL ARGS...]: the metadata server's answer on stdout
  local path=$1
  shift
  curl --fail --silent --show-error --retry 10 --retry-connrefused --retry-delay 2 \
    -H "Metadata-Flavor: Google" "$@" "$md/$path"
}

ip2int() {
  local IFS=. a b c d
  read -r a b c d <<<"$1"
  echo $(( (a << 24) | (b << 16) | (c << 8) | d ))
}

in_cidr() { # in_cidr IP CIDR
  local net=${2%/*} len=${2#*/} mask
  mask=$((len == 0 ? 0 : (0xFFFFFFFF << (32 - len)) & 0xFFFFFFFF))
  (( ($(ip2int "$1") & mask) == ($(ip2int "$net") & mask) ))
}

ipv4='^([0-9]{1,3}\.){3}[0-9]{1,3}$'

render() { # render MEMBERS: writes DST, or says why not and returns 1
  local members=$1 alias_list aliases content profile role cidr ip extra found a ph name what n=0
  local -A active=() standby=() ips=() known=()
  if [[ -n "${ALIAS_IPS+set}" ]]; then
    alias_list=$ALIAS_IPS
  else
    alias_list=$(md_get "instance/network-interfaces/0/ip-aliases/?recursive=true") || {
      log "cannot read this VM's alias IPs"
      return 1
    }
  fi
  # Accept JSON (["10.20.1.7/32"]) or one CIDR per line; keep the addresses.
  aliases=$(grep -oE '[0-9]{1,3}(\.[0-9]{1,3}){3}(/[0-9]{1,2})?' <<<"$alias_list" | sed 's#/.*##' || true)
  content=$(<"$src")
  for ph in $(grep -oE '@MEMBERS:[a-z0-9-]+:(active|standby|ips)@' <<<"$content" | sort -u || true); do
    name=${ph#@MEMBERS:}
    known[${name%%:*}]=1
  done
  while read -r profile role cidr ip extra; do
    [[ -z "$profile" ]] && continue
    n=$((n + 1))
    if [[ -n "$extra" || ! "$role" =~ ^(active|standby)$ || ! "${cidr%/*}" =~ $ipv4 || ! "${cidr#*/}" =~ ^[0-9]{1,2}$ || ! "$ip" =~ $ipv4 ]]; then
      log "member line $n is not 'PROFILE active|standby SLOT_CIDR PUBLIC_IP': $profile $role $cidr $ip $extra"
      return 1
    fi
    if [[ -z "${known[$profile]+set}" ]]; then
      log "member line $n: profile $profile is not in $src"
      return 1
    fi
    found=""
    for a in $aliases; do
      if in_cidr "$a" "$cidr"; then
        found=$a
        break
      fi
    done
    if [[ -z "$found" ]]; then
      log "member line $n: this VM has no alias IP inside $cidr (aliases: ${aliases//$'\n'/ })"
      return 1
    fi
    if [[ "$role" == active ]]; then
      active[$profile]+="${active[$profile]:+, }\"$found\""
    else
      standby[$profile]+="${standby[$profile]:+, }\"$found\""
    fi
    ips[$profile]+="${ips[$profile]:+, }\"$ip\""
  done <<<"$members"
  for profile in "${!known[@]}"; do
    if [[ -z "${active[$profile]:-}" ]]; then
      log "profile $profile has no active member: keeping the current config"
      return 1
    fi
    for what in active standby ips; do
      ph="@MEMBERS:$profile:$what@"
      case $what in
        active) a="[${active[$profile]}]" ;;
        standby) a="[${standby[$profile]:-}]" ;;
        ips) a="[${ips[$profile]}]" ;;
      esac
      # Terraform's yamlencode quotes the placeholder with ", a YAML dumper may use '.
      content=${content//\"$ph\"/$a}
      content=${content//\'$ph\'/$a}
    done
  done
  if grep -qE '@MEMBERS:' <<<"$content"; then
    log "a placeholder is left in the rendered config (not a quoted YAML value in $src?)"
    return 1
  fi
  local tmp
  tmp=$(mktemp "${dst}.XXXXXX")
  printf '%s\n' "$content" >"$tmp"
  chmod 0640 "$tmp"
  chgrp "$gid" "$tmp" 2>/dev/null || chmod 0644 "$tmp"
  mv -f "$tmp" "$dst"
  log "wrote $dst ($n members)"
}

mkdir -p "$(dirname "$dst")"

if [[ "$watch" == no ]]; then
  if [[ -z "${EGRESS_MEMBERS+set}" ]]; then
    EGRESS_MEMBERS=$(md_get "project/attributes/$key") || {
      log "cannot read the project metadata item $key (the module's metadata.tf writes it)"
      exit 1
    }
  fi
  render "$EGRESS_MEMBERS"
  exit
fi

# --watch: the metadata server answers a wait_for_change request when the value's ETag differs
# from last_etag, or after timeout_sec with the same value.
etag=""
hdr=$(mktemp)
trap 'rm -f "$hdr"' EXIT
while true; do
  query=""
  if [[ -n "$etag" ]]; then
    query="?wait_for_change=true&timeout_sec=$wait_sec&last_etag=$etag"
  fi
  if ! body=$(md_get "project/attributes/$key$query" --max-time "$((wait_sec + 30))" --dump-header "$hdr"); then
    log "cannot read the project metadata item $key; retrying"
    sleep 5
    continue
  fi
  new=""
  while IFS=': ' read -r name value; do
    if [[ "${name,,}" == etag ]]; then
      new=${value%$'\r'}
    fi
  done <"$hdr"
  if [[ -z "$new" ]]; then
    sleep 10 # no ETag to wait on: poll
  elif [[ "$new" == "$etag" ]]; then
    continue # timed out without a change
  fi
  etag=$new
  render "$body" || log "the member list of ETag ${etag:-?} was refused; the config in force stays"
done

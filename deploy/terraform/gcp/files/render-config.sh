#!/bin/bash
# Renders the gateway config on a VM: every placeholder "@ALIAS_IN:<cidr>@" (one per egress profile,
# written by Terraform) becomes this VM's alias IP inside <cidr>, so the profile's `bind` is the
# local address whose traffic that profile's Cloud NAT gateway translates.
#   render-config.sh SRC DST
# The alias list comes from the metadata server unless ALIAS_IPS is set (tests set it).
set -euo pipefail

src=${1:-/etc/egressgate/config.yaml.in}
dst=${2:-/run/egressgate/config.yaml}
gid=${EGRESSGATE_GID:-10001}
md_url="http://metadata.google.internal/computeMetadata/v1/instance/network-interfaces/0/ip-aliases/?recursive=true"

if [[ -z "${ALIAS_IPS+set}" ]]; then
  ALIAS_IPS=$(curl --fail --silent --show-error --retry 10 --retry-connrefused --retry-delay 2 \
    -H "Metadata-Flavor: Google" "$md_url")
fi
# Accept JSON (["10.20.1.7/32"]) or one CIDR per line; keep the addresses.
aliases=$(grep -oE '[0-9]{1,3}(\.[0-9]{1,3}){3}(/[0-9]{1,2})?' <<<"$ALIAS_IPS" | sed 's#/.*##' || true)

ip2int() {
  local IFS=. a b c d
  read -r a b c d <<<"$1"
  echo $(( (a << 24) | (b << 16) | (c << 8) | d ))
}

in_cidr() { # in_cidr IP CIDR
  local net=${2%/*} len=${2#*/} mask
  mask=$(( len == 0 ? 0 : (0xFFFFFFFF << (32 - len)) & 0xFFFFFFFF ))
  (( ($(ip2int "$1") & mask) == ($(ip2int "$net") & mask) ))
}

content=$(<"$src")
placeholders=$(grep -oE '@ALIAS_IN:[0-9./]+@' <<<"$content" | sort -u || true)
for ph in $placeholders; do
  cidr=${ph#@ALIAS_IN:}
  cidr=${cidr%@}
  found=""
  for ip in $aliases; do
    if in_cidr "$ip" "$cidr"; then found=$ip; break; fi
  done
  if [[ -z "$found" ]]; then
    echo "render-config: this VM has no alias IP inside $cidr (aliases: ${aliases//$'\n'/ })" >&2
    exit 1
  fi
  content=${content//"$ph"/"$found"}
done

tmp=$(mktemp "${dst}.XXXXXX")
printf '%s\n' "$content" >"$tmp"
chmod 0640 "$tmp"
chgrp "$gid" "$tmp" 2>/dev/null || chmod 0644 "$tmp"
mv -f "$tmp" "$dst"
echo "render-config: wrote $dst" >&2

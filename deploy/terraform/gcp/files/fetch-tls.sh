#!/bin/bash
# Puts the proxy listener's TLS certificate and key where the container reads them
# (/run/egressgate/tls/tls.{crt,key}), before every start of egressgate.service.
#   fetch-tls.sh none
#   fetch-tls.sh secret-manager CERT_SECRET KEY_SECRET   latest versions from Secret Manager
#   fetch-tls.sh files                                   /etc/egressgate/tls.in/tls.{crt,key} (cloud-init)
# And the fleet store's (fleet.redis) beside them: with FLEET_AUTH_SECRET set, its AUTH string
# from that Secret Manager secret as redis-auth; a non-empty /etc/egressgate/tls.in/redis-ca.pem
# (cloud-init: the Redis server CA) as redis-ca.pem.
# Secret Manager is read with the VM's own service account (token from the metadata server, REST
# API through Private Google Access); Container-Optimized OS has curl and base64 but no gcloud.
set -euo pipefail
mode=${1:-none}
out=${TLS_DIR:-/run/egressgate/tls}
gid=${EGRESSGATE_GID:-10001}
md=${METADATA_URL:-http://metadata.google.internal/computeMetadata/v1}
sm=${SECRET_MANAGER_URL:-https://secretmanager.googleapis.com}
mkdir -p "$out"
chmod 0750 "$out"
chgrp "$gid" "$out" 2>/dev/null || true

install_file() { # install_file SRC NAME
  install -m 0640 "$1" "$out/$2"
  chgrp "$gid" "$out/$2" 2>/dev/null || chmod 0644 "$out/$2"
}

secret_url() { # a secret id "NAME" or "projects/P/secrets/NAME" -> its latest version's :access URL
  local id=$1
  if [[ $id != projects/* ]]; then
    id="projects/$(curl -fsS -H 'Metadata-Flavor: Google' "$md/project/project-id")/secrets/$id"
  fi
  echo "$sm/v1/$id/versions/latest:access"
}

access_token() {
  curl -fsS --retry 5 --retry-connrefused -H 'Metadata-Flavor: Google' \
    "$md/instance/service-accounts/default/token" | sed -E 's/.*"access_token" *: *"([^"]+)".*/\1/'
}

fetch_secret() { # fetch_secret TOKEN SECRET_ID FILE: the secret's latest version, decoded
  curl -fsS --retry 5 -H "Authorization: Bearer $1" "$(secret_url "$2")" \
    | tr -d '\n' | sed -E 's/.*"data" *: *"([^"]+)".*/\1/' | base64 -d >"$3"
  [[ -s $3 ]] || { echo "fetch-tls: secret $2 is empty" >&2; exit 1; }
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

case "$mode" in
  none) ;;
  files)
    install_file /etc/egressgate/tls.in/tls.crt tls.crt
    install_file /etc/egressgate/tls.in/tls.key tls.key
    ;;
  secret-manager)
    token=$(access_token)
    fetch_secret "$token" "$2" "$tmp/tls.crt"
    fetch_secret "$token" "$3" "$tmp/tls.key"
    install_file "$tmp/tls.crt" tls.crt
    install_file "$tmp/tls.key" tls.key
    ;;
  *) echo "fetch-tls: unknown mode $mode" >&2; exit 2 ;;
esac

if [[ -n ${FLEET_AUTH_SECRET:-} ]]; then
  fetch_secret "$(access_token)" "$FLEET_AUTH_SECRET" "$tmp/redis-auth"
  install_file "$tmp/redis-auth" redis-auth
fi
ca_in=${FLEET_CA_FILE:-/etc/egressgate/tls.in/redis-ca.pem}
if grep -qs 'BEGIN CERTIFICATE' "$ca_in"; then
  install_file "$ca_in" redis-ca.pem
fi
echo "fetch-tls: $mode -> $out" >&2

# The fleet store (issue 28): shared-IP limits and holds shared by every VM of the group through
# Redis. var.fleet_store = null: none (each VM counts for itself; check-config warns). With
# `memorystore`, a Memorystore for Redis instance on this VPC through private services access,
# AUTH on (the AUTH string goes to a Secret Manager secret only the VMs' account can read) and
# in-transit encryption (SERVER_AUTHENTICATION: the VMs verify the instance's server CA). With
# `url`, an existing Redis (its AUTH string in the Secret Manager secret `auth_secret`, its CA in
# `ca_pem`). The VM fetches the AUTH string before every start (files/fetch-tls.sh); the gateway
# reads it as fleet.redis.password_file.

locals {
  memorystore        = try(var.fleet_store.memorystore, null) != null
  fleet_store_secret = local.memorystore ? "${var.name_prefix}-redis-auth" : try(var.fleet_store.auth_secret, null)
  fleet_store_ca_pem = local.memorystore ? join("", google_redis_instance.fleet[0].server_ca_certs[*].cert) : try(var.fleet_store.ca_pem, null)
  fleet_store_url = (local.memorystore ? "rediss://${google_redis_instance.fleet[0].host}:${google_redis_instance.fleet[0].port}"
  : try(var.fleet_store.url, null))
  # The gateway's fleet.redis (files under /etc/egressgate/tls in the container: fetch-tls.sh).
  fleet_redis = var.fleet_store == null ? null : merge(
    { url = local.fleet_store_url },
    local.fleet_store_secret != null ? { password_file = "/etc/egressgate/tls/redis-auth" } : {},
    # (Memorystore's server certificate does not name the instance's IP: the CA is checked, not the name)
    local.fleet_store_ca_pem != null ? { tls = merge({ ca = "/etc/egressgate/tls/redis-ca.pem" }, local.memorystore ? { check_hostname = false } : {}) } : {},
  )
}

# Private services access: a range of the VPC peered with Google's service producer network.
resource "google_compute_global_address" "fleet_psa" {
  count         = local.memorystore ? 1 : 0
  project       = var.project_id
  name          = "${var.name_prefix}-fleet-psa"
  purpose       = "VPC_PEERING"
  address_type  = "INTERNAL"
  prefix_length = var.fleet_store.memorystore.psa_prefix_length
  network       = google_compute_network.gateway.id
}

resource "google_service_networking_connection" "fleet_psa" {
  count                   = local.memorystore ? 1 : 0
  network                 = google_compute_network.gateway.id
  service                 = "servicenetworking.googleapis.com"
  reserved_peering_ranges = [google_compute_global_address.fleet_psa[0].name]
}

resource "google_redis_instance" "fleet" {
  count                   = local.memorystore ? 1 : 0
  project                 = var.project_id
  region                  = var.region
  name                    = "${var.name_prefix}-fleet"
  display_name            = "egressgate fleet store"
  tier                    = var.fleet_store.memorystore.tier
  memory_size_gb          = var.fleet_store.memorystore.memory_size_gb
  redis_version           = var.fleet_store.memorystore.redis_version
  authorized_network      = google_compute_network.gateway.id
  connect_mode            = "PRIVATE_SERVICE_ACCESS"
  auth_enabled            = true
  transit_encryption_mode = "SERVER_AUTHENTICATION"
  labels                  = { app = "egressgate" }

  depends_on = [google_service_networking_connection.fleet_psa]
}

resource "google_secret_manager_secret" "fleet_auth" {
  count     = local.memorystore ? 1 : 0
  project   = var.project_id
  secret_id = "${var.name_prefix}-redis-auth"
  labels    = { app = "egressgate" }
  replication {
    auto {}
  }
}

resource "google_secret_manager_secret_version" "fleet_auth" {
  count       = local.memorystore ? 1 : 0
  secret      = google_secret_manager_secret.fleet_auth[0].id
  secret_data = google_redis_instance.fleet[0].auth_string
}

# Secret-scoped, like the TLS secrets: the VMs read exactly the AUTH string's secret.
resource "google_secret_manager_secret_iam_member" "gateway_fleet_auth" {
  count     = local.fleet_store_secret != null ? 1 : 0
  project   = var.project_id
  secret_id = local.memorystore ? google_secret_manager_secret.fleet_auth[0].secret_id : var.fleet_store.auth_secret
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.gateway.email}"
}

# Static egress IPs, keyed by name (for_each, not count: removing one never re-indexes the others).
resource "google_compute_address" "nat" {
  for_each     = local.nat_ip_names
  project      = var.project_id
  name         = "${var.name_prefix}-nat-${each.value}"
  region       = var.region
  address_type = "EXTERNAL"
  network_tier = "PREMIUM"
  labels       = var.labels

  lifecycle {
    # Provider note for nat_ips: lets the set grow/shrink without resourceInUseByAnotherResource.
    create_before_destroy = true
  }
}

resource "google_compute_router" "gateway" {
  project = var.project_id
  name    = "${var.name_prefix}-router"
  region  = var.region
  network = google_compute_network.gateway.id
}

# One NAT gateway per egress profile, each translating ONLY that profile's secondary range to ONLY
# that profile's static IPs. The subnet's primary range is not NATed at all: a connection that is
# not bound to a profile address cannot reach the internet.
resource "google_compute_router_nat" "profile" {
  for_each = var.egress_profiles
  project  = var.project_id
  name     = local.nat_gateway_name[each.key]
  router   = google_compute_router.gateway.name
  region   = var.region

  nat_ip_allocate_option             = "MANUAL_ONLY"
  nat_ips                            = [for n in each.value.nat_ip_names : google_compute_address.nat[n].self_link]
  drain_nat_ips                      = [for n in each.value.draining_nat_ip_names : google_compute_address.nat[n].self_link]
  source_subnetwork_ip_ranges_to_nat = "LIST_OF_SUBNETWORKS"

  subnetwork {
    name                     = google_compute_subnetwork.gateway.id
    source_ip_ranges_to_nat  = ["LIST_OF_SECONDARY_IP_RANGES"]
    secondary_ip_range_names = [local.secondary_range_name[each.key]]
  }

  min_ports_per_vm                    = var.nat_min_ports_per_vm
  enable_endpoint_independent_mapping = false
  tcp_established_idle_timeout_sec    = 1200

  log_config {
    enable = true
    filter = "ERRORS_ONLY"
  }

  lifecycle {
    precondition {
      condition     = (local.max_instances + local.max_surge) * var.nat_min_ports_per_vm <= 64512 * length(each.value.nat_ip_names)
      error_message = "Not enough NAT ports for profile ${each.key}: add NAT IPs or lower nat_min_ports_per_vm."
    }
  }
}

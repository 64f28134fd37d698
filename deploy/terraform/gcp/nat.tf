# Static egress IPs, keyed by name (for_each, not count: removing one never re-indexes the others).
resource "google_compute_address" "nat" {
  for_each     = toset(var.egress_ips)
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

# One NAT gateway per profile MEMBER (active or standby), keyed by the member's static IP: each
# translates ONLY its slot's secondary range, to ONLY that member's static IP. So every member is a
# distinct public source that the gateway attests and the providers check, a standby as much as an
# active one. The subnet's primary range is not NATed at all, nor is a slot without a member: a
# connection that is not bound to a member's address cannot reach the internet.
resource "google_compute_router_nat" "member" {
  for_each = local.members
  project  = var.project_id
  name     = local.nat_gateway_name[each.key]
  router   = google_compute_router.gateway.name
  region   = var.region

  nat_ip_allocate_option             = "MANUAL_ONLY"
  nat_ips                            = [google_compute_address.nat[each.key].self_link]
  source_subnetwork_ip_ranges_to_nat = "LIST_OF_SUBNETWORKS"

  subnetwork {
    name                     = google_compute_subnetwork.gateway.id
    source_ip_ranges_to_nat  = ["LIST_OF_SECONDARY_IP_RANGES"]
    secondary_ip_range_names = [each.value.range_name]
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
      condition     = (local.max_instances + local.max_surge) * var.nat_min_ports_per_vm <= 64512
      error_message = "Not enough NAT ports for member ${each.key} of profile ${each.value.profile}: one IP has 64512 ports, and every VM (surge included) reserves nat_min_ports_per_vm. Lower nat_min_ports_per_vm (or the maximum number of VMs)."
    }
  }
}

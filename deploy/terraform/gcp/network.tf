# Custom-mode VPC: no auto subnets. (The project's `default` network is not created by this module;
# create the project without it, see README.)
resource "google_compute_network" "gateway" {
  project                 = var.project_id
  name                    = "${var.name_prefix}-vpc"
  auto_create_subnetworks = false
  routing_mode            = "REGIONAL"
}

resource "google_compute_subnetwork" "gateway" {
  project                  = var.project_id
  name                     = "${var.name_prefix}-subnet"
  region                   = var.region
  network                  = google_compute_network.gateway.id
  ip_cidr_range            = var.subnet_cidr
  private_ip_google_access = true # image pulls, logging and monitoring without NAT

  # One secondary range per member slot of every profile; every VM takes one alias /32 from each.
  dynamic "secondary_ip_range" {
    for_each = local.slot_by_key
    content {
      range_name    = secondary_ip_range.value.range_name
      ip_cidr_range = secondary_ip_range.value.cidr
    }
  }

  lifecycle {
    precondition {
      condition     = alltrue([for _, p in var.egress_profiles : cidrhost("${cidrhost(var.subnet_cidr, 0)}/${min(tonumber(split("/", var.subnet_cidr)[1]), tonumber(split("/", p.secondary_cidr)[1]))}", 0) != cidrhost("${cidrhost(p.secondary_cidr, 0)}/${min(tonumber(split("/", var.subnet_cidr)[1]), tonumber(split("/", p.secondary_cidr)[1]))}", 0)])
      error_message = "A profile's secondary_cidr overlaps subnet_cidr."
    }
    precondition {
      # Every VM (surge included) takes one alias IP from every slot range.
      condition     = alltrue([for _, p in var.egress_profiles : pow(2, 32 - tonumber(split("/", p.secondary_cidr)[1]) - local.slot_newbits) >= local.max_instances + local.max_surge])
      error_message = "A profile's slot ranges (secondary_cidr cut into 8) are too small for every VM plus the rollout surge: use a larger secondary_cidr."
    }
  }

  log_config {
    aggregation_interval = "INTERVAL_5_SEC"
    flow_sampling        = 0.5
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

resource "google_compute_instance_template" "gateway" {
  project        = var.project_id
  name_prefix    = "${var.name_prefix}-"
  description    = "egressgate on Container-Optimized OS, started by cloud-init"
  machine_type   = var.machine_type
  can_ip_forward = false
  tags           = ["${var.name_prefix}-gateway"]
  labels         = var.labels

  disk {
    source_image = var.cos_image
    boot         = true
    auto_delete  = true
    disk_size_gb = 20
    disk_type    = "pd-balanced"
  }

  network_interface {
    subnetwork = google_compute_subnetwork.gateway.id
    # No access_config block: the VMs have no external IP. Outbound traffic leaves only through the
    # per-profile Cloud NAT gateways, from these alias addresses:
    dynamic "alias_ip_range" {
      for_each = var.egress_profiles
      content {
        ip_cidr_range         = "/32"
        subnetwork_range_name = local.secondary_range_name[alias_ip_range.key]
      }
    }
  }

  metadata = {
    user-data                 = local.cloud_init
    enable-oslogin            = "TRUE"
    block-project-ssh-keys    = "TRUE"
    serial-port-enable        = "FALSE"
    google-logging-enabled    = "true"
    google-monitoring-enabled = "true"
  }

  shielded_instance_config {
    enable_secure_boot          = true
    enable_vtpm                 = true
    enable_integrity_monitoring = true
  }

  service_account {
    email  = google_service_account.gateway.email
    scopes = ["cloud-platform"] # access is limited by the account's IAM roles, not by scopes
  }

  scheduling {
    automatic_restart   = true
    on_host_maintenance = "MIGRATE"
    preemptible         = false
  }

  lifecycle {
    create_before_destroy = true
    precondition {
      condition     = contains(keys(var.egress_profiles), var.default_profile)
      error_message = "default_profile must be one of the keys of egress_profiles."
    }
    precondition {
      condition     = alltrue(flatten([for c in var.clients : [for e in c.egress : contains(keys(var.egress_profiles), e)]]))
      error_message = "Every clients[].egress entry must be a key of egress_profiles."
    }
  }
}

# Liveness for autohealing: /healthz (process alive). Deliberately NOT /readyz: a wrong egress IP
# makes /readyz fail, and recreating VMs would not fix that.
resource "google_compute_health_check" "live" {
  project             = var.project_id
  name                = "${var.name_prefix}-live"
  check_interval_sec  = 10
  timeout_sec         = 5
  healthy_threshold   = 2
  unhealthy_threshold = 3
  http_health_check {
    port         = local.admin_port
    request_path = "/healthz"
  }
  log_config {
    enable = true
  }
}

resource "google_compute_region_instance_group_manager" "gateway" {
  project                   = var.project_id
  name                      = "${var.name_prefix}-mig"
  region                    = var.region
  base_instance_name        = "${var.name_prefix}"
  target_size               = var.instance_count
  distribution_policy_zones = length(var.zones) > 0 ? var.zones : null
  wait_for_instances        = false

  version {
    name              = "primary"
    instance_template = google_compute_instance_template.gateway.id
  }

  named_port {
    name = "proxy"
    port = local.proxy_port
  }

  auto_healing_policies {
    health_check      = google_compute_health_check.live.id
    initial_delay_sec = 180
  }

  # Surge only: new VMs come up (and pass health checks) before old ones are removed; the old ones
  # get SIGTERM via `docker stop` and drain while the LB drains their connections.
  update_policy {
    type                           = "PROACTIVE"
    minimal_action                 = "REPLACE"
    most_disruptive_allowed_action = "REPLACE"
    replacement_method             = "SUBSTITUTE"
    instance_redistribution_type   = "PROACTIVE"
    max_surge_fixed                = local.max_surge
    max_unavailable_fixed          = 0
  }
}

# The COS image is resolved here, at plan time, and written into the instance template: VMs that
# autohealing or scaling creates later get exactly this image. An OS update is an explicit apply
# (a new template, a surge-only rollout); pin var.cos_image to hold it.
data "google_compute_image" "cos" {
  count   = var.cos_image == null ? 1 : 0
  project = "cos-cloud"
  family  = var.cos_image_family
}

resource "google_compute_instance_template" "gateway" {
  project        = var.project_id
  name_prefix    = "${var.name_prefix}-"
  description    = "egressgate on Container-Optimized OS, started by cloud-init"
  machine_type   = var.machine_type
  can_ip_forward = false
  tags           = ["${var.name_prefix}-gateway"]
  labels         = var.labels

  disk {
    source_image = var.cos_image != null ? var.cos_image : data.google_compute_image.cos[0].self_link
    boot         = true
    auto_delete  = true
    disk_size_gb = 20
    disk_type    = "pd-balanced"
  }

  network_interface {
    subnetwork = google_compute_subnetwork.gateway.id
    # No access_config block: the VMs have no external IP. Outbound traffic leaves only through the
    # per-member Cloud NAT gateways, from these alias addresses (one per slot of every profile;
    # which slot holds which member is project metadata, so it never changes this template):
    dynamic "alias_ip_range" {
      for_each = local.slot_by_key
      content {
        ip_cidr_range         = "/32"
        subnetwork_range_name = alias_ip_range.value.range_name
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
    precondition {
      condition     = alltrue(flatten([for c in var.workload_clients : [for e in c.egress : contains(keys(var.egress_profiles), e)]]))
      error_message = "Every workload_clients[].egress entry must be a key of egress_profiles."
    }
    precondition {
      condition     = length(var.workload_clients) == 0 || var.kubernetes_issuer != null
      error_message = "workload_clients need kubernetes_issuer (the GKE cluster's service-account issuer URL)."
    }
    precondition {
      # The VM can pull only from the registry it is configured for and whose reader role it has.
      condition     = startswith(var.image, "${local.registry_path}/")
      error_message = "image must be in the module's repository: ${local.registry_path}/... (artifact_registry_location / artifact_registry_repository / project_id disagree with image)."
    }
    precondition {
      condition     = !var.enable_metrics_collector || startswith(local.collector_image, "${local.registry_path}/")
      error_message = "metrics_collector_image must be in the module's repository (${local.registry_path}/...): the VMs have no route to other registries."
    }
    precondition {
      condition     = var.allow_broad_client_cidrs || alltrue([for c in var.client_cidrs : tonumber(split("/", c)[1]) >= 16])
      error_message = "client_cidrs has a range wider than /16: list the clients' NAT IPs, or set allow_broad_client_cidrs = true if you mean it (e.g. an INTERNAL load balancer and a GKE pod range)."
    }
  }
}

# Autohealing (and the rollout gate) on LIVENESS, /healthz: a VM is re-created only when its gateway
# is dead or hung - a fault of that VM. Readiness (/readyz, which depends on the egress-IP check and
# so on outside IP-echo services) steers only the load balancer (lb.tf): an outage shared by every VM
# must never re-create the fleet. Design: docs/deploy-gcp.md, "Health checks".
resource "google_compute_health_check" "autoheal" {
  project             = var.project_id
  name                = "${var.name_prefix}-autoheal"
  check_interval_sec  = 30
  timeout_sec         = 10
  healthy_threshold   = 1
  unhealthy_threshold = 10
  http_health_check {
    port         = local.admin_port
    request_path = "/healthz" # liveness only: see docs/deploy-gcp.md, "Health checks"
  }
  log_config {
    enable = true
  }
}

resource "google_compute_region_instance_group_manager" "gateway" {
  project                   = var.project_id
  name                      = "${var.name_prefix}-mig"
  region                    = var.region
  base_instance_name        = var.name_prefix
  target_size               = var.autoscaling == null ? var.instance_count : null # the autoscaler owns it
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
    health_check      = google_compute_health_check.autoheal.id
    initial_delay_sec = 180
  }

  # Surge only: new VMs come up and pass /readyz (the autohealing check) before old ones are
  # removed. An old VM is first drained by the load balancer (drain_timeout_sec, the VM still
  # runs), then stopped: `docker stop` sends SIGTERM and the gateway closes what is left.
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

# Scale on CPU (a proxy is CPU-bound: TLS, parsing, copying). Not on connections: the connection
# gauge lives in Managed Service for Prometheus under the prometheus_target resource, which the MIG
# autoscaler cannot use as a per-instance metric; limits.max_connections caps each VM instead.
resource "google_compute_region_autoscaler" "gateway" {
  count   = var.autoscaling == null ? 0 : 1
  project = var.project_id
  name    = "${var.name_prefix}-autoscaler"
  region  = var.region
  target  = google_compute_region_instance_group_manager.gateway.id

  autoscaling_policy {
    min_replicas    = var.autoscaling.min_replicas
    max_replicas    = var.autoscaling.max_replicas
    cooldown_period = var.autoscaling.cooldown_period
    mode            = "ON"
    cpu_utilization {
      target = var.autoscaling.cpu_target
    }
    # Tunnels are long-lived: scale in one VM per 10 minutes at most.
    scale_in_control {
      time_window_sec = 600
      max_scaled_in_replicas {
        fixed = 1
      }
    }
  }
}

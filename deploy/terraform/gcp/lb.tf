# Regional passthrough Network Load Balancer (backend-service based) with a static IP:
#   EXTERNAL (default): a public IP; clients from the internet, e.g. a GKE cluster's Cloud NAT IP.
#     Proxy credentials then cross the internet: set var.tls (https:// proxy URLs).
#   INTERNAL: an address of the gateway subnet; clients in this VPC or a peered one (GKE pods or
#     nodes, by their own IPs). Nothing is exposed publicly.
# Passthrough either way: the VMs see the real client IP, which firewall.tf, the host firewall and
# the gateway's clients[].from all check.
resource "google_compute_address" "lb" {
  project      = var.project_id
  name         = "${var.name_prefix}-lb"
  region       = var.region
  address_type = var.load_balancer_scheme
  subnetwork   = local.internal_lb ? google_compute_subnetwork.gateway.id : null
  network_tier = local.internal_lb ? null : "PREMIUM"
  labels       = var.labels
}

# Readiness for traffic: /readyz (listener open, not draining, at least one profile serving).
resource "google_compute_region_health_check" "ready" {
  project             = var.project_id
  name                = "${var.name_prefix}-ready"
  region              = var.region
  check_interval_sec  = 5
  timeout_sec         = 5
  healthy_threshold   = 2
  unhealthy_threshold = 2
  http_health_check {
    port         = local.admin_port
    request_path = "/readyz"
  }
  log_config {
    enable = true
  }
}

resource "google_compute_region_backend_service" "gateway" {
  project               = var.project_id
  name                  = "${var.name_prefix}-backend"
  region                = var.region
  protocol              = "TCP"
  load_balancing_scheme = var.load_balancer_scheme
  network               = local.internal_lb ? google_compute_network.gateway.id : null
  session_affinity      = "NONE"
  health_checks         = [google_compute_region_health_check.ready.id]

  # A VM leaving the group (rolling update, scale-in) stops getting new connections at once and
  # keeps its open ones this long; only then does the MIG stop it (SIGTERM, see locals.tf).
  connection_draining_timeout_sec = var.drain_timeout_sec

  backend {
    group          = google_compute_region_instance_group_manager.gateway.instance_group
    balancing_mode = "CONNECTION"
  }
}

resource "google_compute_forwarding_rule" "gateway" {
  project               = var.project_id
  name                  = "${var.name_prefix}-proxy"
  region                = var.region
  load_balancing_scheme = var.load_balancer_scheme
  ip_protocol           = "TCP"
  ports                 = [tostring(local.proxy_port)]
  ip_address            = google_compute_address.lb.address
  network_tier          = local.internal_lb ? null : "PREMIUM"
  network               = local.internal_lb ? google_compute_network.gateway.id : null
  subnetwork            = local.internal_lb ? google_compute_subnetwork.gateway.id : null
  allow_global_access   = local.internal_lb ? var.internal_lb_global_access : null
  backend_service       = google_compute_region_backend_service.gateway.id
  labels                = var.labels
}

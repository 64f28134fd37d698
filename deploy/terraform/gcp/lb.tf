# Regional external passthrough Network Load Balancer (backend-service based) with a static IP.
resource "google_compute_address" "lb" {
  project      = var.project_id
  name         = "${var.name_prefix}-lb"
  region       = var.region
  address_type = "EXTERNAL"
  network_tier = "PREMIUM"
  labels       = var.labels
}

# Readiness for traffic: /readyz (config loaded, egress IPs as expected).
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
  project                         = var.project_id
  name                            = "${var.name_prefix}-backend"
  region                          = var.region
  protocol                        = "TCP"
  load_balancing_scheme           = "EXTERNAL"
  session_affinity                = "NONE"
  health_checks                   = [google_compute_region_health_check.ready.id]
  connection_draining_timeout_sec = var.drain_timeout_sec + 10

  backend {
    group          = google_compute_region_instance_group_manager.gateway.instance_group
    balancing_mode = "CONNECTION"
  }
}

resource "google_compute_forwarding_rule" "gateway" {
  project               = var.project_id
  name                  = "${var.name_prefix}-proxy"
  region                = var.region
  load_balancing_scheme = "EXTERNAL"
  ip_protocol           = "TCP"
  ports                 = [tostring(local.proxy_port)]
  ip_address            = google_compute_address.lb.address
  network_tier          = "PREMIUM"
  backend_service       = google_compute_region_backend_service.gateway.id
  labels                = var.labels
}

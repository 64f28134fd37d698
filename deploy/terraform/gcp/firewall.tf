# Ingress to the gateway VMs: clients on the proxy port, health checkers on the admin port, nothing
# else. The passthrough load balancer keeps the client's source IP, so these rules see the real
# client (e.g. the GKE cluster's Cloud NAT IP).

resource "google_compute_firewall" "clients" {
  project                 = var.project_id
  name                    = "${var.name_prefix}-allow-clients"
  network                 = google_compute_network.gateway.id
  direction               = "INGRESS"
  priority                = 1000
  source_ranges           = var.client_cidrs
  target_service_accounts = [google_service_account.gateway.email]
  allow {
    protocol = "tcp"
    ports    = [tostring(local.proxy_port)]
  }
  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

resource "google_compute_firewall" "lb_health_checks" {
  project                 = var.project_id
  name                    = "${var.name_prefix}-allow-lb-hc"
  network                 = google_compute_network.gateway.id
  direction               = "INGRESS"
  priority                = 1000
  source_ranges           = local.lb_health_check_ranges
  target_service_accounts = [google_service_account.gateway.email]
  allow {
    protocol = "tcp"
    ports    = [tostring(local.admin_port)]
  }
  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

resource "google_compute_firewall" "autohealing_health_checks" {
  project                 = var.project_id
  name                    = "${var.name_prefix}-allow-autoheal-hc"
  network                 = google_compute_network.gateway.id
  direction               = "INGRESS"
  priority                = 1000
  source_ranges           = local.autohealing_health_check_ranges
  target_service_accounts = [google_service_account.gateway.email]
  allow {
    protocol = "tcp"
    ports    = [tostring(local.admin_port)]
  }
  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

resource "google_compute_firewall" "iap_ssh" {
  count                   = var.enable_iap_ssh ? 1 : 0
  project                 = var.project_id
  name                    = "${var.name_prefix}-allow-iap-ssh"
  network                 = google_compute_network.gateway.id
  direction               = "INGRESS"
  priority                = 1000
  source_ranges           = local.iap_tcp_forwarding_range
  target_service_accounts = [google_service_account.gateway.email]
  allow {
    protocol = "tcp"
    ports    = ["22"]
  }
  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

# Explicit, logged default deny (a custom VPC already denies ingress implicitly).
resource "google_compute_firewall" "deny_all_ingress" {
  project       = var.project_id
  name          = "${var.name_prefix}-deny-all-ingress"
  network       = google_compute_network.gateway.id
  direction     = "INGRESS"
  priority      = 65534
  source_ranges = ["0.0.0.0/0"]
  deny {
    protocol = "all"
  }
  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

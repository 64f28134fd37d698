locals {
  sa_roles_project = ["roles/logging.logWriter", "roles/monitoring.metricWriter"]

  # Health-check probe sources (Google "Firewall rules" for load balancing / health checks).
  # Backend-service-based EXTERNAL passthrough NLB probes:
  lb_health_check_ranges = ["35.191.0.0/16", "209.85.152.0/22", "209.85.204.0/22"]
  # Autohealing (non-LB) health-check probes:
  autohealing_health_check_ranges = ["35.191.0.0/16", "130.211.0.0/22"]
  iap_tcp_forwarding_range        = ["35.235.240.0/20"]

  proxy_port = 3128
  admin_port = 9128

  # Regional MIG: a fixed surge must be 0 or >= the number of zones.
  max_surge = max(3, length(var.zones))

  registry_location = coalesce(var.artifact_registry_location, var.region)
  registry_host     = "${local.registry_location}-docker.pkg.dev"

  secondary_range_name = { for name, _ in var.egress_profiles : name => "${var.name_prefix}-${name}" }

  nat_ip_names = toset(flatten([for _, p in var.egress_profiles : concat(p.nat_ip_names, p.draining_nat_ip_names, p.reserved_nat_ip_names)]))

  # Gateway config pieces, rendered by templates/egressgate.yaml.tftpl. A profile's bind address is
  # the placeholder "@ALIAS_IN:<secondary cidr>@"; files/render-config.sh replaces it on each VM with
  # that VM's alias IP inside the range (alias IPs differ per VM and are known only at boot).
  # expect_ip lists ALL of the profile's addresses (active, draining, reserved): an IP switch then
  # changes only the NAT, not the instance template, so it does not roll the VMs.
  gateway_egress = {
    for name, p in var.egress_profiles : name => {
      bind      = ["@ALIAS_IN:${p.secondary_cidr}@"]
      expect_ip = [for n in concat(p.nat_ip_names, p.draining_nat_ip_names, p.reserved_nat_ip_names) : google_compute_address.nat[n].address]
    }
  }
  gateway_clients = [
    for c in var.clients : merge(
      {
        name          = c.name
        from          = var.client_cidrs
        username      = c.username
        password_hash = c.password_hash
        egress        = c.egress
      },
      c.allow == null ? {} : { allow = c.allow },
    )
  ]

  gateway_config = templatefile("${path.module}/templates/egressgate.yaml.tftpl", {
    default_profile = var.default_profile
    proxy_port      = local.proxy_port
    admin_port      = local.admin_port
    drain_timeout   = var.drain_timeout_sec
    egress          = local.gateway_egress
    clients         = local.gateway_clients
    connect_ports   = var.connect_ports
  })

  cloud_init = templatefile("${path.module}/templates/cloud-init.yaml.tftpl", {
    image            = var.image
    registry_host    = local.registry_host
    gateway_config   = local.gateway_config
    render_script    = file("${path.module}/files/render-config.sh")
    stop_timeout     = var.drain_timeout_sec + 10
    systemd_stop_sec = var.drain_timeout_sec + 30
  })
}

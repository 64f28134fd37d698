locals {
  sa_roles_project = ["roles/logging.logWriter", "roles/monitoring.metricWriter"]

  internal_lb = var.load_balancer_scheme == "INTERNAL"

  # Health-check probe sources (Google "Firewall rules" for load balancing / health checks).
  # Backend-service-based EXTERNAL passthrough NLB probes come from these:
  external_lb_health_check_ranges = ["35.191.0.0/16", "209.85.152.0/22", "209.85.204.0/22"]
  # INTERNAL passthrough NLB probes (and every non-LB health check, such as autohealing):
  internal_lb_health_check_ranges = ["35.191.0.0/16", "130.211.0.0/22"]
  lb_health_check_ranges          = local.internal_lb ? local.internal_lb_health_check_ranges : local.external_lb_health_check_ranges
  autohealing_health_check_ranges = ["35.191.0.0/16", "130.211.0.0/22"]
  iap_tcp_forwarding_range        = ["35.235.240.0/20"]

  proxy_port = 3128
  admin_port = 9128

  # Regional MIG: a fixed surge must be 0 or >= the number of zones.
  max_surge     = max(3, length(var.zones))
  max_instances = var.autoscaling == null ? var.instance_count : var.autoscaling.max_replicas

  # Stopping a VM: GCE gives the guest about 90 s between the ACPI shutdown and power-off (no
  # graceful-shutdown extension is configured). The long drain happens before that, in the load
  # balancer (connection_draining_timeout_sec = var.drain_timeout_sec, the VM is still running);
  # the SIGTERM drain only finishes what is left, and every number below fits the 90 s.
  vm_stop_drain_sec  = 20                          # gateway drain.timeout after SIGTERM
  docker_stop_sec    = local.vm_stop_drain_sec + 5 # docker stop --time: SIGKILL after this
  systemd_stop_sec   = local.docker_stop_sec + 10  # TimeoutStopSec of the unit
  gce_shutdown_limit = 90

  registry_location = coalesce(var.artifact_registry_location, var.region)
  registry_host     = "${local.registry_location}-docker.pkg.dev"
  registry_path     = "${local.registry_host}/${var.project_id}/${var.artifact_registry_repository}"
  collector_image   = coalesce(var.metrics_collector_image, "${local.registry_path}/opentelemetry-collector-contrib:0.116.1")

  # Every profile's secondary_cidr is cut into 8 slot ranges; the first `slots` exist as secondary
  # ranges of the subnet, and every VM takes one alias IP from each. A member occupies one slot.
  slot_newbits = 3
  slots = flatten([for name, p in var.egress_profiles : [for i in range(p.slots) : {
    key        = "${name}-${i}"
    profile    = name
    slot       = i
    range_name = "${var.name_prefix}-${name}-${i}"
    cidr       = cidrsubnet(p.secondary_cidr, local.slot_newbits, i)
  }]])
  slot_by_key = { for s in local.slots : s.key => s }

  # Every member (active or standby), keyed by its static IP's name: a promotion moves a member
  # between the lists without changing its key, so no NAT is replaced by it.
  members = merge([for name, p in var.egress_profiles : merge(
    { for m in p.active : m.ip => merge(local.slot_by_key["${name}-${m.slot}"], { role = "active", ip = m.ip }) },
    { for m in p.standby : m.ip => merge(local.slot_by_key["${name}-${m.slot}"], { role = "standby", ip = m.ip }) },
  )]...)

  nat_gateway_name         = { for ip, _ in local.members : ip => "${var.name_prefix}-nat-${ip}" }
  nat_gateway_names_filter = join(", ", [for _, n in local.nat_gateway_name : jsonencode(n)])

  # Who is active and who is standby, read by every VM from the project metadata (metadata.tf) and
  # rendered into the gateway config by files/render-config.sh (it waits for changes): one line per
  # member, "PROFILE ROLE SLOT_CIDR PUBLIC_IP", sorted. Not in the instance template, so a change
  # never replaces a VM.
  members_metadata_key = "${var.name_prefix}-egress-members"
  members_metadata = join("\n", sort([
    for ip, m in local.members : "${m.profile} ${m.role} ${m.cidr} ${google_compute_address.nat[ip].address}"
  ]))

  # var.tls is sensitive (it may hold a private key). Whether TLS is on, and the Secret Manager
  # secret ids, are not secrets: unmarked, so they can key for_each and appear in outputs.
  tls_enabled     = nonsensitive(var.tls != null)
  tls_from_secret = nonsensitive(var.tls != null && try(var.tls.cert_secret, null) != null)
  tls_secrets     = local.tls_from_secret ? toset([nonsensitive(var.tls.cert_secret), nonsensitive(var.tls.key_secret)]) : toset([])

  # Gateway config pieces, rendered by templates/egressgate.yaml.tftpl. A profile's members are
  # placeholders ("@MEMBERS:<profile>:active|standby|ips@"): files/render-config.sh replaces them on
  # each VM with this VM's alias IPs in the slots of the profile's active and standby members and
  # with their public IPs (expect_ip), from the project metadata. So the template (and the instance
  # template) never names a member: promoting one or adding a standby does not roll the VMs.
  gateway_egress = {
    for name, p in var.egress_profiles : name => {
      bind      = "@MEMBERS:${name}:active@"
      standby   = "@MEMBERS:${name}:standby@"
      expect_ip = "@MEMBERS:${name}:ips@"
    }
  }
  gateway_clients = concat([
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
    ], [
    for c in var.workload_clients : merge(
      {
        name = c.name
        from = var.client_cidrs
        kubernetes = {
          issuer           = var.kubernetes_issuer
          audiences        = ["egressgate"]
          service_accounts = c.service_accounts
        }
        egress = c.egress
      },
      c.allow == null ? {} : { allow = c.allow },
    )
  ])
  gateway_listen = [merge(
    {
      address = "0.0.0.0:${local.proxy_port}"
      egress  = var.default_profile
    },
    local.tls_enabled ? { tls = { cert = "/etc/egressgate/tls/tls.crt", key = "/etc/egressgate/tls/tls.key" } } : {},
  )]

  # The whole gateway config: what the module derives (listener, admin, drain, probe, profiles with
  # their bind placeholders and expect_ip, clients, connect ports) with var.gateway_config merged over
  # it (rules in variables.tf), so any gateway feature is reachable without editing the template.
  gateway_user        = var.gateway_config
  gateway_user_egress = try(local.gateway_user.egress, {})
  gateway_merged_keys = ["listen", "admin", "drain", "workers", "probe", "egress", "clients", "security", "fleet"]
  gateway_config_object = merge(
    { for k, v in local.gateway_user : k => v if !contains(local.gateway_merged_keys, k) },
    {
      listen = concat(local.gateway_listen, try(local.gateway_user.listen, []))
      admin  = merge({ address = "0.0.0.0:${local.admin_port}" }, try(local.gateway_user.admin, {}))
      drain  = merge({ timeout = local.vm_stop_drain_sec }, try(local.gateway_user.drain, {}))
      # The VM runs nothing else: one worker process per vCPU, sharing the port (SO_REUSEPORT).
      workers = try(local.gateway_user.workers, "auto")
      probe = merge({
        echo_url = concat([var.probe_echo_url], var.probe_fallback_echo_urls)
        interval = "60s"
        grace    = var.probe_grace
      }, try(local.gateway_user.probe, {}))
      egress = merge(
        { for name, p in local.gateway_egress : name => merge(p, try(local.gateway_user_egress[name], {})) },
        { for name, p in local.gateway_user_egress : name => p if !contains(keys(local.gateway_egress), name) },
      )
      clients  = concat(local.gateway_clients, try(local.gateway_user.clients, []))
      security = merge({ connect_ports = var.connect_ports }, try(local.gateway_user.security, {}))
    },
    # The fleet store (memorystore.tf), when there is one: shared by every VM of the group.
    { for k, v in { fleet = merge(try(local.gateway_user.fleet, {}), { redis = local.fleet_redis }) } : k => v if local.fleet_redis != null },
  )
  gateway_config = templatefile("${path.module}/templates/egressgate.yaml.tftpl", {
    config = local.gateway_config_object
  })

  # The host firewall of Container-Optimized OS (files/firewall.sh, run before every service start).
  firewall_script = templatefile("${path.module}/templates/firewall.sh.tftpl", {
    proxy_port    = local.proxy_port
    admin_port    = local.admin_port
    proxy_sources = join(" ", var.client_cidrs)
    admin_sources = join(" ", distinct(concat(local.lb_health_check_ranges, local.autohealing_health_check_ranges)))
  })

  collector_config = templatefile("${path.module}/templates/otel-collector.yaml.tftpl", {
    admin_port = local.admin_port
    project_id = var.project_id
  })

  tls_fetch_mode = !local.tls_enabled ? "none" : (local.tls_from_secret ? "secret-manager" : "files")

  cloud_init = templatefile("${path.module}/templates/cloud-init.yaml.tftpl", {
    image            = var.image
    registry_host    = local.registry_host
    gateway_config   = local.gateway_config
    render_script    = file("${path.module}/files/render-config.sh")
    members_key      = local.members_metadata_key
    firewall_script  = local.firewall_script
    tls_script       = file("${path.module}/files/fetch-tls.sh")
    tls_mode         = local.tls_fetch_mode
    tls_cert_secret  = local.tls_from_secret ? var.tls.cert_secret : ""
    tls_key_secret   = local.tls_from_secret ? var.tls.key_secret : ""
    tls_cert_pem     = local.tls_enabled && !local.tls_from_secret ? var.tls.cert_pem : ""
    tls_key_pem      = local.tls_enabled && !local.tls_from_secret ? var.tls.key_pem : ""
    fleet_secret     = local.fleet_store_secret != null ? local.fleet_store_secret : ""
    fleet_ca_pem     = local.fleet_store_ca_pem != null ? local.fleet_store_ca_pem : ""
    collector_on     = var.enable_metrics_collector ? "yes" : "no"
    collector_image  = local.collector_image
    collector_config = local.collector_config
    stop_timeout     = local.docker_stop_sec
    systemd_stop_sec = local.systemd_stop_sec
  })
}

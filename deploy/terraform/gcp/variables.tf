variable "project_id" {
  description = "GCP project that hosts the gateway. Create it without the default network (google_project.auto_create_network = false or org policy compute.skipDefaultNetworkCreation)."
  type        = string
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id must be a valid GCP project ID (6-30 chars, lowercase letters, digits, hyphens)."
  }
}

variable "region" {
  description = "Region for the subnet, Cloud NAT, load balancer and the regional MIG, e.g. europe-west1."
  type        = string
  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]+$", var.region))
    error_message = "region must look like europe-west1 or us-central1."
  }
}

variable "zones" {
  description = "Zones of the region the MIG spreads over. Empty = let the MIG choose."
  type        = list(string)
  default     = []
  validation {
    condition     = alltrue([for z in var.zones : can(regex("^[a-z]+-[a-z]+[0-9]+-[a-z]$", z))])
    error_message = "zones must be zone names such as europe-west1-b."
  }
}

variable "name_prefix" {
  description = "Prefix of every resource name."
  type        = string
  default     = "egressgate"
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{2,18}[a-z0-9]$", var.name_prefix))
    error_message = "name_prefix: 4 to 20 lowercase letters, digits or hyphens, a letter first and no hyphen last (the VM service account id \"<name_prefix>-vm\" needs 6 to 30 characters)."
  }
}

variable "subnet_cidr" {
  description = "Primary range of the gateway subnet (the VMs' own addresses; NOT NATed)."
  type        = string
  default     = "10.10.0.0/24"
  validation {
    condition     = can(cidrhost(var.subnet_cidr, 0)) && tonumber(split("/", var.subnet_cidr)[1]) <= 28
    error_message = "subnet_cidr must be an IPv4 CIDR of /28 or larger."
  }
}

variable "egress_ips" {
  description = <<-EOT
    The static egress IPs to reserve (google_compute_address names, without the name prefix). A
    reserved IP carries no traffic until a profile member names it (egress_profiles[*].active or
    .standby). Rotation (docs/deploy-gcp.md): reserve here, add it as a standby member, see every
    provider accept it, promote it, drain the old member, then release: take the old IP out of its
    profile first and out of this list after (the module refuses to release an IP a member uses).
  EOT
  type        = list(string)
  validation {
    condition     = length(var.egress_ips) == length(distinct(var.egress_ips))
    error_message = "egress_ips: an IP name is listed twice."
  }
  validation {
    condition     = alltrue([for n in var.egress_ips : can(regex("^[a-z][a-z0-9-]{0,29}$", n))])
    error_message = "egress_ips names: lowercase letter first, then up to 29 lowercase letters, digits or hyphens."
  }
}

variable "egress_profiles" {
  description = <<-EOT
    One entry per gateway egress profile. Every MEMBER of a profile (active or standby) is a distinct
    source address: its own range of the subnet (a slot: every VM takes one alias IP from it), its own
    Cloud NAT gateway and its own static IP (an egress_ips name), so the gateway attests each member
    and checks it against every provider before it carries a job's traffic.
    secondary_cidr is the profile's block, cut into 8 slot ranges (cidrsubnet(secondary_cidr, 3, i));
    `slots` of them exist on every VM (fixed when the VMs are created: adding a slot rolls the VMs).
    active: the members new connections use; standby: members checked but carrying no job traffic.
    Each member is { ip = <egress_ips name>, slot = <0..slots-1> }. Moving a member between active
    and standby (a promotion) or adding one to a free slot changes only the NATs and the project
    metadata the VMs watch: running VMs take it live, open tunnels stay.
  EOT
  type = map(object({
    secondary_cidr = string
    slots          = optional(number, 3)
    active         = list(object({ ip = string, slot = number }))
    standby        = optional(list(object({ ip = string, slot = number })), [])
  }))
  validation {
    condition     = length(var.egress_profiles) > 0
    error_message = "Define at least one egress profile."
  }
  validation {
    condition     = alltrue([for name, _ in var.egress_profiles : can(regex("^[a-z][a-z0-9-]{0,19}$", name))])
    error_message = "Profile names: lowercase letter first, then up to 19 lowercase letters, digits or hyphens."
  }
  validation {
    condition     = alltrue([for _, p in var.egress_profiles : can(cidrhost(p.secondary_cidr, 0)) && tonumber(split("/", p.secondary_cidr)[1]) <= 26])
    error_message = "Every secondary_cidr must be an IPv4 CIDR of /26 or larger (it is cut into 8 slot ranges)."
  }
  validation {
    # Two CIDRs overlap when their network addresses agree on the shorter of the two prefixes.
    condition     = alltrue(flatten([for a, pa in var.egress_profiles : [for b, pb in var.egress_profiles : a == b || cidrhost("${cidrhost(pa.secondary_cidr, 0)}/${min(tonumber(split("/", pa.secondary_cidr)[1]), tonumber(split("/", pb.secondary_cidr)[1]))}", 0) != cidrhost("${cidrhost(pb.secondary_cidr, 0)}/${min(tonumber(split("/", pa.secondary_cidr)[1]), tonumber(split("/", pb.secondary_cidr)[1]))}", 0)]]))
    error_message = "The secondary_cidr ranges of two profiles overlap: each profile needs its own range (Cloud NAT picks the egress IP by source range)."
  }
  validation {
    condition     = alltrue([for _, p in var.egress_profiles : p.slots >= 1 && p.slots <= 8 && floor(p.slots) == p.slots])
    error_message = "slots must be a whole number from 1 to 8 (a profile's secondary_cidr is cut into 8 slot ranges)."
  }
  validation {
    condition     = alltrue([for _, p in var.egress_profiles : length(p.active) > 0])
    error_message = "Every profile needs at least one active member (a profile without one refuses all its traffic)."
  }
  validation {
    condition     = alltrue(flatten([for _, p in var.egress_profiles : [for m in concat(p.active, p.standby) : m.slot >= 0 && m.slot < p.slots && floor(m.slot) == m.slot]]))
    error_message = "A member's slot must be a whole number from 0 to the profile's slots - 1 (the alias ranges every VM has)."
  }
  validation {
    condition     = alltrue(flatten([for name, p in var.egress_profiles : [for m in p.active : !contains([for s in p.standby : s.ip], m.ip)]]))
    error_message = "A member is both active and standby in the same profile: promoting moves it from standby to active (remove it from standby)."
  }
  validation {
    condition     = length(flatten([for _, p in var.egress_profiles : [for m in concat(p.active, p.standby) : m.ip]])) == length(distinct(flatten([for _, p in var.egress_profiles : [for m in concat(p.active, p.standby) : m.ip]])))
    error_message = "An egress IP is used by two members (in one profile or in two): every member needs its own static IP."
  }
  validation {
    condition     = alltrue([for _, p in var.egress_profiles : length(concat(p.active, p.standby)) == length(distinct([for m in concat(p.active, p.standby) : m.slot]))])
    error_message = "Two members of a profile share a slot: every member needs its own slot (its own alias range and Cloud NAT gateway)."
  }
  validation {
    condition     = alltrue(flatten([for _, p in var.egress_profiles : [for m in concat(p.active, p.standby) : contains(var.egress_ips, m.ip)]]))
    error_message = "A profile member names an IP that is not in egress_ips: reserve it there first, and release an IP (remove it from egress_ips) only after no member uses it."
  }
}

variable "default_profile" {
  description = "Profile used by clients that name none (must be a key of egress_profiles)."
  type        = string
}

variable "client_cidrs" {
  description = "Source CIDRs allowed to reach the proxy port, e.g. the GKE cluster's Cloud NAT IPs as /32. Enforced by the VPC firewall and by the gateway's clients[].from."
  type        = list(string)
  validation {
    condition     = length(var.client_cidrs) > 0 && alltrue([for c in var.client_cidrs : can(cidrhost(c, 0))])
    error_message = "client_cidrs must be a non-empty list of IPv4 CIDRs."
  }
  validation {
    condition     = alltrue([for c in var.client_cidrs : tonumber(split("/", c)[1]) >= 8])
    error_message = "client_cidrs must not open the proxy to the world (prefixes shorter than /8 are refused)."
  }
}

variable "allow_broad_client_cidrs" {
  description = "client_cidrs entries wider than /16 are refused unless this is true (e.g. an INTERNAL load balancer reached from a GKE pod range such as a /14)."
  type        = bool
  default     = false
}

variable "clients" {
  description = "Gateway clients (jobs). password_hash comes from `egressgate hash-password`; allow = null means any public host."
  type = list(object({
    name          = string
    username      = string
    password_hash = string
    egress        = list(string)
    allow         = optional(list(string))
  }))
  validation {
    condition     = length(var.clients) > 0
    error_message = "Define at least one client."
  }
  validation {
    condition     = alltrue([for c in var.clients : length(c.egress) > 0])
    error_message = "Every client needs at least one egress profile."
  }
  validation {
    # Exactly what `egressgate hash-password` prints: scrypt$N$r$p$salt$digest (N >= 16384).
    condition     = alltrue([for c in var.clients : can(regex("^scrypt\\$[0-9]{5,}\\$[0-9]+\\$[0-9]+\\$[A-Za-z0-9+/=_-]+\\$[A-Za-z0-9+/=_-]+$", c.password_hash))])
    error_message = "Every client needs a password_hash printed by `egressgate hash-password` (scrypt$N$r$p$salt$digest); placeholders are refused."
  }
  validation {
    condition     = alltrue([for c in var.clients : length(regexall("(?i)replace|changeme|example|placeholder", "${c.username} ${c.password_hash}")) == 0])
    error_message = "A client's username or password_hash still holds a placeholder (REPLACE, CHANGEME, example)."
  }
  validation {
    condition     = length(var.clients) == length(distinct([for c in var.clients : c.username]))
    error_message = "Client usernames must be unique."
  }
}

variable "kubernetes_issuer" {
  description = "The GKE cluster's service-account token issuer (`kubectl get --raw /.well-known/openid-configuration`: issuer), e.g. https://container.googleapis.com/v1/projects/P/locations/L/clusters/C. Needed by workload_clients; the gateway fetches its public keys (OIDC discovery, over Private Google Access) and verifies tokens offline."
  type        = string
  default     = null
  validation {
    condition     = var.kubernetes_issuer == null || can(regex("^https://[^/?#\\s]+(/[^?#\\s]*)?$", var.kubernetes_issuer))
    error_message = "kubernetes_issuer is an https:// URL without query or fragment."
  }
}

variable "workload_clients" {
  description = "Gateway clients identified by Kubernetes service-account tokens instead of passwords (pods with a projected token, audience egressgate): service_accounts as namespace/name or namespace/*. Needs kubernetes_issuer."
  type = list(object({
    name             = string
    service_accounts = list(string)
    egress           = list(string)
    allow            = optional(list(string))
  }))
  default = []
  validation {
    condition     = alltrue([for c in var.workload_clients : length(c.egress) > 0 && length(c.service_accounts) > 0])
    error_message = "Every workload client needs at least one egress profile and one service account."
  }
  validation {
    condition     = alltrue(flatten([for c in var.workload_clients : [for a in c.service_accounts : can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?/(\\*|[a-z0-9]([-a-z0-9.]*[a-z0-9])?)$", a))]]))
    error_message = "service_accounts entries are namespace/serviceaccount or namespace/*."
  }
}

variable "connect_ports" {
  description = "Ports CONNECT may reach (besides ports named in a client's allow)."
  type        = list(number)
  default     = [443]
  validation {
    condition     = alltrue([for p in var.connect_ports : p >= 1 && p <= 65535 && floor(p) == p])
    error_message = "connect_ports must be TCP ports (1-65535)."
  }
}

variable "image" {
  description = "Container image in Artifact Registry, preferably pinned by digest: REGION-docker.pkg.dev/PROJECT/REPO/egressgate@sha256:..."
  type        = string
  validation {
    condition     = can(regex("^[a-z0-9-]+-docker\\.pkg\\.dev/[^/]+/[^/]+/[^@:]+(@sha256:[0-9a-f]{64}|:[A-Za-z0-9_.-]+)$", var.image))
    error_message = "image must be an Artifact Registry Docker image (LOCATION-docker.pkg.dev/PROJECT/REPO/NAME) with a :tag or @sha256 digest."
  }
}

variable "artifact_registry_repository" {
  description = "Name of the existing Artifact Registry repository holding the image (the VM account gets reader on it only)."
  type        = string
}

variable "artifact_registry_location" {
  description = "Location of that repository; null = var.region."
  type        = string
  default     = null
}

variable "machine_type" {
  description = "Gateway VM machine type."
  type        = string
  default     = "e2-standard-2"
}

variable "cos_image" {
  description = "Exact Container-Optimized OS image (e.g. \"projects/cos-cloud/global/images/cos-stable-117-18613-164-4\") to pin it; null = the newest image of cos_image_family, resolved at plan time (data source), so an OS update is an explicit `terraform apply` that rolls the VMs, never a silent change at VM re-creation."
  type        = string
  default     = null
  validation {
    condition     = var.cos_image == null || can(regex("^(projects/)?cos-cloud/(global/images/)?cos-[a-z0-9-]+$", var.cos_image))
    error_message = "cos_image must be a Container-Optimized OS image of the cos-cloud project, e.g. projects/cos-cloud/global/images/cos-stable-117-18613-164-4."
  }
}

variable "cos_image_family" {
  description = "Container-Optimized OS image family used when cos_image is null."
  type        = string
  default     = "cos-stable"
  validation {
    condition     = can(regex("^cos-[a-z0-9-]+$", var.cos_image_family))
    error_message = "cos_image_family must be a cos-cloud family such as cos-stable or cos-113-lts."
  }
}

variable "instance_count" {
  description = "Number of gateway VMs in the regional MIG."
  type        = number
  default     = 2
  validation {
    condition     = var.instance_count >= 1 && var.instance_count <= 50 && floor(var.instance_count) == var.instance_count
    error_message = "instance_count must be an integer between 1 and 50."
  }
}

variable "drain_timeout_sec" {
  description = "How long a VM leaving the group (rolling update, scale-in, autohealing) keeps its open connections: the backend service's connection draining. Long tunnels still open after it are cut when the VM shuts down. The in-VM SIGTERM drain after it is short and fixed (local.vm_stop_drain_sec), inside GCE's shutdown window."
  type        = number
  default     = 300
  validation {
    condition     = var.drain_timeout_sec >= 0 && var.drain_timeout_sec <= 3600 && floor(var.drain_timeout_sec) == var.drain_timeout_sec
    error_message = "drain_timeout_sec must be a whole number of seconds between 0 and 3600 (the backend service's limit)."
  }
}

variable "nat_min_ports_per_vm" {
  description = "Cloud NAT ports reserved per VM and profile. A proxy opens many connections to few destinations: keep it high. (instance_count + surge) x this must fit 64512 x NAT IPs of each profile."
  type        = number
  default     = 4096
  validation {
    condition     = contains([64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768], var.nat_min_ports_per_vm)
    error_message = "nat_min_ports_per_vm must be a power of two between 64 and 32768."
  }
}

variable "enable_iap_ssh" {
  description = "Allow SSH (OS Login) from Google's IAP TCP-forwarding range only. Off by default."
  type        = bool
  default     = false
}

variable "labels" {
  description = "Labels for the resources that take labels."
  type        = map(string)
  default     = {}
}

variable "probe_echo_url" {
  description = "IP-echo service the gateway asks, through every profile, which public IP it leaves from (probe.echo_url): that check is what makes expect_ip, /readyz and the fail-closed profiles work. Replace the default with a service you trust (plain-text IP or JSON {\"ip\": ...})."
  type        = string
  default     = "https://api.ipify.org/"
  validation {
    condition     = can(regex("^https?://[^/@\\s]+(/\\S*)?$", var.probe_echo_url))
    error_message = "probe_echo_url must be an http:// or https:// URL without credentials."
  }
}

variable "gateway_config" {
  description = <<-EOT
    Any part of the gateway's configuration (the README's config reference, written as HCL), merged
    over what the module renders, so no feature needs a fork of the template: providers, protect,
    switch (verified, auto) and failover_after of a profile, a socks5 listener, deny rules, report
    mode, per-client limits, token clients, dns, log, reload ... Rules: `listen` and `clients`
    entries are APPENDED to the module's; `egress.<profile>` keys are merged into the module's
    profile of that name (its bind, standby and expect_ip come from egress_profiles' members: leave
    them to the module), other profiles are added; `admin`, `drain`, `probe` and `security` are
    merged key by key (yours win); every other key is taken as given.
    The tests render the example with a full gateway_config and run `egressgate check-config
    --offline --strict` on it.
  EOT
  type        = any
  default     = {}
  nullable    = false
  validation {
    condition     = can(keys(var.gateway_config))
    error_message = "gateway_config must be an object (the gateway config's top-level keys)."
  }
}

variable "probe_fallback_echo_urls" {
  description = "More IP-echo services, asked (in order) for a member when probe_echo_url gives no answer: one echo service being down must not leave every VM unverified. Independent operators, plain-text IP or JSON {\"ip\": ...}."
  type        = list(string)
  default     = ["https://checkip.amazonaws.com/"]
  validation {
    condition     = alltrue([for u in var.probe_fallback_echo_urls : can(regex("^https?://[^/@\\s]+(/\\S*)?$", u))])
    error_message = "probe_fallback_echo_urls must be http:// or https:// URLs without credentials."
  }
}

variable "probe_grace" {
  description = "Seconds a VM keeps a member's last good egress-IP check when no echo service answers (probe.grace; a wrong IP is never held). Bounds how long an echo outage goes unnoticed; 0 = no hold."
  type        = number
  default     = 600
  validation {
    condition     = var.probe_grace >= 0 && var.probe_grace <= 3600
    error_message = "probe_grace must be between 0 and 3600 seconds."
  }
}

variable "load_balancer_scheme" {
  description = "EXTERNAL: regional external passthrough NLB with a public static IP (clients from the internet, e.g. a GKE cluster's Cloud NAT IP; use tls, credentials cross the internet). INTERNAL: internal passthrough NLB in the gateway subnet, for GKE in the same or a peered VPC (clients = pod or node ranges); nothing is exposed publicly."
  type        = string
  default     = "EXTERNAL"
  validation {
    condition     = contains(["EXTERNAL", "INTERNAL"], var.load_balancer_scheme)
    error_message = "load_balancer_scheme must be EXTERNAL or INTERNAL."
  }
}

variable "internal_lb_global_access" {
  description = "INTERNAL only: let clients in other regions (of this or a peered VPC) reach the internal load balancer."
  type        = bool
  default     = false
}

variable "tls" {
  description = <<-EOT
    TLS on the proxy listener (https:// proxy URLs; proxy credentials never cross the network in clear
    text). null = plain http://. Either Secret Manager secrets (cert_secret and key_secret: secret ids
    "projects/P/secrets/NAME" or "NAME", latest version, fetched at every service start; the VM account
    gets secretAccessor on exactly these two) or the PEM texts (cert_pem and key_pem, e.g. file("tls.key");
    they are stored in the instance metadata, so prefer Secret Manager).
  EOT
  type = object({
    cert_secret = optional(string)
    key_secret  = optional(string)
    cert_pem    = optional(string)
    key_pem     = optional(string)
  })
  default   = null
  sensitive = true
  validation {
    condition = var.tls == null ? true : (
      (try(var.tls.cert_secret, null) != null && try(var.tls.key_secret, null) != null && try(var.tls.cert_pem, null) == null && try(var.tls.key_pem, null) == null) ||
      (try(var.tls.cert_secret, null) == null && try(var.tls.key_secret, null) == null && try(var.tls.cert_pem, null) != null && try(var.tls.key_pem, null) != null)
    )
    error_message = "tls: give cert_secret and key_secret, or cert_pem and key_pem."
  }
}

variable "autoscaling" {
  description = "Autoscale the MIG on CPU between min_replicas and max_replicas (null: a fixed instance_count). Scale-in removes at most one VM per 10 minutes; each removed VM drains for drain_timeout_sec. NAT ports are reserved for max_replicas."
  type = object({
    min_replicas    = number
    max_replicas    = number
    cpu_target      = optional(number, 0.6)
    cooldown_period = optional(number, 120)
  })
  default = null
  validation {
    condition     = var.autoscaling == null ? true : (var.autoscaling.min_replicas >= 1 && var.autoscaling.max_replicas >= var.autoscaling.min_replicas && var.autoscaling.max_replicas <= 50 && var.autoscaling.cpu_target > 0 && var.autoscaling.cpu_target < 1)
    error_message = "autoscaling: 1 <= min_replicas <= max_replicas <= 50 and 0 < cpu_target < 1."
  }
}

variable "enable_metrics_collector" {
  description = "Run an OpenTelemetry Collector next to the gateway on every VM: it scrapes 127.0.0.1:9128/metrics and writes the series to Google Cloud Managed Service for Prometheus (job=\"egressgate\"), so deploy/monitoring's rules and dashboard work on GCE. The VM account already has roles/monitoring.metricWriter."
  type        = bool
  default     = true
}

variable "metrics_collector_image" {
  description = "The collector image (opentelemetry-collector-contrib, which has the googlemanagedprometheus exporter). The VMs have no internet route, so it must live in the same Artifact Registry repository as the gateway (mirror it once, see docs/deploy-gcp.md). null = <registry>/<project>/<repository>/opentelemetry-collector-contrib:0.116.1. Pin it by digest."
  type        = string
  default     = null
  validation {
    condition     = var.metrics_collector_image == null || can(regex("^[a-z0-9-]+-docker\\.pkg\\.dev/[^/]+/[^/]+/[^@:]+(@sha256:[0-9a-f]{64}|:[A-Za-z0-9_.-]+)$", var.metrics_collector_image))
    error_message = "metrics_collector_image must be an Artifact Registry image (LOCATION-docker.pkg.dev/PROJECT/REPO/NAME) with a :tag or @sha256 digest."
  }
}

variable "notification_channels" {
  description = "Cloud Monitoring notification channel ids for the Cloud NAT alert policies (empty: the policies exist but notify no one)."
  type        = list(string)
  default     = []
}

variable "fleet_store" {
  description = <<-EOT
    Shared state for the whole group (shared-IP limits, Retry-After holds): without it every VM
    counts its own, so a protect limit is met once per VM. null = none. { memorystore = {} } =
    create a Memorystore for Redis instance (private services access on this VPC, AUTH, in-transit
    encryption; tier STANDARD_HA by default). { url = "rediss://10.1.2.3:6378", auth_secret = "NAME",
    ca_pem = "..." } = an existing Redis: its AUTH string in a Secret Manager secret the VMs may
    read, its server CA as PEM text (rediss:// only). Changing it re-creates the VMs (the config is
    rendered at boot).
  EOT
  type = object({
    memorystore = optional(object({
      tier              = optional(string, "STANDARD_HA")
      memory_size_gb    = optional(number, 1)
      redis_version     = optional(string, "REDIS_7_2")
      psa_prefix_length = optional(number, 24)
    }))
    url         = optional(string)
    auth_secret = optional(string)
    ca_pem      = optional(string)
  })
  default = null

  validation {
    condition     = var.fleet_store == null ? true : (try(var.fleet_store.memorystore, null) != null) != (try(var.fleet_store.url, null) != null)
    error_message = "fleet_store: give memorystore (create one) or url (an existing Redis), not both."
  }
  validation {
    condition     = try(var.fleet_store.url, null) == null ? true : can(regex("^rediss?://[^/?#]+(/[0-9]+)?$", var.fleet_store.url))
    error_message = "fleet_store.url: expected redis://HOST:PORT or rediss://HOST:PORT (rediss: TLS, give ca_pem)."
  }
  validation {
    condition     = try(var.fleet_store.ca_pem, null) == null ? true : startswith(try(var.fleet_store.url, ""), "rediss://")
    error_message = "fleet_store.ca_pem is for TLS: the url must start with rediss://."
  }
  validation {
    condition = try(var.fleet_store.memorystore, null) == null ? true : (
      contains(["BASIC", "STANDARD_HA"], var.fleet_store.memorystore.tier) &&
      var.fleet_store.memorystore.memory_size_gb >= 1 && var.fleet_store.memorystore.memory_size_gb <= 300 &&
      var.fleet_store.memorystore.psa_prefix_length >= 16 && var.fleet_store.memorystore.psa_prefix_length <= 29
    )
    error_message = "fleet_store.memorystore: tier BASIC or STANDARD_HA, memory_size_gb 1-300, psa_prefix_length 16-29."
  }
}

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
    condition     = can(regex("^[a-z][a-z0-9-]{0,19}$", var.name_prefix))
    error_message = "name_prefix: lowercase letter first, then up to 19 lowercase letters, digits or hyphens."
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

variable "egress_profiles" {
  description = <<-EOT
    One entry per gateway egress profile. Each profile gets a secondary range of the subnet (every VM
    takes one alias /32 from it, the gateway binds that address for the profile) and its own Cloud NAT
    gateway with its own static IPs. nat_ip_names are the ACTIVE static IPs (new connections),
    draining_nat_ip_names the ones being retired (established connections only),
    reserved_nat_ip_names ones created but not yet used (to be allow-listed before a switch). Names
    are the address resource names (without prefix) and must be unique across profiles.
  EOT
  type = map(object({
    secondary_cidr        = string
    nat_ip_names          = list(string)
    draining_nat_ip_names = optional(list(string), [])
    reserved_nat_ip_names = optional(list(string), [])
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
    condition     = alltrue([for _, p in var.egress_profiles : can(cidrhost(p.secondary_cidr, 0))])
    error_message = "Every secondary_cidr must be an IPv4 CIDR."
  }
  validation {
    condition     = alltrue([for _, p in var.egress_profiles : length(p.nat_ip_names) > 0])
    error_message = "Every profile needs at least one active NAT IP (MANUAL_ONLY NAT has no fallback)."
  }
  validation {
    condition = length(flatten([for _, p in var.egress_profiles : concat(p.nat_ip_names, p.draining_nat_ip_names, p.reserved_nat_ip_names)])) == length(distinct(flatten([for _, p in var.egress_profiles : concat(p.nat_ip_names, p.draining_nat_ip_names, p.reserved_nat_ip_names)])))
    error_message = "A NAT IP name may appear only once across all profiles (active, draining and reserved)."
  }
  validation {
    condition     = alltrue(flatten([for _, p in var.egress_profiles : [for n in concat(p.nat_ip_names, p.draining_nat_ip_names, p.reserved_nat_ip_names) : can(regex("^[a-z][a-z0-9-]{0,29}$", n))]]))
    error_message = "NAT IP names: lowercase letter first, then up to 29 lowercase letters, digits or hyphens."
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
    condition     = alltrue([for c in var.clients : length(c.egress) > 0 && can(regex("\\$", c.password_hash))])
    error_message = "Every client needs at least one egress profile and a password_hash from `egressgate hash-password`."
  }
  validation {
    condition     = length(var.clients) == length(distinct([for c in var.clients : c.username]))
    error_message = "Client usernames must be unique."
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
  description = "Container-Optimized OS boot image (family or image self link)."
  type        = string
  default     = "cos-cloud/cos-stable"
  validation {
    condition     = startswith(var.cos_image, "cos-cloud/") || can(regex("projects/cos-cloud/", var.cos_image))
    error_message = "cos_image must be a Container-Optimized OS image from the cos-cloud project."
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
  description = "Gateway drain.timeout: how long SIGTERM waits for open tunnels. Docker stop, systemd and the LB connection draining are set above it."
  type        = number
  default     = 30
  validation {
    condition     = var.drain_timeout_sec >= 1 && var.drain_timeout_sec <= 600
    error_message = "drain_timeout_sec must be between 1 and 600."
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

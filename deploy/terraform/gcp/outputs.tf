output "lb_ip_address" {
  description = "Static IP of the load balancer (public, or internal with load_balancer_scheme = INTERNAL): point the gateway's DNS name here."
  value       = google_compute_address.lb.address
}

output "proxy_url" {
  description = "Proxy URL without credentials; jobs use SCHEME://USER:PASSWORD@<DNS name>:3128 (or USER+PROFILE). https:// when var.tls is set (the certificate must name the DNS name jobs use)."
  value       = "${local.tls_enabled ? "https" : "http"}://${google_compute_address.lb.address}:${local.proxy_port}"
}

output "load_balancer_scheme" {
  description = "EXTERNAL (public IP) or INTERNAL (an address of the gateway subnet, reachable from this VPC and peered ones)."
  value       = var.load_balancer_scheme
}

output "egress_ips_by_profile" {
  description = "Public IPs of each profile's ACTIVE members (new connections leave from these): what each provider must allow-list."
  value       = { for name, p in var.egress_profiles : name => [for m in p.active : google_compute_address.nat[m.ip].address] }
}

output "standby_egress_ips_by_profile" {
  description = "Public IPs of each profile's STANDBY members: attested and checked against every provider, carrying no job traffic until promoted. Have the providers allow-list them before you promote."
  value       = { for name, p in var.egress_profiles : name => [for m in p.standby : google_compute_address.nat[m.ip].address] }
}

output "unassigned_egress_ips" {
  description = "Reserved static IPs (egress_ips) that no member uses: they carry no traffic. Add one as a standby member, or release it."
  value       = { for n in var.egress_ips : n => google_compute_address.nat[n].address if !contains(keys(local.members), n) }
}

output "member_ranges" {
  description = "Per profile, the slot range of each member (name of its static IP => range; every VM has one alias IP in it) and its role."
  value       = { for name, _ in var.egress_profiles : name => { for ip, m in local.members : ip => { range = m.cidr, role = m.role, slot = m.slot } if m.profile == name } }
}

output "profile_secondary_ranges" {
  description = "The block of each profile (cut into its member slot ranges, see member_ranges)."
  value       = { for name, p in var.egress_profiles : name => p.secondary_cidr }
}

output "service_account_email" {
  description = "Identity of the gateway VMs."
  value       = google_service_account.gateway.email
}

output "network" {
  description = "Self link of the gateway VPC."
  value       = google_compute_network.gateway.self_link
}

output "instance_group" {
  description = "The regional managed instance group."
  value       = google_compute_region_instance_group_manager.gateway.instance_group
}

output "fleet_store_url" {
  description = "The fleet store the VMs share limits and holds through (fleet.redis.url), or null."
  value       = local.fleet_store_url
}

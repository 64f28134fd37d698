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
  description = "Active egress IPs per profile: what each provider must allow-list."
  value       = { for name, p in var.egress_profiles : name => [for n in p.nat_ip_names : google_compute_address.nat[n].address] }
}

output "draining_egress_ips_by_profile" {
  description = "Egress IPs being retired per profile (established connections only)."
  value       = { for name, p in var.egress_profiles : name => [for n in p.draining_nat_ip_names : google_compute_address.nat[n].address] }
}

output "reserved_egress_ips_by_profile" {
  description = "Egress IPs created but not in use yet: allow-list them at the provider before switching."
  value       = { for name, p in var.egress_profiles : name => [for n in p.reserved_nat_ip_names : google_compute_address.nat[n].address] }
}

output "profile_secondary_ranges" {
  description = "Subnet secondary range per profile (the gateway binds each VM's alias IP from it)."
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

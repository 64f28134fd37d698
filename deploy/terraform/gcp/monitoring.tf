# Cloud NAT alerts (Cloud Monitoring). Every profile's egress depends on its NAT gateway having
# ports: a full NAT drops packets (OUT_OF_RESOURCES) and fails port allocations, which the gateway
# sees only as slow or failed connects. The gateway's own metrics reach Managed Service for
# Prometheus through the collector on each VM (cloud-init); deploy/monitoring/alerts.yaml has the
# rules for them.
# Cloud NAT metrics (monitored resource nat_gateway) carry the labels project_id, region, router_id
# (the router's NUMERIC id, not its name) and gateway_name: the policies select this module's NAT
# gateways by region and gateway name.
resource "google_monitoring_alert_policy" "nat_dropped_out_of_resources" {
  project      = var.project_id
  display_name = "${var.name_prefix}: Cloud NAT drops packets (OUT_OF_RESOURCES)"
  combiner     = "OR"
  conditions {
    display_name = "NAT dropped sent packets, reason OUT_OF_RESOURCES"
    condition_threshold {
      filter          = "resource.type = \"nat_gateway\" AND resource.labels.region = \"${var.region}\" AND resource.labels.gateway_name = one_of(${local.nat_gateway_names_filter}) AND metric.type = \"router.googleapis.com/nat/dropped_sent_packets_count\" AND metric.labels.reason = \"OUT_OF_RESOURCES\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "300s"
      aggregations {
        alignment_period     = "60s"
        per_series_aligner   = "ALIGN_RATE"
        cross_series_reducer = "REDUCE_SUM"
        group_by_fields      = ["resource.labels.gateway_name"]
      }
    }
  }
  documentation {
    content   = "A profile's Cloud NAT ran out of ports: add a NAT IP to the profile (allow-listed first, docs/deploy-gcp.md) or raise nat_min_ports_per_vm. Runbook: docs/operations.md#cloud-nat-out-of-resources"
    mime_type = "text/markdown"
  }
  notification_channels = var.notification_channels
  user_labels           = var.labels
}

resource "google_monitoring_alert_policy" "nat_allocation_failed" {
  project      = var.project_id
  display_name = "${var.name_prefix}: Cloud NAT port allocation failed"
  combiner     = "OR"
  conditions {
    display_name = "NAT allocation failed"
    condition_threshold {
      filter          = "resource.type = \"nat_gateway\" AND resource.labels.region = \"${var.region}\" AND resource.labels.gateway_name = one_of(${local.nat_gateway_names_filter}) AND metric.type = \"router.googleapis.com/nat/nat_allocation_failed\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "0s"
      aggregations {
        alignment_period     = "60s"
        per_series_aligner   = "ALIGN_COUNT_TRUE"
        cross_series_reducer = "REDUCE_SUM"
        group_by_fields      = ["resource.labels.gateway_name"]
      }
    }
  }
  documentation {
    content   = "Cloud NAT could not allocate ports (or an IP) for a gateway VM: every VM reserves nat_min_ports_per_vm on every profile's NAT. Runbook: docs/operations.md#cloud-nat-out-of-resources"
    mime_type = "text/markdown"
  }
  notification_channels = var.notification_channels
  user_labels           = var.labels
}

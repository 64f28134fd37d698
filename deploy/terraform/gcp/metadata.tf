# Which member of each profile is active and which is standby, for the VMs to take live: a project
# metadata item (not instance metadata: that lives in the instance template, and changing it would
# replace every VM). files/render-config.sh on each VM waits on it (?wait_for_change=true) and
# renders the gateway config, which the gateway reloads by itself (reload.watch); open tunnels stay.
resource "google_compute_project_metadata_item" "members" {
  project = var.project_id
  key     = local.members_metadata_key
  value   = local.members_metadata
}

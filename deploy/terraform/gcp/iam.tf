# The VMs' identity: write logs and metrics, pull the image from one repository, and (with TLS from
# Secret Manager) read exactly the certificate and key secrets. Nothing else.
resource "google_service_account" "gateway" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-vm"
  display_name = "egressgate gateway VMs"
}

resource "google_project_iam_member" "gateway" {
  for_each = toset(local.sa_roles_project)
  project  = var.project_id
  role     = each.value
  member   = "serviceAccount:${google_service_account.gateway.email}"
}

# Repository-scoped, not project-wide.
resource "google_artifact_registry_repository_iam_member" "gateway_pull" {
  project    = var.project_id
  location   = local.registry_location
  repository = var.artifact_registry_repository
  role       = "roles/artifactregistry.reader"
  member     = "serviceAccount:${google_service_account.gateway.email}"
}

# Secret-scoped: only the two TLS secrets (var.tls.cert_secret / key_secret), never project-wide.
resource "google_secret_manager_secret_iam_member" "gateway_tls" {
  for_each  = local.tls_secrets
  project   = var.project_id
  secret_id = each.value
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.gateway.email}"
}

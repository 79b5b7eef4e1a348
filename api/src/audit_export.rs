//! Reading a tenant's audit log back from the collector.
//!
//! `GET /v1/tenants/{tenant}/records?since=&until=&action=&principal=&format=json|csv`
//! with `Authorization: Bearer <token>`: any token the API server accepts (a
//! ServiceAccount token, an OIDC token). The collector asks the API server who the token
//! is (TokenReview) and whether that subject may [`VERB`] [`RESOURCE`] in group
//! [`GROUP`] in one of the tenant's namespaces (SubjectAccessReview), which the RBAC
//! the operator emits for the `audit:read` permission grants (Analyst, Admin, Owner).
//!
//! The answer is streamed: JSON lines (each record exactly as its chain wrote it, still
//! verifiable) or CSV with a header row. An export that fails part-way is cut off
//! without its end (a broken HTTP/1.1 chunked body, an HTTP/2 reset), so a client never
//! mistakes a partial export for a whole one. Refusals are `{"error": "..."}` with
//! 400, 401, 403, 404 or 503.

/// The API group of the authorisation check.
pub const GROUP: &str = "portcullis.dev";

/// The resource of the authorisation check (not a served resource: a name RBAC rules
/// can grant).
pub const RESOURCE: &str = "auditrecords";

/// The verb of the authorisation check.
pub const VERB: &str = "export";

/// Path prefix; the full path is [`records_path`].
pub const TENANTS_PREFIX: &str = "/v1/tenants/";

/// Path suffix after the tenant name.
pub const RECORDS_SUFFIX: &str = "/records";

/// The export path for `tenant`.
pub fn records_path(tenant: &str) -> String {
    format!("{TENANTS_PREFIX}{tenant}{RECORDS_SUFFIX}")
}

/// The tenant an export path names, if it is one.
pub fn tenant_of_path(path: &str) -> Option<&str> {
    path.strip_prefix(TENANTS_PREFIX)?
        .strip_suffix(RECORDS_SUFFIX)
        .filter(|t| !t.is_empty() && !t.contains('/'))
}

/// Path suffix after the tenant name for the tenant log's newest seal.
pub const SEAL_SUFFIX: &str = "/seal";

/// `GET` here answers the newest seal of `tenant`'s log (one JSON line, as stored), to
/// the same readers as the export; the operator witnesses it into the Tenant's status.
pub fn seal_path(tenant: &str) -> String {
    format!("{TENANTS_PREFIX}{tenant}{SEAL_SUFFIX}")
}

/// The tenant a seal path names, if it is one.
pub fn tenant_of_seal_path(path: &str) -> Option<&str> {
    path.strip_prefix(TENANTS_PREFIX)?
        .strip_suffix(SEAL_SUFFIX)
        .filter(|t| !t.is_empty() && !t.contains('/'))
}

/// Query parameter: records at or after this RFC 3339 time.
pub const SINCE: &str = "since";
/// Query parameter: records before this RFC 3339 time.
pub const UNTIL: &str = "until";
/// Query parameter: only this action (`api.identify`), or actions starting with the
/// text before a trailing `*` (`admin.*`).
pub const ACTION: &str = "action";
/// Query parameter: only this principal (`key:ak_***7f2`, `spiffe://...`, `user:...`).
pub const PRINCIPAL: &str = "principal";
/// Query parameter: `json` (default), `csv`, or [`CHAIN_FORMAT`].
pub const FORMAT: &str = "format";

/// `format=chain`: every stored entry of the tenant's log, records and checkpoints, as
/// JSON lines in arrival order, for verifying the whole history; takes no filter (a
/// filtered chain does not verify).
pub const CHAIN_FORMAT: &str = "chain";

/// Content type of a JSON-lines export.
pub const JSON_CONTENT_TYPE: &str = "application/x-ndjson";
/// Content type of a CSV export.
pub const CSV_CONTENT_TYPE: &str = "text/csv; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_names_one_tenant() {
        assert_eq!(records_path("acme"), "/v1/tenants/acme/records");
        assert_eq!(tenant_of_path("/v1/tenants/acme/records"), Some("acme"));
        assert_eq!(tenant_of_path("/v1/tenants//records"), None);
        assert_eq!(tenant_of_path("/v1/tenants/a/b/records"), None);
        assert_eq!(tenant_of_path("/v1/tenants/acme"), None);
        assert_eq!(tenant_of_path("/v1/audit/records"), None);
    }
}

//! Kaa's ECR REST API on the admin listener, base path `/ecr/api/v1`, with Kaa's paths and
//! shapes, so that Kaa's REST clients work unchanged:
//!
//! * `PUT/GET/DELETE /endpoints/{endpointId}/app-versions/{appVersionName}` and
//!   `PUT/GET/DELETE /app-versions/{appVersionName}`: the body of a PUT is the raw JSON
//!   configuration; query `name` selects a named configuration (`default` when absent); the
//!   answer is `{configId, name, config, createdDate, updatedDate}` with `ETag: "<configId>"`;
//! * `GET .../configurations`: the configurations of that endpoint or app version, by name;
//! * `PUT /endpoints/batch`: `{"configPayload": <json>, "endpoints": {"<appVersion>": [ids]}}`;
//! * `PUT /endpoints/filters/{filterId}`: `{"configPayload": <json>}` to every endpoint the
//!   filter `filterId` of `ecr.filters` matches ([`crate::filters`]); 404 for an unknown one;
//!   answered as the batch, with the configurations stored;
//! * `GET /statuses?endpointId=&appVersionName=&configId=&page=&size=`: a Spring page of
//!   `{configId, endpointId, appVersionName, name, status, config, lastDispatchedDate,
//!   lastConfirmedDate, confirmationStatusCode, confirmationReasonPhrase}`;
//! * `GET/PUT/DELETE /app-versions/{appVersionName}/schemas`: an optional JSON Schema per app
//!   version; while one is set, a configuration of that app version that does not match is
//!   refused with 400 naming the first violation (`PUT .../schemas/validate` checks one);
//! * `GET /openapi.json`: the OpenAPI document.
//!
//! Every error body is `{"statusCode": ..., "reasonPhrase": "..."}` naming what is wrong; a
//! refused change stores nothing.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use fleetgate_bus::now_ms;
use fleetgate_service::time::format_iso8601;
use fleetgate_service::{AdminRequest, AdminResponse, AdminRoutes, BoxFuture, percent_decode};
use fleetgate_storage::{ConfigKey, ConfigStatus, StatusFilter, StoredConfig};
use serde_json::{Value as Json, json};

use crate::{DEFAULT_NAME, Shared, is_valid_config_name};

/// The base path of the API.
pub const BASE: &str = "/ecr/api/v1";
/// The API's OpenAPI document.
pub const OPENAPI: &str = include_str!("openapi.json");
/// The last page number `/statuses` takes (what the document says).
const MAX_PAGE: usize = 2_147_483_647;
/// The largest page of `/statuses`.
const MAX_PAGE_SIZE: usize = 1000;

/// The routes ECR serves on the admin listener.
pub struct Api {
    shared: Arc<Shared>,
}

impl Api {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

impl AdminRoutes for Api {
    fn prefixes(&self) -> &[&'static str] {
        &["/ecr/"]
    }

    fn is_public(&self, path: &str) -> bool {
        path == "/ecr/api/v1/openapi.json"
    }

    fn handle(&self, request: AdminRequest) -> BoxFuture<'static, AdminResponse> {
        let shared = self.shared.clone();
        Box::pin(async move {
            match route(&shared, &request).await {
                Ok(r) | Err(r) => r,
            }
        })
    }
}

type Answer = Result<AdminResponse, AdminResponse>;

fn error(status: u16, reason: impl Into<String>) -> AdminResponse {
    let body = json!({"statusCode": status, "reasonPhrase": reason.into()});
    AdminResponse::json(status, body.to_string().into_bytes())
}

fn not_allowed(allow: &'static str) -> AdminResponse {
    let mut r = error(405, format!("method not allowed: use {allow}"));
    r.allow = Some(allow);
    r
}

fn storage_error(e: &fleetgate_storage::StorageError) -> AdminResponse {
    tracing::warn!(error = %e, "ecr store failed");
    error(500, "the configuration store failed")
}

/// Runs the query, name and batch-body checks on arbitrary input (the fuzz target).
pub fn fuzz_params(query_string: &str, body: &[u8]) {
    let req = AdminRequest {
        method: "PUT".into(),
        path: format!("{BASE}/statuses"),
        query: query_string.into(),
        body: body.to_vec(),
    };
    if let Ok(params) = query(&req, &["name", "page", "size", "endpointId"]) {
        let _ = name_of(&params);
    }
    let _ = batch_body(body);
    let _ = filter_body(body);
}

async fn route(shared: &Shared, req: &AdminRequest) -> Answer {
    let Some(rest) = req.path.strip_prefix(BASE) else {
        return Err(error(404, format!("not found: the ECR API is under {BASE}")));
    };
    let segments: Vec<String> = rest
        .trim_start_matches('/')
        .split('/')
        .map(|s| percent_decode(s, false))
        .collect::<Option<_>>()
        .ok_or_else(|| error(400, "path: bad percent-encoding"))?;
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = req.method.as_str();
    match segments.as_slice() {
        ["openapi.json"] => match method {
            "GET" => Ok(AdminResponse::json(200, OPENAPI.as_bytes().to_vec())),
            _ => Err(not_allowed("GET")),
        },
        ["endpoints", "batch"] => match method {
            "PUT" => batch(shared, req).await,
            _ => Err(not_allowed("PUT")),
        },
        ["endpoints", "filters", filter] => match method {
            "PUT" => by_filter(shared, req, non_empty("filterId", filter)?).await,
            _ => Err(not_allowed("PUT")),
        },
        ["endpoints", endpoint, "app-versions", version] => {
            let endpoint = non_empty("endpointId", endpoint)?;
            let version = non_empty("appVersionName", version)?;
            one(shared, req, version, Some(endpoint)).await
        }
        ["endpoints", endpoint, "app-versions", version, "configurations"] => {
            let endpoint = non_empty("endpointId", endpoint)?;
            let version = non_empty("appVersionName", version)?;
            list(shared, req, version, Some(endpoint)).await
        }
        ["app-versions", version] => {
            one(shared, req, non_empty("appVersionName", version)?, None).await
        }
        ["app-versions", version, "schemas"] => {
            schema(shared, req, non_empty("appVersionName", version)?).await
        }
        ["app-versions", version, "schemas", "validate"] => match method {
            "PUT" => {
                let version = non_empty("appVersionName", version)?;
                query(req, &[])?;
                check_config(shared, &req.body)?;
                conforms(shared, version, &req.body).await?;
                Ok(AdminResponse::json(200, br#"{"valid":true}"#.to_vec()))
            }
            _ => Err(not_allowed("PUT")),
        },
        ["app-versions", version, "configurations"] => {
            list(shared, req, non_empty("appVersionName", version)?, None).await
        }
        ["statuses"] => match method {
            "GET" => statuses(shared, req).await,
            _ => Err(not_allowed("GET")),
        },
        _ => Err(error(404, format!("not found: {}", req.path))),
    }
}

fn non_empty<'a>(what: &str, s: &'a str) -> Result<&'a str, AdminResponse> {
    if s.is_empty() { Err(error(400, format!("{what}: must not be empty"))) } else { Ok(s) }
}

/// The query parameters, each once, of the names `known`.
fn query(req: &AdminRequest, known: &[&str]) -> Result<HashMap<String, String>, AdminResponse> {
    let mut params = HashMap::new();
    for pair in req.query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k, true).ok_or_else(|| error(400, "query: bad percent-encoding"))?;
        let v = percent_decode(v, true)
            .ok_or_else(|| error(400, format!("{k}: bad percent-encoding")))?;
        if !known.contains(&k.as_str()) {
            return Err(error(
                400,
                format!("{k}: unknown parameter (known: {})", known.join(", ")),
            ));
        }
        if params.insert(k.clone(), v).is_some() {
            return Err(error(400, format!("{k}: given more than once")));
        }
    }
    Ok(params)
}

fn name_of(params: &HashMap<String, String>) -> Result<String, AdminResponse> {
    match params.get("name") {
        None => Ok(DEFAULT_NAME.to_owned()),
        Some(n) if is_valid_config_name(n) => Ok(n.clone()),
        Some(n) => Err(error(400, format!("name: `{n}` does not match ^[a-zA-Z0-9_-]+$"))),
    }
}

/// Checks a configuration body: size, then JSON.
fn check_config(shared: &Shared, body: &[u8]) -> Result<(), AdminResponse> {
    let max = shared.config.max_config_bytes;
    if body.len() > max {
        return Err(error(
            413,
            format!("config: {} bytes, over ecr.max_config_bytes ({max})", body.len()),
        ));
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(body)
        .map_err(|e| error(400, format!("config: not valid JSON: {e}")))?;
    Ok(())
}

/// Checks `body` (valid JSON) against the JSON Schema of `version`, if it has one: 400 naming
/// the first violation and where it is.
async fn conforms(shared: &Shared, version: &str, body: &[u8]) -> Result<(), AdminResponse> {
    let Some(schema) = shared.store.schema(version).await.map_err(|e| storage_error(&e))? else {
        return Ok(());
    };
    let schema: Json =
        serde_json::from_slice(&schema).map_err(|_| error(500, "a stored schema is unreadable"))?;
    let validator = jsonschema::validator_for(&schema)
        .map_err(|e| error(500, format!("the stored schema of {version} does not compile: {e}")))?;
    let config: Json = serde_json::from_slice(body)
        .map_err(|e| error(400, format!("config: not valid JSON: {e}")))?;
    validator.validate(&config).map_err(|e| {
        let at = e.instance_path().to_string();
        let at = if at.is_empty() { "the top level".to_owned() } else { at };
        error(
            400,
            format!(
                "config: does not match the JSON Schema of app version {version}: {e} (at {at})"
            ),
        )
    })
}

/// `GET/PUT/DELETE /app-versions/{v}/schemas`: the JSON Schema configurations of `v` must match.
async fn schema(shared: &Shared, req: &AdminRequest, version: &str) -> Answer {
    query(req, &[])?;
    match req.method.as_str() {
        "GET" => match shared.store.schema(version).await.map_err(|e| storage_error(&e))? {
            Some(s) => Ok(AdminResponse::json(200, s)),
            None => Err(error(404, format!("app version {version} has no schema"))),
        },
        "PUT" => {
            // A schema is not a configuration: only the admin listener's 1 MiB bounds it.
            let schema: Json = serde_json::from_slice(&req.body)
                .map_err(|e| error(400, format!("schema: not valid JSON: {e}")))?;
            jsonschema::meta::validate(&schema)
                .map_err(|e| error(400, format!("schema: not a valid JSON Schema: {e}")))?;
            jsonschema::validator_for(&schema)
                .map_err(|e| error(400, format!("schema: cannot be used: {e}")))?;
            shared
                .store
                .set_schema(version, Some(req.body.clone()))
                .await
                .map_err(|e| storage_error(&e))?;
            Ok(AdminResponse::json(200, req.body.clone()))
        }
        "DELETE" => {
            if shared.store.schema(version).await.map_err(|e| storage_error(&e))?.is_none() {
                return Err(error(404, format!("app version {version} has no schema")));
            }
            shared.store.set_schema(version, None).await.map_err(|e| storage_error(&e))?;
            Ok(AdminResponse::json(204, Vec::new()))
        }
        _ => Err(not_allowed("GET, PUT, DELETE")),
    }
}

fn config_json(c: &StoredConfig) -> Json {
    json!({
        "configId": c.config_id,
        "name": c.key.name,
        "config": serde_json::from_slice::<Json>(&c.content).unwrap_or(Json::Null),
        "createdDate": format_iso8601(c.created_ms),
        "updatedDate": format_iso8601(c.updated_ms),
    })
}

fn with_etag(c: &StoredConfig) -> AdminResponse {
    let mut r = AdminResponse::json(200, config_json(c).to_string().into_bytes());
    r.headers.push(("etag", format!("\"{}\"", c.config_id)));
    r
}

async fn one(shared: &Shared, req: &AdminRequest, version: &str, endpoint: Option<&str>) -> Answer {
    let params = query(req, &["name"])?;
    let key = ConfigKey {
        app_version: version.to_owned(),
        endpoint: endpoint.map(str::to_owned),
        name: name_of(&params)?,
    };
    match req.method.as_str() {
        "GET" => match shared.store.get(key).await.map_err(|e| storage_error(&e))? {
            Some(c) => Ok(with_etag(&c)),
            None => Err(error(404, "no such configuration")),
        },
        "PUT" => {
            check_config(shared, &req.body)?;
            conforms(shared, version, &req.body).await?;
            let stored = shared
                .store
                .put(key, req.body.clone(), now_ms())
                .await
                .map_err(|e| storage_error(&e))?;
            shared.broadcast(&stored).await;
            Ok(with_etag(&stored))
        }
        "DELETE" => {
            let removed = shared.store.delete(key.clone()).await.map_err(|e| storage_error(&e))?;
            if !removed {
                return Err(error(404, "no such configuration"));
            }
            // An endpoint whose own configuration is gone gets the default again.
            if let Some(endpoint) = endpoint {
                let fallback = shared
                    .store
                    .effective(version, endpoint, &key.name)
                    .await
                    .map_err(|e| storage_error(&e))?;
                if let Some(mut c) = fallback {
                    c.key.endpoint = Some(endpoint.to_owned());
                    shared.broadcast(&c).await;
                }
            }
            Ok(AdminResponse::json(204, Vec::new()))
        }
        _ => Err(not_allowed("GET, PUT, DELETE")),
    }
}

async fn list(
    shared: &Shared,
    req: &AdminRequest,
    version: &str,
    endpoint: Option<&str>,
) -> Answer {
    if req.method != "GET" {
        return Err(not_allowed("GET"));
    }
    query(req, &[])?;
    let configs = shared.store.list(version, endpoint).await.map_err(|e| storage_error(&e))?;
    let body: Vec<Json> = configs.iter().map(config_json).collect();
    Ok(AdminResponse::json(200, Json::Array(body).to_string().into_bytes()))
}

async fn batch(shared: &Shared, req: &AdminRequest) -> Answer {
    let params = query(req, &["name"])?;
    let name = name_of(&params)?;
    let (payload, targets) = batch_body(&req.body)?;
    check_config(shared, &payload)?;
    let mut versions: Vec<&str> = targets.iter().map(|(v, _)| v.as_str()).collect();
    versions.dedup();
    for version in versions {
        conforms(shared, version, &payload).await?;
    }
    put_all(shared, &name, &payload, &targets).await
}

/// Stores `payload` as configuration `name` of every (app version, endpoint) of `targets`
/// (checked already), broadcasts each, and answers with what is stored.
async fn put_all(
    shared: &Shared,
    name: &str,
    payload: &[u8],
    targets: &[(String, String)],
) -> Answer {
    let keys: Vec<ConfigKey> =
        targets.iter().map(|(version, id)| ConfigKey::endpoint(version, id, name)).collect();
    let now = now_ms();
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        let stored =
            shared.store.put(key, payload.to_vec(), now).await.map_err(|e| storage_error(&e))?;
        shared.broadcast(&stored).await;
        let mut j = config_json(&stored);
        j["endpointId"] = json!(stored.key.endpoint);
        j["appVersionName"] = json!(stored.key.app_version);
        out.push(j);
    }
    Ok(AdminResponse::json(200, Json::Array(out).to_string().into_bytes()))
}

/// `PUT /endpoints/filters/{filterId}`: the configuration of the body's `configPayload` goes
/// to every endpoint the filter of `ecr.filters` matches ([`crate::filters`]).
async fn by_filter(shared: &Shared, req: &AdminRequest, id: &str) -> Answer {
    let params = query(req, &["name"])?;
    let name = name_of(&params)?;
    let filters = shared.filters.get();
    let filter = filters.get(id).ok_or_else(|| {
        error(404, format!("no endpoint filter `{id}`: filters are defined in ecr.filters"))
    })?;
    let payload = filter_body(&req.body)?;
    check_config(shared, &payload)?;
    let mut targets: BTreeSet<(String, String)> =
        filter.named().map(|(v, e)| (v.to_owned(), e.to_owned())).collect();
    // The endpoints ECR knows, in the filter's app versions: those with a configuration of
    // their own or a recorded status.
    let scopes: Vec<Option<String>> = if filter.app_versions.is_empty() {
        vec![None]
    } else {
        filter.app_versions.iter().cloned().map(Some).collect()
    };
    for app_version in scopes {
        let store = &shared.store;
        let mut known = store
            .configured_endpoints(app_version.as_deref())
            .await
            .map_err(|e| storage_error(&e))?;
        let served = StatusFilter { endpoint: None, app_version, config_id: None };
        let statuses = store.statuses(served).await.map_err(|e| storage_error(&e))?;
        known.extend(statuses.into_iter().map(|s| (s.app_version, s.endpoint)));
        targets.extend(known.into_iter().filter(|(v, e)| filter.matches(v, e)));
    }
    let targets: Vec<(String, String)> = targets.into_iter().collect();
    let mut versions: Vec<&str> = targets.iter().map(|(v, _)| v.as_str()).collect();
    versions.dedup();
    for version in versions {
        conforms(shared, version, &payload).await?;
    }
    put_all(shared, &name, &payload, &targets).await
}

/// The `PUT /endpoints/filters/{filterId}` body: `{"configPayload": <json>}`, the JSON text of
/// the configuration.
fn filter_body(body: &[u8]) -> Result<Vec<u8>, AdminResponse> {
    let body: Json = serde_json::from_slice(body)
        .map_err(|e| error(400, format!("body: not valid JSON: {e}")))?;
    let Json::Object(body) = body else {
        return Err(error(400, "body: must be an object {configPayload}"));
    };
    if let Some(k) = body.keys().find(|k| k.as_str() != "configPayload") {
        let why = if k == "endpoints" { ": the filter selects the endpoints" } else { "" };
        return Err(error(400, format!("{k}: unknown field (known: configPayload){why}")));
    }
    let payload = body.get("configPayload").ok_or_else(|| error(400, "configPayload: required"))?;
    serde_json::to_vec(payload).map_err(|e| error(400, format!("configPayload: {e}")))
}

/// The `PUT /endpoints/batch` body: the configuration's JSON text and the (app version,
/// endpoint) pairs it goes to.
type Batch = (Vec<u8>, Vec<(String, String)>);

fn batch_body(body: &[u8]) -> Result<Batch, AdminResponse> {
    let body: Json = serde_json::from_slice(body)
        .map_err(|e| error(400, format!("body: not valid JSON: {e}")))?;
    let Json::Object(body) = body else {
        return Err(error(400, "body: must be an object {configPayload, endpoints}"));
    };
    if let Some(k) = body.keys().find(|k| !matches!(k.as_str(), "configPayload" | "endpoints")) {
        return Err(error(400, format!("{k}: unknown field (known: configPayload, endpoints)")));
    }
    let payload = body.get("configPayload").ok_or_else(|| error(400, "configPayload: required"))?;
    let payload =
        serde_json::to_vec(payload).map_err(|e| error(400, format!("configPayload: {e}")))?;
    let Some(Json::Object(endpoints)) = body.get("endpoints") else {
        return Err(error(400, "endpoints: required, an object of app version to endpoint ids"));
    };
    let mut targets = Vec::new();
    for (version, ids) in endpoints {
        non_empty("appVersionName", version)?;
        let ids = ids
            .as_array()
            .ok_or_else(|| error(400, format!("endpoints.{version}: must be an array")))?;
        for id in ids {
            let id = id.as_str().filter(|s| !s.is_empty()).ok_or_else(|| {
                error(400, format!("endpoints.{version}: ids must be non-empty strings"))
            })?;
            targets.push((version.clone(), id.to_owned()));
        }
    }
    Ok((payload, targets))
}

fn status_name(s: &ConfigStatus) -> &'static str {
    match (s.status_code, s.dispatched_ms) {
        (Some(c), _) if (200..300).contains(&c) => "APPLIED",
        (Some(_), _) => "FAILED",
        (None, Some(_)) => "DISPATCHED",
        (None, None) => "PENDING",
    }
}

async fn statuses(shared: &Shared, req: &AdminRequest) -> Answer {
    let params = query(req, &["endpointId", "appVersionName", "configId", "page", "size"])?;
    let number = |k: &str, default: usize| -> Result<usize, AdminResponse> {
        match params.get(k) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| error(400, format!("{k}: `{v}` is not a non-negative integer"))),
        }
    };
    let page = number("page", 0)?;
    if page > MAX_PAGE {
        return Err(error(400, format!("page: must be 0 to {MAX_PAGE}")));
    }
    let size = number("size", 20)?;
    if size == 0 || size > MAX_PAGE_SIZE {
        return Err(error(400, format!("size: must be 1 to {MAX_PAGE_SIZE}")));
    }
    let filter = StatusFilter {
        endpoint: params.get("endpointId").cloned(),
        app_version: params.get("appVersionName").cloned(),
        config_id: params.get("configId").cloned(),
    };
    let all = shared.store.statuses(filter).await.map_err(|e| storage_error(&e))?;
    let total = all.len();
    let mut content = Vec::new();
    for s in all.iter().skip(page.saturating_mul(size)).take(size) {
        // The configuration it concerns, while it is still the current one.
        let current = shared
            .store
            .effective(&s.app_version, &s.endpoint, &s.name)
            .await
            .map_err(|e| storage_error(&e))?
            .filter(|c| c.config_id == s.config_id);
        let date = |ms: Option<i64>| ms.map(format_iso8601);
        content.push(json!({
            "configId": s.config_id,
            "endpointId": s.endpoint,
            "appVersionName": s.app_version,
            "name": s.name,
            "status": status_name(s),
            "config": current.and_then(|c| serde_json::from_slice::<Json>(&c.content).ok()),
            "lastDispatchedDate": date(s.dispatched_ms),
            "lastConfirmedDate": date(s.confirmed_ms),
            "confirmationStatusCode": s.status_code,
            "confirmationReasonPhrase": s.reason,
        }));
    }
    let body = json!({
        "content": content,
        "number": page,
        "size": size,
        "totalElements": total,
        "totalPages": total.div_ceil(size),
        "first": page == 0,
        "last": (page + 1).saturating_mul(size) >= total,
    });
    Ok(AdminResponse::json(200, body.to_string().into_bytes()))
}

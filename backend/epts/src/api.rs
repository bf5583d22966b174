//! Kaa's EPTS REST API on the admin listener, base path `/epts/api/v1`, with Kaa's paths,
//! parameters and response shapes (points grouped by endpoint, then series, each
//! `{"timestamp": "...Z", "values": {...}}`), so that Kaa's REST clients work unchanged; its
//! OpenAPI document at `/epts/api/v1/openapi.json`; and the plot page at `/epts/plot`.
//!
//! Bad parameters get 400 with a reason that names the parameter; an unknown application or
//! app version 404. Every error body is `{"statusCode": ..., "reasonPhrase": "..."}`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use fleetgate_bus::now_ms;
use fleetgate_service::{AdminRequest, AdminResponse, AdminRoutes, BoxFuture};
use fleetgate_storage::{LastQuery, Order, Point, RangeQuery, Value};
use serde_json::{Map, Value as Json, json};
use tokio::sync::oneshot;

use crate::config::is_valid_series_name;
use crate::extract::AUTO_PREFIX;
use crate::time::{format_iso8601, parse_iso8601};
use crate::{Job, Reply, Shared};

/// The base path of the API.
pub const BASE: &str = "/epts/api/v1";
/// The API's OpenAPI document.
pub const OPENAPI: &str = include_str!("openapi.json");
/// The plot page.
const PLOT_PAGE: &str = include_str!("../assets/plot.html");
/// uPlot (MIT), vendored: the page loads it from here, never from a CDN.
const UPLOT_JS: &str = include_str!("../assets/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../assets/uPlot.min.css");
const UPLOT_LICENSE: &str = include_str!("../assets/uPlot.LICENSE");

/// The routes EPTS serves on the admin listener.
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
        &["/epts/"]
    }

    fn is_public(&self, path: &str) -> bool {
        path == "/epts/api/v1/openapi.json" || path.starts_with("/epts/plot")
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

fn bad(param: &str, what: impl std::fmt::Display) -> AdminResponse {
    error(400, format!("{param}: {what}"))
}

fn ok_json(body: &Json) -> AdminResponse {
    AdminResponse::json(200, body.to_string().into_bytes())
}

fn asset(content_type: &'static str, body: &str) -> AdminResponse {
    AdminResponse {
        status: 200,
        content_type,
        body: body.as_bytes().to_vec(),
        allow: None,
        headers: Vec::new(),
    }
}

fn not_allowed(allow: &'static str) -> AdminResponse {
    let mut r = error(405, format!("method not allowed: use {allow}"));
    r.allow = Some(allow);
    r
}

async fn route(shared: &Shared, req: &AdminRequest) -> Answer {
    match req.path.as_str() {
        "/epts/plot" | "/epts/plot/" => {
            return only(req, || asset("text/html; charset=utf-8", PLOT_PAGE));
        }
        "/epts/plot/uPlot.iife.min.js" => {
            return only(req, || asset("text/javascript; charset=utf-8", UPLOT_JS));
        }
        "/epts/plot/uPlot.min.css" => {
            return only(req, || asset("text/css; charset=utf-8", UPLOT_CSS));
        }
        "/epts/plot/uPlot.LICENSE" => {
            return only(req, || asset("text/plain; charset=utf-8", UPLOT_LICENSE));
        }
        _ => {}
    }
    let Some(rest) = req.path.strip_prefix(BASE) else {
        return Err(error(404, format!("not found: the EPTS API is under {BASE}")));
    };
    let segments: Vec<String> = rest
        .trim_start_matches('/')
        .split('/')
        .map(percent_decode)
        .collect::<Option<_>>()
        .ok_or_else(|| error(400, "path: bad percent-encoding"))?;
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    match (req.method.as_str(), segments.as_slice()) {
        ("GET", ["openapi.json"]) => Ok(asset("application/json", OPENAPI)),
        ("GET", ["time-series", "config"]) => config(shared, req).await,
        (m @ ("GET" | "POST"), ["applications", app, "time-series", "last"]) => {
            let app = known_app(shared, app)?;
            let params = params_of(m, req)?;
            last(shared, app, &params).await
        }
        (m @ ("GET" | "POST"), ["applications", app, "time-series", "data"]) => {
            let app = known_app(shared, app)?;
            let params = params_of(m, req)?;
            data(shared, app, &params).await
        }
        ("PUT", ["app-versions", version, "time-series", "data"]) => {
            put(shared, version, &req.body).await
        }
        (_, ["openapi.json"] | ["time-series", "config"]) => Err(not_allowed("GET")),
        (_, ["applications", _, "time-series", "last" | "data"]) => Err(not_allowed("GET, POST")),
        (_, ["app-versions", _, "time-series", "data"]) => Err(not_allowed("PUT")),
        _ => Err(error(404, format!("not found: {}", req.path))),
    }
}

fn only(req: &AdminRequest, answer: impl FnOnce() -> AdminResponse) -> Answer {
    if req.method == "GET" { Ok(answer()) } else { Err(not_allowed("GET")) }
}

fn known_app<'a>(shared: &'a Shared, app: &str) -> Result<&'a str, AdminResponse> {
    shared
        .apps
        .get_key_value(app)
        .map(|(k, _)| k.as_str())
        .ok_or_else(|| error(404, format!("application `{app}` not found")))
}

/// Parses a request's parameters as the API does (a GET query string, else a JSON body) and
/// validates those of a `/data` query: for the `epts_api_params` fuzz target. Never panics.
#[doc(hidden)]
pub fn fuzz_params(method: &str, query: &str, body: &[u8]) {
    let req = AdminRequest {
        method: method.to_owned(),
        path: String::new(),
        query: query.to_owned(),
        body: body.to_vec(),
    };
    if let Ok(params) = params_of(method, &req) {
        let _ = series_names(&params);
        let _ = date(&params, "fromDate");
        let _ = count(&params, "limit", 1);
        let _ = one(&params, "sort");
        let _ = endpoints(&params);
    }
    let _ = percent_decode(query);
    if let Ok(Json::Object(o)) = serde_json::from_slice::<Json>(body) {
        for (endpoint, series) in o {
            if let Json::Object(series) = series {
                for (name, points) in series {
                    if let Json::Array(points) = points {
                        for p in points {
                            let _ = put_point("a", &endpoint, &name, &p);
                        }
                    }
                }
            }
        }
    }
}

/// Decodes `%XX` escapes (and `+` as a space, for query strings); `None` when malformed or
/// not UTF-8.
fn decode(s: &str, plus_is_space: bool) -> Option<String> {
    fleetgate_service::percent_decode(s, plus_is_space)
}

fn percent_decode(s: &str) -> Option<String> {
    decode(s, false)
}

/// The parameters a POST body may carry.
const KNOWN_BODY_KEYS: &[&str] = &[
    "timeSeriesNames",
    "timeSeriesName",
    "fromDate",
    "toDate",
    "beforeDate",
    "endpointIDs",
    "endpointIds",
    "endpointId",
    "includeTime",
    "sort",
    "limit",
    "offset",
];

/// Request parameters by name, each a list (comma-separated in a query string, a JSON array
/// or a string in a body).
type Params = HashMap<String, Vec<String>>;

fn params_of(method: &str, req: &AdminRequest) -> Result<Params, AdminResponse> {
    let mut params = Params::new();
    if method == "GET" {
        for pair in req.query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let k = decode(k, true).ok_or_else(|| bad("query", "bad percent-encoding"))?;
            let v = decode(v, true).ok_or_else(|| bad(&k, "bad percent-encoding"))?;
            params.entry(k).or_default().extend(split_list(&v));
        }
        return Ok(params);
    }
    let body: Json = match req.body.is_empty() {
        true => Json::Object(Map::new()),
        false => {
            serde_json::from_slice(&req.body).map_err(|e| bad("body", format!("not JSON: {e}")))?
        }
    };
    let Json::Object(fields) = body else { return Err(bad("body", "must be a JSON object")) };
    // Only the parameters the API knows; other keys are ignored, as Kaa does.
    let known = |k: &str| KNOWN_BODY_KEYS.contains(&k);
    for (k, v) in fields.into_iter().filter(|(k, _)| known(k)) {
        let counts = k == "limit" || k == "offset";
        let values = match v {
            Json::Null => continue,
            Json::Number(n) if counts => vec![number_text(&n)],
            _ if counts => return Err(bad(&k, "must be an integer")),
            Json::String(s) => split_list(&s),
            Json::Number(_) | Json::Bool(_) => {
                return Err(bad(&k, "must be a string or a list of strings"));
            }
            Json::Array(items) => items
                .into_iter()
                .map(|i| match i {
                    Json::String(s) => Ok(s),
                    _ => Err(bad(&k, "must hold strings")),
                })
                .collect::<Result<_, _>>()?,
            Json::Object(_) => return Err(bad(&k, "must be a string or a list of strings")),
        };
        params.entry(k).or_default().extend(values);
    }
    Ok(params)
}

/// The items of a comma-separated list; an empty value stays one empty item (so that
/// `fromDate=` is an error, not an absent parameter).
fn split_list(v: &str) -> Vec<String> {
    if v.is_empty() {
        return vec![String::new()];
    }
    v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

/// A JSON number as text, integers without a fraction (`5.0` is `5`).
fn number_text(n: &serde_json::Number) -> String {
    match n.as_f64() {
        Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 9.0e15 => format!("{}", f as i64),
        _ => n.to_string(),
    }
}

/// The values of the first of `names` present.
fn list<'a>(params: &'a Params, names: &[&str]) -> Option<&'a [String]> {
    names.iter().find_map(|n| params.get(*n)).map(Vec::as_slice)
}

fn one<'a>(params: &'a Params, name: &str) -> Result<Option<&'a str>, AdminResponse> {
    match params.get(name).map(Vec::as_slice) {
        None | Some([]) => Ok(None),
        Some([v]) => Ok(Some(v)),
        Some(_) => Err(bad(name, "give one value")),
    }
}

fn date(params: &Params, name: &str) -> Result<Option<i64>, AdminResponse> {
    let Some(v) = one(params, name)? else { return Ok(None) };
    // An unescaped `+` of an offset arrives as a space.
    parse_iso8601(v).or_else(|| parse_iso8601(&v.replace(' ', "+"))).map(Some).ok_or_else(|| {
        bad(name, format!("`{v}` is not an ISO-8601 timestamp (e.g. 2019-04-26T15:41:07Z)"))
    })
}

fn count(params: &Params, name: &str, min: usize) -> Result<Option<usize>, AdminResponse> {
    let Some(v) = one(params, name)? else { return Ok(None) };
    match v.parse::<usize>() {
        Ok(n) if n >= min => Ok(Some(n)),
        _ => Err(bad(name, format!("`{v}` is not an integer of at least {min}"))),
    }
}

fn series_names(params: &Params) -> Result<Vec<String>, AdminResponse> {
    let names = match list(params, &["timeSeriesName", "timeSeriesNames"]) {
        Some(names) if !names.is_empty() => names,
        _ => return Err(bad("timeSeriesName", "required (one or more series names)")),
    };
    let valid = |n: &String| {
        !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"_~-".contains(&b))
    };
    match names.iter().find(|n| !valid(n)) {
        Some(n) => Err(bad("timeSeriesName", format!("`{n}` is not a series name"))),
        None => Ok(names.to_vec()),
    }
}

/// The endpoints asked for; `None` (every endpoint) when absent or empty.
fn endpoints(params: &Params) -> Option<Vec<String>> {
    let given = list(params, &["endpointId", "endpointIds", "endpointIDs"])?;
    let ids: Vec<String> = given.iter().filter(|e| !e.is_empty()).cloned().collect();
    (!ids.is_empty()).then_some(ids)
}

fn value_json(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Long(l) => Json::from(*l),
        Value::Double(d) => serde_json::Number::from_f64(*d).map_or(Json::Null, Json::Number),
        Value::String(s) => Json::String(s.clone()),
    }
}

fn point_json(p: &Point) -> Json {
    let values: Map<String, Json> =
        p.values.iter().map(|(k, v)| (k.clone(), value_json(v))).collect();
    json!({"timestamp": format_iso8601(p.timestamp_ms), "values": values})
}

/// Points grouped by endpoint, then series, keeping their order within each series.
fn grouped(points: &[Point]) -> BTreeMap<&str, Map<String, Json>> {
    let mut out: BTreeMap<&str, Map<String, Json>> = BTreeMap::new();
    for p in points {
        let series = out.entry(&p.endpoint).or_default();
        let list = series.entry(p.series.clone()).or_insert_with(|| Json::Array(Vec::new()));
        if let Json::Array(items) = list {
            items.push(point_json(p));
        }
    }
    out
}

fn storage_error(e: &fleetgate_storage::StorageError) -> AdminResponse {
    tracing::error!(error = %e, "epts query failed");
    error(503, format!("the store failed: {e}"))
}

async fn config(shared: &Shared, req: &AdminRequest) -> Answer {
    let params = params_of("GET", req)?;
    let wanted = list(&params, &["applicationNames"]);
    let mut out = Map::new();
    for (name, app) in &shared.apps {
        if wanted.is_some_and(|w| !w.contains(name)) {
            continue;
        }
        let mut series: BTreeMap<String, Vec<String>> = app
            .config
            .names
            .iter()
            .map(|(s, c)| (s.clone(), c.values.iter().map(|v| v.name.clone()).collect()))
            .collect();
        // Auto-extracted series exist once a sample had them.
        for s in shared.store.series(name).await.map_err(|e| storage_error(&e))? {
            if s.starts_with(AUTO_PREFIX) {
                series.entry(s).or_insert_with(|| vec!["value".into()]);
            }
        }
        let list = series.into_iter().map(|(name, values)| json!({"name": name, "values": values}));
        out.insert(name.clone(), Json::Array(list.collect()));
    }
    Ok(ok_json(&Json::Object(out)))
}

async fn last(shared: &Shared, app: &str, params: &Params) -> Answer {
    let series = series_names(params)?;
    let before = date(params, "beforeDate")?;
    let offset = count(params, "offset", 0)?.unwrap_or(0);
    let limit = count(params, "limit", 1)?;
    let mut endpoints = endpoints(params);
    if offset > 0 || limit.is_some() {
        // Pages of endpoints, in endpoint order.
        let mut all = match endpoints {
            Some(e) => e,
            None => shared.store.endpoints(app).await.map_err(|e| storage_error(&e))?,
        };
        all.sort_unstable();
        all.dedup();
        endpoints = Some(all.into_iter().skip(offset).take(limit.unwrap_or(usize::MAX)).collect());
    }
    let query = LastQuery { app: app.to_owned(), series, endpoints, before_ms: before };
    let points = shared.store.last(query).await.map_err(|e| storage_error(&e))?;
    let body: Map<String, Json> =
        grouped(&points).into_iter().map(|(e, s)| (e.to_owned(), Json::Object(s))).collect();
    Ok(ok_json(&Json::Object(body)))
}

async fn data(shared: &Shared, app: &str, params: &Params) -> Answer {
    let series = series_names(params)?;
    let from = date(params, "fromDate")?.ok_or_else(|| bad("fromDate", "required (ISO-8601)"))?;
    let to = date(params, "toDate")?.ok_or_else(|| bad("toDate", "required (ISO-8601)"))?;
    // A range that ends before it starts holds no points (an empty answer, not an error).
    let (from_in, to_in) = match one(params, "includeTime")?.map(str::to_ascii_lowercase).as_deref()
    {
        None | Some("both") => (true, true),
        Some("from") => (true, false),
        Some("to") => (false, true),
        Some("none") => (false, false),
        Some(other) => {
            return Err(bad(
                "includeTime",
                format!("`{other}` is not one of both, from, to, none"),
            ));
        }
    };
    let order = match one(params, "sort")?.map(str::to_ascii_uppercase).as_deref() {
        None | Some("ASC") => Order::Ascending,
        Some("DESC") => Order::Descending,
        Some(other) => return Err(bad("sort", format!("`{other}` is not ASC or DESC"))),
    };
    let cap = shared.config.max_query_points;
    let limit = count(params, "limit", 1)?.unwrap_or(cap).min(cap);
    let query = RangeQuery {
        app: app.to_owned(),
        series,
        endpoints: endpoints(params),
        from_ms: if from_in { from } else { from.saturating_add(1) },
        to_ms: if to_in { to } else { to.saturating_sub(1) },
        order,
        limit,
    };
    let points = shared.store.range(query).await.map_err(|e| storage_error(&e))?;
    let body: Vec<Json> = grouped(&points)
        .into_iter()
        .map(|(e, s)| {
            let mut one = Map::new();
            one.insert(e.to_owned(), Json::Object(s));
            Json::Object(one)
        })
        .collect();
    Ok(ok_json(&Json::Array(body)))
}

/// `PUT /app-versions/{v}/time-series/data`: `{"<endpoint>": {"<series>": [{"timestamp",
/// "values"}]}}` (or an array of such objects, the shape `GET .../data` answers). Stored like
/// samples from devices, and broadcast on 14/TSTP.
async fn put(shared: &Shared, version: &str, body: &[u8]) -> Answer {
    let Some(app) = shared.versions.get(version) else {
        return Err(error(404, format!("app version `{version}` not found")));
    };
    let body: Json =
        serde_json::from_slice(body).map_err(|e| bad("body", format!("not JSON: {e}")))?;
    let objects = match body {
        Json::Object(o) => vec![o],
        Json::Array(items) => items
            .into_iter()
            .map(|i| match i {
                Json::Object(o) => Ok(o),
                _ => Err(bad("body", "an array must hold objects keyed by endpoint id")),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad("body", "must be an object keyed by endpoint id")),
    };
    let received_ms = now_ms();
    let mut jobs: BTreeMap<String, Vec<Point>> = BTreeMap::new();
    for object in objects {
        for (endpoint, series) in object {
            let Json::Object(series) = series else {
                return Err(bad(
                    &format!("body.{endpoint}"),
                    "must be an object keyed by series name",
                ));
            };
            for (name, points) in series {
                let at = format!("body.{endpoint}.{name}");
                let plain = name.strip_prefix(AUTO_PREFIX).unwrap_or(&name);
                if !is_valid_series_name(plain) {
                    return Err(bad(&at, "not a valid series name ([A-Za-z0-9_-], not reserved)"));
                }
                let Json::Array(points) = points else {
                    return Err(bad(&at, "must be a list of points"));
                };
                for (i, p) in points.into_iter().enumerate() {
                    let point = put_point(app, &endpoint, &name, &p)
                        .map_err(|w| bad(&format!("{at}[{i}]"), w))?;
                    jobs.entry(endpoint.clone()).or_default().push(point);
                }
            }
        }
    }
    let mut waits = Vec::new();
    for (endpoint, points) in jobs {
        let (tx, rx) = oneshot::channel();
        let job = Job {
            app_version: version.to_owned(),
            endpoint,
            received_ms,
            points,
            reply: Reply::Http(tx),
        };
        shared.jobs.send(job).await.map_err(|_| error(503, "EPTS is stopping"))?;
        waits.push(rx);
    }
    for rx in waits {
        match rx.await {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => return Err(error(503, reason)),
            Err(_) => return Err(error(503, "EPTS is stopping")),
        }
    }
    Ok(AdminResponse::json(200, Vec::new()))
}

/// The largest Unix milliseconds a PUT may give as a number (±285 000 years).
const MAX_PUT_MS: i64 = 9_000_000_000_000_000;

fn put_point(app: &str, endpoint: &str, series: &str, p: &Json) -> Result<Point, String> {
    let timestamp_ms = match p.get("timestamp") {
        Some(Json::String(s)) => {
            parse_iso8601(s).ok_or_else(|| format!("timestamp `{s}` is not ISO-8601"))?
        }
        Some(Json::Number(n)) => match n.as_i64().or_else(|| {
            n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.1e15).map(|f| f as i64)
        }) {
            Some(ms) if ms.abs() <= MAX_PUT_MS => ms,
            _ => {
                return Err(format!(
                    "timestamp {n} is not whole milliseconds within ±{MAX_PUT_MS}"
                ));
            }
        },
        _ => return Err("needs a timestamp (ISO-8601 or Unix milliseconds)".into()),
    };
    let Some(Json::Object(values)) = p.get("values") else {
        return Err("needs `values`, an object of named values".into());
    };
    let mut out = Vec::with_capacity(values.len());
    for (name, v) in values {
        if !crate::config::is_valid_value_name(name) {
            return Err(format!("`{name}` is not a valid value name"));
        }
        let value = match v {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Number(n) => match n.as_i64() {
                Some(i) => Value::Long(i),
                None => Value::Double(n.as_f64().unwrap_or(f64::NAN)),
            },
            Json::String(s) => Value::String(s.clone()),
            _ => return Err(format!("value `{name}` must be a number, string, boolean or null")),
        };
        out.push((name.clone(), value));
    }
    Ok(Point {
        app: app.to_owned(),
        series: series.to_owned(),
        endpoint: endpoint.to_owned(),
        timestamp_ms,
        values: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(decode("a%2Bb+c", true).as_deref(), Some("a+b c"));
        assert_eq!(decode("a+b", false).as_deref(), Some("a+b"));
        assert_eq!(decode("%zz", true), None);
        assert_eq!(decode("%e2%82%ac", true).as_deref(), Some("€"));
        assert_eq!(decode("%ff", true), None);
        assert_eq!(decode("%", true), None);
    }

    #[test]
    fn the_openapi_document_is_json_and_lists_every_path() {
        let doc: Json = serde_json::from_str(OPENAPI).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/time-series/config",
            "/applications/{applicationName}/time-series/last",
            "/applications/{applicationName}/time-series/data",
            "/app-versions/{appVersionName}/time-series/data",
        ] {
            assert!(paths.contains_key(p), "{p}");
        }
    }
}

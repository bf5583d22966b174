//! The last point of each (application, series, endpoint), in memory: `/time-series/last`
//! never reads the disk, and the keys double as the index of which endpoints have a series.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use crate::{LastQuery, Point, Value};

type Key = (String, String); // (series, endpoint)
type Entry = (i64, Vec<(String, Value)>);

/// Newest points by application, then (series, endpoint).
#[derive(Debug, Default)]
pub(crate) struct LastPoints {
    apps: RwLock<HashMap<String, BTreeMap<Key, Entry>>>,
}

impl LastPoints {
    /// Takes `point` if it is at least as new as the one held; returns whether it did.
    pub(crate) fn offer(&self, point: &Point) -> bool {
        let mut apps = self.apps.write().unwrap_or_else(|p| p.into_inner());
        let app = apps.entry(point.app.clone()).or_default();
        let key = (point.series.clone(), point.endpoint.clone());
        match app.get(&key) {
            Some((ts, _)) if *ts > point.timestamp_ms => false,
            _ => {
                app.insert(key, (point.timestamp_ms, point.values.clone()));
                true
            }
        }
    }

    /// The timestamp of the last point of (app, series, endpoint).
    pub(crate) fn timestamp(&self, app: &str, series: &str, endpoint: &str) -> Option<i64> {
        let apps = self.apps.read().unwrap_or_else(|p| p.into_inner());
        let key = (series.to_owned(), endpoint.to_owned());
        apps.get(app)?.get(&key).map(|(ts, _)| *ts)
    }

    /// The newest points of `query` (its `before_ms` is the caller's business).
    pub(crate) fn get(&self, query: &LastQuery) -> Vec<Point> {
        let apps = self.apps.read().unwrap_or_else(|p| p.into_inner());
        let Some(app) = apps.get(&query.app) else { return Vec::new() };
        let mut out = Vec::new();
        for ((series, endpoint), (ts, values)) in app {
            let wanted = query.series.contains(series)
                && query.endpoints.as_ref().is_none_or(|e| e.contains(endpoint));
            if wanted {
                out.push(Point {
                    app: query.app.clone(),
                    series: series.clone(),
                    endpoint: endpoint.clone(),
                    timestamp_ms: *ts,
                    values: values.clone(),
                });
            }
        }
        out.sort_by(|a, b| a.endpoint.cmp(&b.endpoint).then_with(|| a.series.cmp(&b.series)));
        out
    }

    /// The (series, endpoint) keys of `app` among `series` and `endpoints` (`None`: all).
    pub(crate) fn keys(
        &self,
        app: &str,
        series: &[String],
        endpoints: Option<&[String]>,
    ) -> Vec<(String, String)> {
        let apps = self.apps.read().unwrap_or_else(|p| p.into_inner());
        let Some(app) = apps.get(app) else { return Vec::new() };
        app.keys()
            .filter(|(s, e)| series.contains(s) && endpoints.is_none_or(|es| es.contains(e)))
            .cloned()
            .collect()
    }

    /// Every (series, endpoint) key of `app`.
    pub(crate) fn all_keys(&self, app: &str) -> Vec<(String, String)> {
        let apps = self.apps.read().unwrap_or_else(|p| p.into_inner());
        apps.get(app).map(|a| a.keys().cloned().collect()).unwrap_or_default()
    }

    /// Forgets the key's last point if it is older than `before_ms` (it was swept); returns
    /// whether it did.
    pub(crate) fn forget_if_older(&self, app: &str, key: &Key, before_ms: i64) -> bool {
        let mut apps = self.apps.write().unwrap_or_else(|p| p.into_inner());
        let Some(points) = apps.get_mut(app) else { return false };
        match points.get(key) {
            Some((ts, _)) if *ts < before_ms => {
                points.remove(key);
                true
            }
            _ => false,
        }
    }
}

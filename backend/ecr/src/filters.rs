//! Endpoint filters for `PUT /endpoints/filters/{filterId}`.
//!
//! Kaa keeps endpoint filters in a service of their own (20/EFMP); fleetgate has none, so an
//! operator defines them in the `ecr.filters` configuration section, by id:
//!
//! ```yaml
//! ecr:
//!   filters:
//!     sensors-v1:
//!       app_versions: [sensor-v1, sensor-v2]  # only endpoints of these app versions
//!       endpoints: [ep-7, ep-9]               # these endpoint ids ...
//!       endpoint_pattern: "sensor-*"          # ... and those this glob matches (`*`, `?`)
//! ```
//!
//! A configuration reload replaces them while ECR runs. An endpoint matches when its app version is listed (or none are) and its id is listed or
//! matches the pattern (or neither is given). The endpoints matched are those ECR knows,
//! that is those with a configuration of their own or that it dispatched a configuration to
//! or recorded a confirmation of, in the store (so every replica sees the same); endpoints
//! listed by id are matched in each listed app version even before ECR heard of them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::is_valid_config_name;

/// One filter of `ecr.filters`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointFilter {
    /// Only endpoints of these app versions; empty: any app version.
    pub app_versions: Vec<String>,
    /// Endpoint ids.
    pub endpoints: Vec<String>,
    /// A glob over endpoint ids: `*` any run of characters, `?` one character.
    pub endpoint_pattern: Option<String>,
}

impl EndpointFilter {
    /// Whether the endpoint `id` of `app_version` matches.
    pub fn matches(&self, app_version: &str, id: &str) -> bool {
        let version =
            self.app_versions.is_empty() || self.app_versions.iter().any(|v| v == app_version);
        let by_id = self.endpoints.iter().any(|e| e == id);
        let by_pattern = self.endpoint_pattern.as_deref().is_some_and(|p| glob(p, id));
        let any_id = self.endpoints.is_empty() && self.endpoint_pattern.is_none();
        version && (any_id || by_id || by_pattern)
    }

    /// The (app version, endpoint id) pairs the filter names outright.
    pub fn named(&self) -> impl Iterator<Item = (&str, &str)> {
        self.app_versions
            .iter()
            .flat_map(|v| self.endpoints.iter().map(move |e| (v.as_str(), e.as_str())))
    }
}

/// What is wrong with the filters, as (filter id, what).
pub(crate) fn problems(filters: &BTreeMap<String, EndpointFilter>) -> Vec<String> {
    let mut out = Vec::new();
    for (id, f) in filters {
        if !is_valid_config_name(id) {
            out.push(format!("`{id}`: a filter id must match ^[a-zA-Z0-9_-]+$"));
        }
        if f.app_versions.is_empty() && f.endpoints.is_empty() && f.endpoint_pattern.is_none() {
            out.push(format!(
                "{id}: selects every endpoint; name app_versions, endpoints or endpoint_pattern"
            ));
        }
        if f.app_versions.iter().chain(&f.endpoints).any(String::is_empty) {
            out.push(format!("{id}: app versions and endpoint ids must not be empty"));
        }
        if f.endpoint_pattern.as_deref() == Some("") {
            out.push(format!("{id}.endpoint_pattern: must not be empty"));
        }
    }
    out
}

/// Whether `text` matches the glob `pattern` (`*` any run, `?` one character).
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and the text position it has swallowed up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (p, t, m) in [
            ("sensor-*", "sensor-1", true),
            ("sensor-*", "sensor-", true),
            ("sensor-*", "sensors-1", false),
            ("*-7", "a-b-7", true),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("*", "", true),
            ("", "", true),
            ("", "x", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("ép-*", "ép-1", true),
        ] {
            assert_eq!(glob(p, t), m, "{p} {t}");
        }
    }

    #[test]
    fn matching() {
        let f = EndpointFilter {
            app_versions: vec!["v1".into()],
            endpoints: vec!["ep-9".into()],
            endpoint_pattern: Some("s-*".into()),
        };
        assert!(f.matches("v1", "ep-9"));
        assert!(f.matches("v1", "s-1"));
        assert!(!f.matches("v2", "s-1"));
        assert!(!f.matches("v1", "ep-1"));
        let all_of_v1 = EndpointFilter { app_versions: vec!["v1".into()], ..Default::default() };
        assert!(all_of_v1.matches("v1", "anything"));
        assert_eq!(f.named().collect::<Vec<_>>(), [("v1", "ep-9")]);
    }

    #[test]
    fn problems_name_the_filter() {
        let mut filters = BTreeMap::new();
        filters.insert("bad id".to_owned(), EndpointFilter::default());
        let p = problems(&filters);
        assert!(p[0].starts_with("`bad id`"), "{p:?}");
        assert!(p[1].contains("selects every endpoint"), "{p:?}");
    }
}

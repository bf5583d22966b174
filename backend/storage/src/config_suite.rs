//! The behaviour every [`ConfigStore`] must have, as one test suite: each implementation's
//! tests call [`run`] on a fresh store. It panics on the first difference.

// A test suite: a failed call is a failed check.
#![allow(clippy::unwrap_used)]

use crate::config::{
    ConfigKey, ConfigStatus, ConfigStore, StatusEvent, StatusFilter, StoredConfig,
};

async fn put(store: &dyn ConfigStore, key: ConfigKey, json: &str, now: i64) -> StoredConfig {
    store.put(key, json.as_bytes().to_vec(), now).await.unwrap_or_else(|e| panic!("put: {e}"))
}

async fn get(store: &dyn ConfigStore, key: ConfigKey) -> Option<StoredConfig> {
    store.get(key).await.unwrap_or_else(|e| panic!("get: {e}"))
}

async fn statuses(store: &dyn ConfigStore, filter: StatusFilter) -> Vec<ConfigStatus> {
    store.statuses(filter).await.unwrap_or_else(|e| panic!("statuses: {e}"))
}

/// Runs every check on `store`, which must hold nothing of app versions `suite-*`.
pub async fn run(store: &dyn ConfigStore) {
    every_change_gets_a_new_id_and_keeps_its_creation_time(store).await;
    endpoints_fall_back_to_the_default(store).await;
    named_configurations_are_listed_by_scope(store).await;
    deletes_remove_one_configuration(store).await;
    schemas_are_set_and_removed(store).await;
    dispatch_and_confirmation_are_tracked(store).await;
}

async fn every_change_gets_a_new_id_and_keeps_its_creation_time(store: &dyn ConfigStore) {
    let key = ConfigKey::endpoint("suite-v1", "ep-1", "default");
    assert_eq!(get(store, key.clone()).await, None);
    let first = put(store, key.clone(), r#"{"mode":"AP"}"#, 1_000).await;
    assert_eq!(first.key, key);
    assert_eq!((first.created_ms, first.updated_ms), (1_000, 1_000));
    assert!(!first.config_id.is_empty());
    assert_eq!(get(store, key.clone()).await, Some(first.clone()));
    // Even the same content is a change with a new id.
    let second = put(store, key.clone(), r#"{"mode":"AP"}"#, 2_000).await;
    assert_ne!(second.config_id, first.config_id);
    assert_eq!((second.created_ms, second.updated_ms), (1_000, 2_000));
    let third = put(store, key.clone(), r#"{"mode":"STA","ssid":"héllo"}"#, 3_000).await;
    assert_eq!(get(store, key).await, Some(third));
}

async fn endpoints_fall_back_to_the_default(store: &dyn ConfigStore) {
    let effective = |ep: &'static str, name: &'static str| async move {
        store.effective("suite-v2", ep, name).await.unwrap_or_else(|e| panic!("effective: {e}"))
    };
    assert_eq!(effective("ep-1", "default").await, None);
    let default = put(store, ConfigKey::default_of("suite-v2", "default"), "1", 10).await;
    assert_eq!(effective("ep-1", "default").await, Some(default.clone()));
    let own = put(store, ConfigKey::endpoint("suite-v2", "ep-1", "default"), "2", 11).await;
    assert_eq!(effective("ep-1", "default").await, Some(own));
    assert_eq!(effective("ep-2", "default").await, Some(default));
    // Names are separate configurations; another app version shares nothing.
    assert_eq!(effective("ep-1", "network").await, None);
    assert_eq!(store.effective("suite-v3", "ep-1", "default").await.unwrap(), None);
}

async fn named_configurations_are_listed_by_scope(store: &dyn ConfigStore) {
    let v = "suite-v4";
    for name in ["zeta", "alpha", "default"] {
        put(store, ConfigKey::default_of(v, name), "{}", 5).await;
    }
    put(store, ConfigKey::endpoint(v, "ep-1", "night-mode"), "[]", 6).await;
    put(store, ConfigKey::endpoint(v, "ep-10", "other"), "[]", 6).await;
    put(store, ConfigKey::endpoint("suite-v4x", "ep-1", "x"), "[]", 6).await;
    let names = |list: Vec<StoredConfig>| list.into_iter().map(|c| c.key.name).collect::<Vec<_>>();
    assert_eq!(names(store.list(v, None).await.unwrap()), ["alpha", "default", "zeta"]);
    assert_eq!(names(store.list(v, Some("ep-1")).await.unwrap()), ["night-mode"]);
    assert_eq!(names(store.list(v, Some("ep-2")).await.unwrap()), Vec::<String>::new());
    let listed = store.list(v, Some("ep-10")).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].content, b"[]");
    assert_eq!(listed[0].key, ConfigKey::endpoint(v, "ep-10", "other"));
    let pair = |v: &str, e: &str| (v.to_owned(), e.to_owned());
    assert_eq!(
        store.configured_endpoints(Some(v)).await.unwrap(),
        [pair(v, "ep-1"), pair(v, "ep-10")]
    );
    let all = store.configured_endpoints(None).await.unwrap();
    assert!(all.contains(&pair("suite-v4x", "ep-1")) && all.contains(&pair(v, "ep-10")), "{all:?}");
    assert!(!all.iter().any(|(_, e)| e.is_empty()), "defaults are no endpoints: {all:?}");
}

async fn deletes_remove_one_configuration(store: &dyn ConfigStore) {
    let v = "suite-v5";
    let a = ConfigKey::endpoint(v, "ep-1", "default");
    let b = ConfigKey::default_of(v, "default");
    put(store, a.clone(), "1", 1).await;
    put(store, b.clone(), "2", 1).await;
    assert!(store.delete(a.clone()).await.unwrap());
    assert!(!store.delete(a.clone()).await.unwrap());
    assert_eq!(get(store, a).await, None);
    assert_eq!(get(store, b).await.map(|c| c.content), Some(b"2".to_vec()));
}

async fn schemas_are_set_and_removed(store: &dyn ConfigStore) {
    assert_eq!(store.schema("suite-v6").await.unwrap(), None);
    store.set_schema("suite-v6", Some(br#"{"type":"object"}"#.to_vec())).await.unwrap();
    store.set_schema("suite-v6", Some(br#"{"type":"array"}"#.to_vec())).await.unwrap();
    assert_eq!(store.schema("suite-v6").await.unwrap(), Some(br#"{"type":"array"}"#.to_vec()));
    assert_eq!(store.schema("suite-v7").await.unwrap(), None);
    store.set_schema("suite-v6", None).await.unwrap();
    assert_eq!(store.schema("suite-v6").await.unwrap(), None);
}

async fn dispatch_and_confirmation_are_tracked(store: &dyn ConfigStore) {
    let v = "suite-v8";
    store.record(v, "ep-1", "default", "c1", StatusEvent::Dispatched, 100).await.unwrap();
    store.record(v, "ep-1", "default", "c1", StatusEvent::Dispatched, 150).await.unwrap();
    let confirmed = StatusEvent::Confirmed { status_code: 200, reason: None };
    store.record(v, "ep-1", "default", "c1", confirmed, 200).await.unwrap();
    let refused = StatusEvent::Confirmed { status_code: 400, reason: Some("bad mode".into()) };
    store.record(v, "ep-1", "network", "n1", refused, 300).await.unwrap();
    store.record(v, "ep-2", "default", "c1", StatusEvent::Dispatched, 400).await.unwrap();
    store.record("suite-v9", "ep-1", "default", "c9", StatusEvent::Dispatched, 1).await.unwrap();

    let all =
        statuses(store, StatusFilter { app_version: Some(v.into()), ..Default::default() }).await;
    let expected = vec![
        ConfigStatus {
            app_version: v.into(),
            endpoint: "ep-1".into(),
            name: "default".into(),
            config_id: "c1".into(),
            dispatched_ms: Some(150),
            confirmed_ms: Some(200),
            status_code: Some(200),
            reason: None,
        },
        ConfigStatus {
            app_version: v.into(),
            endpoint: "ep-1".into(),
            name: "network".into(),
            config_id: "n1".into(),
            dispatched_ms: None,
            confirmed_ms: Some(300),
            status_code: Some(400),
            reason: Some("bad mode".into()),
        },
        ConfigStatus {
            app_version: v.into(),
            endpoint: "ep-2".into(),
            name: "default".into(),
            config_id: "c1".into(),
            dispatched_ms: Some(400),
            confirmed_ms: None,
            status_code: None,
            reason: None,
        },
    ];
    assert_eq!(all, expected);
    assert!(all[0].applied() && !all[1].applied() && !all[2].applied());
    let by_endpoint = |e: &str| StatusFilter {
        app_version: Some(v.into()),
        endpoint: Some(e.into()),
        config_id: None,
    };
    assert_eq!(statuses(store, by_endpoint("ep-2")).await, expected[2..]);
    let by_id = StatusFilter { config_id: Some("c1".into()), ..Default::default() };
    assert_eq!(statuses(store, by_id).await, [expected[0].clone(), expected[2].clone()]);
    let other = StatusFilter { endpoint: Some("ep-1".into()), ..Default::default() };
    let other: Vec<_> = statuses(store, other).await.into_iter().map(|s| s.config_id).collect();
    assert_eq!(other, ["c1", "n1", "c9"]);
}

/// Writes configurations and a status for a check after a reopen; returns what it wrote.
pub async fn write_some(store: &dyn ConfigStore) -> Vec<StoredConfig> {
    let a = put(store, ConfigKey::default_of("suite-r1", "default"), r#"{"a":1}"#, 7).await;
    let b = put(store, ConfigKey::endpoint("suite-r1", "ep-1", "net"), r#"{"b":2}"#, 8).await;
    store.set_schema("suite-r1", Some(b"{}".to_vec())).await.unwrap();
    let ok = StatusEvent::Confirmed { status_code: 204, reason: Some("ok".into()) };
    store.record("suite-r1", "ep-1", "net", &b.config_id, ok, 9).await.unwrap();
    vec![a, b]
}

/// Checks that what [`write_some`] wrote is there.
pub async fn check_some(store: &dyn ConfigStore, written: &[StoredConfig]) {
    for c in written {
        assert_eq!(get(store, c.key.clone()).await.as_ref(), Some(c));
    }
    assert_eq!(store.schema("suite-r1").await.unwrap(), Some(b"{}".to_vec()));
    let filter = StatusFilter { app_version: Some("suite-r1".into()), ..Default::default() };
    let s = statuses(store, filter).await;
    assert_eq!(s.len(), 1);
    assert_eq!(
        (s[0].confirmed_ms, s[0].status_code, s[0].reason.as_deref()),
        (Some(9), Some(204), Some("ok"))
    );
}

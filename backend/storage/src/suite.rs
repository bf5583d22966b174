//! The behaviour every [`TimeSeriesStore`] must have, as one test suite: each implementation's
//! tests call [`run`] on a fresh store. It panics on the first difference.

use crate::{LastQuery, Order, Point, RangeQuery, TimeSeriesStore, Value};

fn point(app: &str, series: &str, endpoint: &str, ts: i64, v: f64) -> Point {
    Point {
        app: app.into(),
        series: series.into(),
        endpoint: endpoint.into(),
        timestamp_ms: ts,
        values: vec![("value".into(), Value::Double(v))],
    }
}

fn range(app: &str, series: &[&str], endpoints: Option<&[&str]>, from: i64, to: i64) -> RangeQuery {
    RangeQuery {
        app: app.into(),
        series: series.iter().map(|s| (*s).to_owned()).collect(),
        endpoints: endpoints.map(|e| e.iter().map(|s| (*s).to_owned()).collect()),
        from_ms: from,
        to_ms: to,
        order: Order::Ascending,
        limit: 10_000,
    }
}

fn last(app: &str, series: &[&str], before: Option<i64>) -> LastQuery {
    LastQuery {
        app: app.into(),
        series: series.iter().map(|s| (*s).to_owned()).collect(),
        endpoints: None,
        before_ms: before,
    }
}

fn stamps(points: &[Point]) -> Vec<(String, i64)> {
    points.iter().map(|p| (p.endpoint.clone(), p.timestamp_ms)).collect()
}

async fn write(store: &dyn TimeSeriesStore, points: Vec<Point>) {
    store.write(std::sync::Arc::new(points)).await.unwrap_or_else(|e| panic!("write: {e}"));
}

async fn query(store: &dyn TimeSeriesStore, q: RangeQuery) -> Vec<Point> {
    store.range(q).await.unwrap_or_else(|e| panic!("range: {e}"))
}

async fn lasts(store: &dyn TimeSeriesStore, q: LastQuery) -> Vec<Point> {
    store.last(q).await.unwrap_or_else(|e| panic!("last: {e}"))
}

/// Runs every check on `store`, which must hold nothing of applications `suite-*`.
pub async fn run(store: &dyn TimeSeriesStore) {
    ranges_are_ordered_filtered_and_limited(store).await;
    a_re_sent_point_overwrites(store).await;
    last_points_are_the_newest(store).await;
    the_sweep_deletes_old_points_only(store).await;
    values_of_every_kind_come_back(store).await;
    series_and_endpoints_are_listed(store).await;
    write_some(store).await;
    check_some(store).await;
}

async fn ranges_are_ordered_filtered_and_limited(store: &dyn TimeSeriesStore) {
    let app = "suite-range";
    write(
        store,
        vec![
            point(app, "t", "e1", 30, 3.0),
            point(app, "t", "e1", 10, 1.0),
            point(app, "t", "e2", 20, 2.0),
            point(app, "t", "e2", -5, -1.0),
            point(app, "h", "e1", 15, 9.0),
            point("suite-other", "t", "e1", 12, 0.0),
        ],
    )
    .await;
    let all = query(store, range(app, &["t"], None, i64::MIN, i64::MAX)).await;
    assert_eq!(
        stamps(&all),
        [("e2".into(), -5), ("e1".into(), 10), ("e2".into(), 20), ("e1".into(), 30)]
    );
    assert_eq!(all[0].values, [("value".to_owned(), Value::Double(-1.0))]);
    assert!(all.iter().all(|p| p.app == app && p.series == "t"));

    // Both ends of the range are included.
    let inner = query(store, range(app, &["t"], None, 10, 20)).await;
    assert_eq!(stamps(&inner), [("e1".into(), 10), ("e2".into(), 20)]);

    let mut desc = range(app, &["t"], None, i64::MIN, i64::MAX);
    desc.order = Order::Descending;
    desc.limit = 3;
    let newest = query(store, desc).await;
    assert_eq!(stamps(&newest), [("e1".into(), 30), ("e2".into(), 20), ("e1".into(), 10)]);

    let mut first = range(app, &["t"], None, i64::MIN, i64::MAX);
    first.limit = 1;
    assert_eq!(stamps(&query(store, first).await), [("e2".into(), -5)]);

    let e1 = query(store, range(app, &["t"], Some(&["e1"]), i64::MIN, i64::MAX)).await;
    assert_eq!(stamps(&e1), [("e1".into(), 10), ("e1".into(), 30)]);

    let both = query(store, range(app, &["t", "h"], Some(&["e1"]), 0, 100)).await;
    let series: Vec<_> = both.iter().map(|p| (p.series.as_str(), p.timestamp_ms)).collect();
    assert_eq!(series, [("t", 10), ("h", 15), ("t", 30)]);

    assert!(query(store, range(app, &["t"], None, 31, 100)).await.is_empty());
    assert!(query(store, range(app, &["t"], None, 20, 10)).await.is_empty());
    assert!(query(store, range(app, &["nope"], None, 0, 100)).await.is_empty());
    assert!(query(store, range("suite-none", &["t"], None, 0, 100)).await.is_empty());
    assert!(query(store, range(app, &["t"], Some(&["e9"]), 0, 100)).await.is_empty());
}

async fn a_re_sent_point_overwrites(store: &dyn TimeSeriesStore) {
    let app = "suite-overwrite";
    write(store, vec![point(app, "t", "e1", 100, 1.0), point(app, "t", "e1", 200, 2.0)]).await;
    write(store, vec![point(app, "t", "e1", 100, 5.0)]).await;
    // Within one batch the later of two points with one key wins.
    write(store, vec![point(app, "t", "e1", 200, 6.0), point(app, "t", "e1", 200, 7.0)]).await;
    let all = query(store, range(app, &["t"], None, 0, 1000)).await;
    let values: Vec<_> = all.iter().map(|p| (p.timestamp_ms, p.values[0].1.clone())).collect();
    assert_eq!(values, [(100, Value::Double(5.0)), (200, Value::Double(7.0))]);
    let newest = lasts(store, last(app, &["t"], None)).await;
    assert_eq!(newest.len(), 1);
    assert_eq!(newest[0].values[0].1, Value::Double(7.0));
}

async fn last_points_are_the_newest(store: &dyn TimeSeriesStore) {
    let app = "suite-last";
    write(
        store,
        vec![
            point(app, "t", "e1", 10, 1.0),
            point(app, "t", "e1", 30, 3.0),
            point(app, "t", "e2", 20, 2.0),
            point(app, "h", "e1", 5, 5.0),
        ],
    )
    .await;
    // An older point arriving later does not replace the newest.
    write(store, vec![point(app, "t", "e1", 25, 2.5)]).await;
    let newest = lasts(store, last(app, &["t"], None)).await;
    assert_eq!(stamps(&newest), [("e1".into(), 30), ("e2".into(), 20)]);
    assert_eq!(newest[0].values[0].1, Value::Double(3.0));

    let both = lasts(store, last(app, &["t", "h"], None)).await;
    let keys: Vec<_> =
        both.iter().map(|p| (p.endpoint.as_str(), p.series.as_str(), p.timestamp_ms)).collect();
    assert_eq!(keys, [("e1", "h", 5), ("e1", "t", 30), ("e2", "t", 20)]);

    let mut only_e2 = last(app, &["t"], None);
    only_e2.endpoints = Some(vec!["e2".into()]);
    assert_eq!(stamps(&lasts(store, only_e2).await), [("e2".into(), 20)]);

    // Strictly before a date.
    let before = lasts(store, last(app, &["t"], Some(30))).await;
    assert_eq!(stamps(&before), [("e1".into(), 25), ("e2".into(), 20)]);
    let before = lasts(store, last(app, &["t"], Some(20))).await;
    assert_eq!(stamps(&before), [("e1".into(), 10)]);
    assert!(lasts(store, last(app, &["t"], Some(10))).await.is_empty());
    assert!(lasts(store, last("suite-none", &["t"], None)).await.is_empty());
}

async fn the_sweep_deletes_old_points_only(store: &dyn TimeSeriesStore) {
    let app = "suite-sweep";
    write(
        store,
        vec![
            point(app, "t", "e1", 10, 1.0),
            point(app, "t", "e1", 20, 2.0),
            point(app, "t", "e1", 30, 3.0),
            point(app, "t", "e2", 5, 0.5),
            point("suite-kept", "t", "e1", 1, 1.0),
        ],
    )
    .await;
    let removed = store.sweep(app, 20).await.unwrap_or_else(|e| panic!("sweep: {e}"));
    assert_eq!(removed, 2);
    let left = query(store, range(app, &["t"], None, i64::MIN, i64::MAX)).await;
    assert_eq!(stamps(&left), [("e1".into(), 20), ("e1".into(), 30)]);
    // e2 has no point left, so it has no last point either.
    assert_eq!(stamps(&lasts(store, last(app, &["t"], None)).await), [("e1".into(), 30)]);
    let kept = query(store, range("suite-kept", &["t"], None, i64::MIN, i64::MAX)).await;
    assert_eq!(kept.len(), 1, "another application's points are not swept");
    // A point written after the sweep for an emptied key is found again.
    write(store, vec![point(app, "t", "e2", 40, 4.0)]).await;
    let left = query(store, range(app, &["t"], Some(&["e2"]), 0, 100)).await;
    assert_eq!(stamps(&left), [("e2".into(), 40)]);
}

async fn values_of_every_kind_come_back(store: &dyn TimeSeriesStore) {
    let app = "suite-kinds";
    let values = vec![
        ("n".to_owned(), Value::Null),
        ("b".to_owned(), Value::Bool(true)),
        ("l".to_owned(), Value::Long(-42)),
        ("d".to_owned(), Value::Double(21.25)),
        ("s".to_owned(), Value::String("ünïcode \"quoted\"".into())),
    ];
    let p = Point {
        app: app.into(),
        series: "mixed".into(),
        endpoint: "ep with spaces/and:colons".into(),
        timestamp_ms: 1_700_000_000_123,
        values,
    };
    write(store, vec![p.clone()]).await;
    assert_eq!(
        query(store, range(app, &["mixed"], None, 0, i64::MAX)).await,
        std::slice::from_ref(&p)
    );
    assert_eq!(lasts(store, last(app, &["mixed"], None)).await, [p]);
}

/// Writes points that [`check_some`] expects (also after the store is reopened).
pub async fn write_some(store: &dyn TimeSeriesStore) {
    let app = "suite-persist";
    write(store, (0..100).map(|i| point(app, "t", "e1", i, i as f64)).collect()).await;
}

/// Checks what [`write_some`] wrote.
pub async fn check_some(store: &dyn TimeSeriesStore) {
    let app = "suite-persist";
    let all = query(store, range(app, &["t"], None, 0, 1000)).await;
    assert_eq!(all.len(), 100);
    let newest = lasts(store, last(app, &["t"], None)).await;
    assert_eq!(stamps(&newest), [("e1".into(), 99)]);
}

async fn series_and_endpoints_are_listed(store: &dyn TimeSeriesStore) {
    let app = "suite-list";
    write(
        store,
        vec![
            point(app, "b", "e2", 1, 1.0),
            point(app, "a", "e1", 1, 1.0),
            point(app, "b", "e1", 2, 1.0),
        ],
    )
    .await;
    assert_eq!(store.series(app).await.unwrap_or_else(|e| panic!("series: {e}")), ["a", "b"]);
    assert_eq!(
        store.endpoints(app).await.unwrap_or_else(|e| panic!("endpoints: {e}")),
        ["e1", "e2"]
    );
    assert!(store.series("suite-none").await.unwrap_or_else(|e| panic!("series: {e}")).is_empty());
}

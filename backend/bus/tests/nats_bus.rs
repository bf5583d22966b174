//! The NATS bus against a real `nats-server` child process.

#![allow(clippy::expect_used)] // helpers of the tests: a failed expectation fails the test

use std::time::Duration;

use bytes::Bytes;
use fleetgate_bus::{Bus, NatsBus, NatsOptions, Subject};
use fleetgate_testkit::NatsServer;

async fn connect(server: &NatsServer, name: &str) -> NatsBus {
    NatsBus::connect(&NatsOptions::new(server.url(), name)).await.expect("connect")
}

async fn next_payload(sub: &mut fleetgate_bus::Subscription) -> Option<Bytes> {
    tokio::time::timeout(Duration::from_secs(5), sub.next()).await.ok().flatten().map(|m| m.payload)
}

#[tokio::test]
async fn publish_subscribe_with_reply_subject() {
    let server = NatsServer::start();
    let a = connect(&server, "a").await;
    let b = connect(&server, "b").await;
    let mut sub = b.subscribe("kaa.v1.service.dcx.esp.ClientData", Some("dcx")).await.expect("sub");
    b.flush().await.expect("flush");
    a.publish(
        Subject::from_static("kaa.v1.service.dcx.esp.ClientData"),
        Some(Subject::from_static("kaa.v1.replica.gw-1.esp.ExtensionData")),
        Bytes::from_static(b"x"),
    )
    .await
    .expect("publish");
    let msg = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("in time")
        .expect("msg");
    assert_eq!(&msg.payload[..], b"x");
    assert_eq!(msg.reply.as_deref(), Some("kaa.v1.replica.gw-1.esp.ExtensionData"));
}

#[tokio::test]
async fn queue_group_members_share_messages() {
    let server = NatsServer::start();
    let publisher = connect(&server, "p").await;
    let r1 = connect(&server, "r1").await;
    let r2 = connect(&server, "r2").await;
    let mut s1 = r1.subscribe("svc", Some("g")).await.expect("sub");
    let mut s2 = r2.subscribe("svc", Some("g")).await.expect("sub");
    r1.flush().await.expect("flush");
    r2.flush().await.expect("flush");
    for i in 0..200u32 {
        publisher
            .publish(Subject::from_static("svc"), None, Bytes::from(i.to_string()))
            .await
            .expect("publish");
    }
    publisher.flush().await.expect("flush");
    let (mut n1, mut n2) = (0, 0);
    while n1 + n2 < 200 {
        tokio::select! {
            Some(_) = next_payload(&mut s1) => n1 += 1,
            Some(_) = next_payload(&mut s2) => n2 += 1,
            else => break,
        }
    }
    assert_eq!(n1 + n2, 200, "every message reaches exactly one member");
    assert!(n1 > 0 && n2 > 0, "both members get a share: {n1} / {n2}");
}

#[tokio::test]
async fn reconnects_after_a_server_restart() {
    let mut server = NatsServer::start();
    let a = connect(&server, "a").await;
    let mut sub = a.subscribe("x", None).await.expect("sub");
    server.restart();
    // The client reconnects and resubscribes by itself.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        a.publish(Subject::from_static("x"), None, Bytes::from_static(b"after"))
            .await
            .expect("publish");
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
            assert_eq!(&m.payload[..], b"after");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no message after restart");
    }
}

#[tokio::test]
async fn connect_failure_names_the_url() {
    let port = fleetgate_testkit::free_port();
    let mut options = NatsOptions::new(format!("nats://127.0.0.1:{port}"), "x");
    options.connect_timeout = Duration::from_millis(500);
    let err = NatsBus::connect(&options).await.err().expect("must fail");
    assert!(err.to_string().contains(&port.to_string()), "{err}");
}

/// Publishes from many tasks through the batching queue, with a queue far smaller than what is
/// sent (so publishers wait for room): every message arrives, each publisher's in order, and a
/// flush returns only after everything published before it is through the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_publishes_arrive_complete_and_in_order() {
    const TASKS: u32 = 8;
    const EACH: u32 = 500;
    let server = NatsServer::start();
    let mut options = NatsOptions::new(server.url(), "batching");
    options.publish_capacity = 4;
    let publisher = NatsBus::connect(&options).await.expect("connect");
    let receiver = connect(&server, "receiver").await;
    let mut sub = receiver.subscribe("batch.>", None).await.expect("sub");
    receiver.flush().await.expect("flush");
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let bus = publisher.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                let subject = Subject::from(format!("batch.{t}"));
                bus.publish(subject, None, Bytes::from(i.to_be_bytes().to_vec()))
                    .await
                    .expect("publish");
            }
        }));
    }
    for task in tasks {
        task.await.expect("publisher task");
    }
    publisher.flush().await.expect("flush");
    let mut next = [0u32; TASKS as usize];
    for _ in 0..TASKS * EACH {
        let msg = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("every message in time")
            .expect("subscription open");
        let t: usize = msg.subject.as_str()["batch.".len()..].parse().expect("task number");
        let i = u32::from_be_bytes(msg.payload[..].try_into().expect("4 bytes"));
        assert_eq!(i, next[t], "publisher {t}'s messages in order");
        next[t] += 1;
    }
    assert!(next.iter().all(|n| *n == EACH));
}

#[tokio::test]
async fn the_publish_linger_spaces_batches_and_gives_way_to_full_batches_and_flushes() {
    let server = NatsServer::start();
    let mut options = NatsOptions::new(server.url(), "linger");
    options.publish_linger = Duration::from_secs(30);
    options.publish_batch = 4;
    let publisher = NatsBus::connect(&options).await.expect("connect");
    let receiver = connect(&server, "receiver").await;
    let mut sub = receiver.subscribe("linger", None).await.expect("sub");
    receiver.flush().await.expect("flush");
    let publish = |n: u8| {
        let bus = publisher.clone();
        async move {
            bus.publish(Subject::from_static("linger"), None, Bytes::from(vec![n]))
                .await
                .expect("publish")
        }
    };

    // The first message follows no batch: it goes at once.
    publish(0).await;
    assert_eq!(next_payload(&mut sub).await.as_deref(), Some(&[0u8][..]), "a lone message waits");

    // The next one is within the linger of that batch: it waits for company.
    publish(1).await;
    let early = tokio::time::timeout(Duration::from_millis(500), sub.next()).await;
    assert!(early.is_err(), "a message right after a batch went without lingering");

    // A full batch goes without waiting out the linger, in order.
    for n in 2..5 {
        publish(n).await;
    }
    for n in 1..5u8 {
        assert_eq!(next_payload(&mut sub).await.as_deref(), Some(&[n][..]), "full batch in order");
    }

    // A flush does not linger either.
    publish(5).await;
    tokio::time::timeout(Duration::from_secs(5), publisher.flush())
        .await
        .expect("a flush waited out the linger")
        .expect("flush");
    assert_eq!(next_payload(&mut sub).await.as_deref(), Some(&[5u8][..]));
}

/// A message over the server's `max_payload` is refused to its publisher alone: the bus goes
/// on carrying everything else (one oversized request must not disable a gateway).
#[tokio::test]
async fn an_oversized_message_is_refused_alone() {
    let server = NatsServer::start();
    let bus = connect(&server, "big").await;
    let max = bus.max_payload();
    assert_eq!(max, 1024 * 1024, "nats-server's default max_payload");
    let mut sub = bus.subscribe("svc", None).await.expect("sub");
    bus.flush().await.expect("flush");
    let too_large = Bytes::from(vec![0u8; max + 1]);
    match bus.publish(Subject::from_static("svc"), None, too_large).await {
        Err(fleetgate_bus::BusError::TooLarge { size, max: limit }) => {
            assert_eq!((size, limit), (max + 1, max));
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    bus.publish(Subject::from_static("svc"), None, Bytes::from(vec![1u8; max]))
        .await
        .expect("a message at the limit still goes");
    bus.publish(Subject::from_static("svc"), None, Bytes::from_static(b"after"))
        .await
        .expect("the bus still carries messages");
    bus.flush().await.expect("flush");
    assert_eq!(next_payload(&mut sub).await.map(|p| p.len()), Some(max));
    assert_eq!(next_payload(&mut sub).await.as_deref(), Some(&b"after"[..]));
}

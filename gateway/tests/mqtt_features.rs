//! MQTT features beyond the basic request: client credentials handed to the 16/ECAP provider,
//! MQTT 5 topic aliases, Receive Maximum and Maximum Packet Size.

mod support;

use bytes::Bytes;
use fleetgate_transport_mqtt::codec::{
    Packet, ProtocolVersion, Publish, PublishProperties, QoS, ReasonCode,
};
use support::{Fleetgate, RawClient};

fn with_clients() -> Fleetgate {
    let mut env = support::demo_endpoint_env();
    env.push(("FLEETGATE_AUTH_CLIENTS", "[{username: device-1, password: s3cret}]".into()));
    env.push(("FLEETGATE_AUTH_ALLOW_ANONYMOUS", "false".into()));
    Fleetgate::start("up", &env)
}

fn publish(topic: &'static str, alias: Option<u16>, payload: &'static [u8]) -> Packet {
    let properties = PublishProperties { topic_alias: alias, ..Default::default() };
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: Bytes::from_static(topic.as_bytes()),
        packet_id: None,
        properties,
        payload: Bytes::from_static(payload),
    })
}

#[tokio::test]
async fn credentials_are_checked_by_the_auth_provider() {
    let fg = with_clients();
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let good = RawClient::connect_packet(version, Some("device-1"), Some("s3cret"));
        let (_client, connack) = RawClient::connect(fg.mqtt, good).await;
        assert_eq!(connack.reason_code, ReasonCode::Success, "{version:?}");
        for (user, password) in
            [(Some("device-1"), Some("wrong")), (Some("nobody"), Some("s3cret")), (None, None)]
        {
            let bad = RawClient::connect_packet(version, user, password);
            let (mut client, connack) = RawClient::connect(fg.mqtt, bad).await;
            assert_eq!(
                connack.reason_code,
                ReasonCode::BadUserNameOrPassword,
                "{version:?} {user:?}"
            );
            assert!(client.next().await.is_none(), "then the connection closes");
        }
    }
    assert_eq!(
        fg.metric("fleetgate_transport_connections_refused_total{transport=\"mqtt\"}"),
        Some(6.0)
    );
}

#[tokio::test]
async fn mqtt5_topic_aliases() {
    let fg = Fleetgate::start("up", &support::demo_endpoint_env());
    let connect = RawClient::connect_packet(ProtocolVersion::V5, None, None);
    let (mut client, connack) = RawClient::connect(fg.mqtt, connect).await;
    assert_eq!(connack.properties.maximum_qos, Some(QoS::AtLeastOnce));
    assert_eq!(connack.properties.retain_available, Some(false));
    let max_alias = connack.properties.topic_alias_maximum.expect("topic alias maximum");
    assert!(max_alias >= 1);
    // Set alias 1 with the first request, then use it with an empty topic.
    client.send(&publish("kp1/demo-v1/dcx/tok-1/json/5", Some(1), b"[1]")).await;
    let p = client.next_publish().await.expect("first status");
    assert_eq!(&p.topic[..], b"kp1/demo-v1/dcx/tok-1/json/5/status");
    client.send(&publish("", Some(1), b"[2]")).await;
    let p = client.next_publish().await.expect("second status");
    assert_eq!(&p.topic[..], b"kp1/demo-v1/dcx/tok-1/json/5/status");
    assert_eq!(fg.metric("fleetgate_dcx_samples_total"), Some(2.0));
    // An alias above the maximum is a protocol error: DISCONNECT 0x94.
    client.send(&publish("kp1/demo-v1/dcx/tok-1/json/6", Some(max_alias + 1), b"[3]")).await;
    match client.next().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason_code, ReasonCode::TopicAliasInvalid),
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
}

#[tokio::test]
async fn responses_wait_for_the_clients_receive_maximum() {
    let fg = Fleetgate::start("up", &support::demo_endpoint_env());
    let mut connect = RawClient::connect_packet(ProtocolVersion::V5, None, None);
    connect.properties.receive_maximum = Some(2);
    let (mut client, _) = RawClient::connect(fg.mqtt, connect).await;
    for _ in 0..5 {
        let mut p = publish("kp1/demo-v1/dcx/tok-1/json/9", None, b"[1]");
        if let Packet::Publish(p) = &mut p {
            p.qos = QoS::AtLeastOnce;
            p.packet_id = Some(1);
        }
        client.send(&p).await;
    }
    // Without acknowledging, only two QoS 1 responses may arrive.
    let mut unacked = Vec::new();
    while let Ok(Some(packet)) =
        tokio::time::timeout(std::time::Duration::from_millis(500), client.next()).await
    {
        if let Packet::Publish(p) = packet {
            unacked.push(p.packet_id.expect("QoS 1"));
        }
    }
    assert_eq!(unacked.len(), 2, "receive maximum 2");
    for id in unacked {
        client.send(&Packet::PubAck(fleetgate_transport_mqtt::codec::PubAck::new(id))).await;
    }
    for _ in 0..3 {
        client.next_publish().await.expect("the rest after the acknowledgements");
    }
}

#[tokio::test]
async fn responses_over_the_clients_maximum_packet_size_are_not_sent() {
    let fg = Fleetgate::start("up", &support::demo_endpoint_env());
    let mut connect = RawClient::connect_packet(ProtocolVersion::V5, None, None);
    connect.properties.maximum_packet_size = Some(40);
    let (mut client, _) = RawClient::connect(fg.mqtt, connect).await;
    // The 400 error body does not fit in 40 bytes; the empty status does.
    client.send(&publish("kp1/demo-v1/dcx/tok-1/json/1", None, b"[")).await;
    client.send(&publish("kp1/demo-v1/dcx/tok-1/json/2", None, b"[1]")).await;
    let p = client.next_publish().await.expect("the status");
    assert_eq!(&p.topic[..], b"kp1/demo-v1/dcx/tok-1/json/2/status");
    assert_eq!(
        fg.metric("fleetgate_transport_messages_too_large_total{transport=\"mqtt\"}"),
        Some(1.0)
    );
}

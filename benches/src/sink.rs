//! The delivery counters: where a message counts as delivered.
//!
//! - For fleetgate, a NATS subscriber on `kaa.v1.service.dcx.esp.ClientData` (a plain
//!   subscription, so it gets a copy of what the DCX queue group gets); each message is a
//!   4/ESP `ClientData` whose payload is the device's payload.
//! - For an MQTT broker, an MQTT subscriber on `kp1/#` at QoS 0 built on fleetgate's codec.
//!
//! Each runs as one task that owns a [`DeliveryRecorder`] and hands it back when stopped. Only
//! messages carrying the run's id count as delivered; other runs' are counted apart.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fleetgate_messages::{ClientData, Record};
use fleetgate_transport_mqtt::codec::{
    Codec, Connect, Packet, ProtocolVersion, QoS, Subscribe, Subscription, SubscriptionOptions,
};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::stats::{DeliveryRecorder, unix_nanos};

/// The subject fleetgate's gateway sends every device data sample to.
pub const CLIENT_DATA_SUBJECT: &str = "kaa.v1.service.dcx.esp.ClientData";

/// Why the delivery counter could not start.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// NATS unreachable or refused the subscription.
    #[error("NATS delivery counter: {0}")]
    Nats(String),
    /// The MQTT broker unreachable or refused the subscription.
    #[error("MQTT delivery counter: {0}")]
    Mqtt(String),
    /// The counter's thread or runtime could not start.
    #[error("delivery counter: {0}")]
    Thread(String),
}

/// Where delivery is counted.
#[derive(Debug, Clone)]
pub enum SinkTarget {
    /// fleetgate's `ClientData` on this NATS URL.
    Nats(String),
    /// An MQTT broker, subscribing to this filter.
    Mqtt(SocketAddr, String),
}

/// A delivery counter running on its own OS thread (with its own single-threaded runtime), so
/// that bursts of sending never delay receiving and its timestamps: the kernel shares the CPU
/// between the two.
#[derive(Debug)]
pub struct SinkThread {
    live: std::sync::Arc<crate::stats::LiveDelivery>,
    done: tokio::sync::oneshot::Receiver<DeliveryRecorder>,
}

impl SinkThread {
    /// Starts the counter and returns once it is subscribed.
    pub async fn start(
        target: SinkTarget,
        steps: usize,
        run_id: String,
        stop: watch::Receiver<bool>,
    ) -> Result<SinkThread, SinkError> {
        type Ready = Result<std::sync::Arc<crate::stats::LiveDelivery>, SinkError>;
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Ready>();
        let (done_tx, done) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("loadgen-sink".into())
            .spawn(move || {
                let runtime =
                    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = ready_tx.send(Err(SinkError::Thread(e.to_string())));
                            return;
                        }
                    };
                runtime.block_on(async move {
                    let sink = match target {
                        SinkTarget::Nats(url) => Sink::nats(&url).await,
                        SinkTarget::Mqtt(addr, filter) => Sink::mqtt(addr, &filter).await,
                    };
                    match sink {
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                        Ok(sink) => {
                            let recorder = DeliveryRecorder::new(steps, &run_id);
                            let _ = ready_tx.send(Ok(recorder.live()));
                            let _ = done_tx.send(sink.run(recorder, stop).await);
                        }
                    }
                });
            })
            .map_err(|e| SinkError::Thread(e.to_string()))?;
        let live = ready_rx.await.map_err(|_| SinkError::Thread("the thread died".into()))??;
        Ok(SinkThread { live, done })
    }

    /// The live view of delivery.
    pub fn live(&self) -> std::sync::Arc<crate::stats::LiveDelivery> {
        self.live.clone()
    }

    /// Waits for the counter to stop (after `stop` turned true) and returns what it recorded.
    pub async fn finish(self) -> Option<DeliveryRecorder> {
        self.done.await.ok()
    }
}

/// A subscribed delivery counter, not yet running.
pub enum Sink {
    /// NATS.
    Nats {
        /// The connection (kept so that it lives as long as the subscription).
        client: async_nats::Client,
        /// The ClientData subscription.
        subscriber: async_nats::Subscriber,
    },
    /// MQTT.
    Mqtt(MqttSubscriber),
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Sink::Nats { .. } => "Sink::Nats",
            Sink::Mqtt(_) => "Sink::Mqtt",
        })
    }
}

impl Sink {
    /// Subscribes on NATS and makes sure the server has the subscription before returning.
    pub async fn nats(url: &str) -> Result<Sink, SinkError> {
        let err = |e: &dyn std::fmt::Display| SinkError::Nats(format!("{url}: {e}"));
        let client = async_nats::ConnectOptions::new()
            .name("fleetgate-loadgen")
            // Deep enough for a few seconds at a million messages per second: the subscriber
            // must never be the one that drops.
            .subscription_capacity(1 << 22)
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(|e| err(&e))?;
        let subscriber = client.subscribe(CLIENT_DATA_SUBJECT).await.map_err(|e| err(&e))?;
        // A round trip: the server has processed SUB once it answers a request on our inbox.
        let inbox = client.new_inbox();
        let mut probe = client.subscribe(inbox.clone()).await.map_err(|e| err(&e))?;
        client.publish(inbox, Bytes::new()).await.map_err(|e| err(&e))?;
        tokio::time::timeout(Duration::from_secs(5), probe.next())
            .await
            .map_err(|_| err(&"no round trip within 5 s"))?;
        Ok(Sink::Nats { client, subscriber })
    }

    /// Connects to an MQTT broker and subscribes to `filter` at QoS 0.
    pub async fn mqtt(addr: SocketAddr, filter: &str) -> Result<Sink, SinkError> {
        Ok(Sink::Mqtt(MqttSubscriber::connect(addr, filter).await?))
    }

    /// Counts deliveries into `recorder` until `stop` turns true, then returns it.
    pub async fn run(
        self,
        mut recorder: DeliveryRecorder,
        mut stop: watch::Receiver<bool>,
    ) -> DeliveryRecorder {
        let mut window = tokio::time::interval(Duration::from_secs(1));
        window.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        match self {
            Sink::Nats { client, mut subscriber } => {
                loop {
                    tokio::select! {
                        biased;
                        _ = stop.changed() => break,
                        _ = window.tick() => recorder.roll_window(),
                        m = subscriber.next() => match m {
                            Some(m) => record_client_data(&mut recorder, &m.payload),
                            None => break,
                        },
                    }
                }
                drop(client);
            }
            Sink::Mqtt(mut sub) => {
                let mut ping = tokio::time::interval(Duration::from_secs(20));
                loop {
                    tokio::select! {
                        biased;
                        _ = stop.changed() => break,
                        _ = window.tick() => recorder.roll_window(),
                        _ = ping.tick() => {
                            if sub.send(&Packet::PingReq).await.is_err() {
                                break;
                            }
                        }
                        r = sub.stream.read_buf(&mut sub.read) => match r {
                            Ok(n) if n > 0 => {
                                if sub.drain_into(&mut recorder).is_err() {
                                    break;
                                }
                                if sub.read.capacity() - sub.read.len() < 16 * 1024 {
                                    sub.read.reserve(256 * 1024);
                                }
                            }
                            _ => break,
                        },
                    }
                }
            }
        }
        recorder
    }
}

fn record_client_data(recorder: &mut DeliveryRecorder, avro: &[u8]) {
    match ClientData::decode(avro) {
        Ok(cd) => recorder.record(cd.payload, unix_nanos()),
        Err(_) => recorder.foreign += 1,
    }
}

/// An MQTT subscriber on fleetgate's codec: CONNECT, SUBSCRIBE, then read PUBLISH packets.
pub struct MqttSubscriber {
    stream: TcpStream,
    codec: Codec,
    read: BytesMut,
}

impl MqttSubscriber {
    /// Connects (MQTT 3.1.1, clean session) and subscribes to `filter` at QoS 0.
    pub async fn connect(addr: SocketAddr, filter: &str) -> Result<Self, SinkError> {
        let err = |e: &dyn std::fmt::Display| SinkError::Mqtt(format!("{addr}: {e}"));
        let stream = TcpStream::connect(addr).await.map_err(|e| err(&e))?;
        stream.set_nodelay(true).map_err(|e| err(&e))?;
        let mut codec = Codec::new(16 << 20);
        codec.set_version(ProtocolVersion::V311);
        let mut sub = MqttSubscriber { stream, codec, read: BytesMut::with_capacity(256 * 1024) };
        let client_id = format!("fleetgate-loadgen-sink-{}", std::process::id());
        sub.send(&Packet::Connect(Box::new(Connect {
            protocol_version: ProtocolVersion::V311,
            clean_start: true,
            keep_alive_secs: 60,
            client_id: Bytes::from(client_id),
            will: None,
            username: None,
            password: None,
            properties: Default::default(),
        })))
        .await
        .map_err(|e| err(&e))?;
        match sub.next().await.map_err(|e| err(&e))? {
            Packet::ConnAck(c) if !c.reason_code.is_error() => {}
            other => return Err(err(&format!("expected a successful CONNACK, got {other:?}"))),
        }
        sub.send(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            subscriptions: vec![Subscription {
                filter: Bytes::copy_from_slice(filter.as_bytes()),
                options: SubscriptionOptions::new(QoS::AtMostOnce),
            }],
            properties: Default::default(),
        }))
        .await
        .map_err(|e| err(&e))?;
        match sub.next().await.map_err(|e| err(&e))? {
            Packet::SubAck(s) if s.reason_codes.iter().all(|r| !r.is_error()) => Ok(sub),
            other => Err(err(&format!("SUBSCRIBE {filter} refused: {other:?}"))),
        }
    }

    async fn send(&mut self, packet: &Packet) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        self.codec
            .encode(packet, &mut out)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        self.stream.write_all(&out).await
    }

    async fn next(&mut self) -> std::io::Result<Packet> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(p) = self
                .codec
                .decode(&mut self.read)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?
            {
                return Ok(p);
            }
            let n = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.read))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Records every complete PUBLISH in the read buffer.
    fn drain_into(&mut self, recorder: &mut DeliveryRecorder) -> Result<(), ()> {
        let now = unix_nanos();
        loop {
            match self.codec.decode(&mut self.read) {
                Ok(Some(Packet::Publish(p))) => recorder.record(&p.payload, now),
                Ok(Some(_)) => {}
                Ok(None) => return Ok(()),
                Err(_) => return Err(()),
            }
        }
    }
}

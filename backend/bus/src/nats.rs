//! The NATS bus (3/ISM) through `async-nats`.

use std::time::Duration;

use bytes::Bytes;

use crate::{Bus, BusError, Subject, Subscription, SubscriptionInner};

/// Connection settings for [`NatsBus::connect`].
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// `nats://host:port`; several separated by commas.
    pub url: String,
    /// Connection name shown by the NATS server (the service replica id).
    pub name: String,
    /// How many outgoing messages the client buffers before `publish` waits.
    pub publish_capacity: usize,
    /// How many incoming messages each subscription buffers before the server's
    /// slow-consumer handling applies.
    pub subscription_capacity: usize,
    /// How long the first connection attempt may take.
    pub connect_timeout: Duration,
}

impl NatsOptions {
    /// Defaults for `url`, named `name`.
    pub fn new(url: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            name: name.into(),
            publish_capacity: 8192,
            subscription_capacity: 65536,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// A bus on a NATS server. Cloning is cheap and shares the connection.
#[derive(Clone)]
pub struct NatsBus {
    client: async_nats::Client,
}

impl NatsBus {
    /// Connects; fails if the server cannot be reached within the connect timeout. Later
    /// disconnections are retried forever in the background.
    pub async fn connect(options: &NatsOptions) -> Result<Self, BusError> {
        let client = async_nats::ConnectOptions::new()
            .name(&options.name)
            .client_capacity(options.publish_capacity)
            .subscription_capacity(options.subscription_capacity)
            .connection_timeout(options.connect_timeout)
            .max_reconnects(None)
            .connect(options.url.as_str())
            .await
            .map_err(|e| BusError::Nats(format!("cannot connect to {}: {e}", options.url)))?;
        Ok(Self { client })
    }

    /// Whether the connection is up.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

impl Bus for NatsBus {
    async fn publish(
        &self,
        subject: Subject,
        reply: Option<Subject>,
        payload: Bytes,
    ) -> Result<(), BusError> {
        let result = match reply {
            Some(reply) => self.client.publish_with_reply(subject, reply, payload).await,
            None => self.client.publish(subject, payload).await,
        };
        result.map_err(|e| BusError::Nats(e.to_string()))
    }

    async fn subscribe(
        &self,
        subject: &str,
        queue_group: Option<&str>,
    ) -> Result<Subscription, BusError> {
        if !crate::is_valid_subject(subject, true) {
            return Err(BusError::InvalidSubject(subject.to_owned()));
        }
        let subject = subject.to_owned();
        let sub = match queue_group {
            Some(q) => self.client.queue_subscribe(subject, q.to_owned()).await,
            None => self.client.subscribe(subject).await,
        }
        .map_err(|e| BusError::Nats(e.to_string()))?;
        Ok(Subscription { inner: SubscriptionInner::Nats(sub) })
    }

    /// Waits for a round trip through the server, so that every subscription and message
    /// sent before has been processed by it (a socket flush alone does not guarantee that).
    async fn flush(&self) -> Result<(), BusError> {
        use futures_util::StreamExt;
        let nats = |e: &dyn std::fmt::Display| BusError::Nats(e.to_string());
        let inbox = self.client.new_inbox();
        let mut probe = self.client.subscribe(inbox.clone()).await.map_err(|e| nats(&e))?;
        self.client.publish(inbox.clone(), Bytes::new()).await.map_err(|e| nats(&e))?;
        self.client.flush().await.map_err(|e| nats(&e))?;
        match tokio::time::timeout(Duration::from_secs(10), probe.next()).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(BusError::Closed),
            Err(_) => Err(BusError::Timeout(inbox)),
        }
    }
}

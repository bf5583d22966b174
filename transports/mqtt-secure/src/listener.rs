//! The accept loop both transports share: accept (under the connection limits of
//! `transports.mqtt`), hand each connection to its own task, stop taking connections at the
//! drain signal, wait for the open ones to end.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fleetgate_tls::TlsServer;
use fleetgate_transport_core::{KpHandler, Shutdown, stopped};
use fleetgate_transport_mqtt::server::MqttStreams;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// What a connection task gets besides its socket.
pub(crate) struct Conn {
    pub(crate) peer: SocketAddr,
    pub(crate) handler: Arc<dyn KpHandler>,
    pub(crate) stop: watch::Receiver<bool>,
    /// Held until the connection ends.
    pub(crate) live: mpsc::Sender<()>,
}

/// Serves `listener` until the drain signal, then waits for every connection to end. With
/// `tls`, its files are watched for changes meanwhile.
pub(crate) async fn serve<F, Fut>(
    listener: TcpListener,
    streams: MqttStreams,
    tls: Option<TlsServer>,
    handler: Arc<dyn KpHandler>,
    shutdown: Shutdown,
    connection: F,
) where
    F: Fn(TcpStream, Conn) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    if let Some(tls) = tls {
        tokio::spawn(tls.watch_files(shutdown.stop.clone()));
    }
    let (live, mut all_ended) = mpsc::channel::<()>(1);
    let mut drain = shutdown.drain.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    // Refused by a connection limit: closed at once, before the handshake.
                    let Some(admitted) = streams.admit(peer) else {
                        fleetgate_transport_core::net::refuse_tcp(tcp);
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    let conn = Conn { peer, handler: handler.clone(), stop: shutdown.stop.clone(), live: live.clone() };
                    let run = connection(tcp, conn);
                    tokio::spawn(async move {
                        run.await;
                        drop(admitted);
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stopped(&mut drain) => break,
        }
    }
    streams.drain();
    drop(listener);
    drop(live);
    let _ = all_ended.recv().await;
}

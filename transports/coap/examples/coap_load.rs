//! A small open-loop CoAP load tool: confirmable PUT (or POST) requests at stepped offered
//! rates, spread over many client sockets, no retransmissions. For each step it prints the
//! answered rate, loss, and latency percentiles, so that two servers can be compared in the same
//! run (e.g. this transport's `scripted_server` example against libcoap's `coap-server-notls -e
//! -d 100`, which echoes PUTs).
//!
//! `coap_load <addr> [--path kp1/demo-v1/echo/tok-1/json] [--method put|post]
//!  [--rates 2000,5000,10000] [--secs 3] [--sockets 64] [--payload '[{"t":1}]']`
//!
//! Sends only to the address given (use loopback); every run is bounded by its steps.

#![allow(missing_docs, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fleetgate_transport_coap::codec::{Code, Message, MessageType, MessageWriter, option};
use tokio::net::UdpSocket;
use tokio::time::Instant;

struct Args {
    addr: SocketAddr,
    path: String,
    method: Code,
    rates: Vec<u64>,
    secs: u64,
    sockets: usize,
    payload: Vec<u8>,
}

fn args() -> Args {
    let mut it = std::env::args().skip(1);
    let addr = it.next().expect("usage: coap_load <addr> [options]").parse().expect("address");
    let mut a = Args {
        addr,
        path: "kp1/demo-v1/echo/tok-1/json".into(),
        method: Code::PUT,
        rates: vec![2_000, 5_000, 10_000, 20_000],
        secs: 3,
        sockets: 64,
        payload: br#"[{"t":1}]"#.to_vec(),
    };
    while let Some(flag) = it.next() {
        let value = it.next().expect("option value");
        match flag.as_str() {
            "--path" => a.path = value,
            "--method" => a.method = if value == "post" { Code::POST } else { Code::PUT },
            "--rates" => a.rates = value.split(',').map(|r| r.parse().expect("rate")).collect(),
            "--secs" => a.secs = value.parse().expect("secs"),
            "--sockets" => a.sockets = value.parse().expect("sockets"),
            "--payload" => a.payload = value.into_bytes(),
            other => panic!("unknown option {other}"),
        }
    }
    a
}

/// One client socket: when each of its message ids was sent, and what came back.
struct Client {
    socket: UdpSocket,
    sent: Mutex<Vec<Option<Instant>>>,
}

#[derive(Default)]
struct Step {
    latencies_us: Mutex<Vec<u32>>,
    errors: AtomicU64,
}

fn request(args: &Args, mid: u16) -> Bytes {
    let mut out = BytesMut::new();
    let token = mid.to_be_bytes();
    let mut w =
        MessageWriter::new(&mut out, MessageType::Confirmable, args.method, mid, &token).unwrap();
    for segment in args.path.split('/').filter(|s| !s.is_empty()) {
        w.option(option::URI_PATH, segment.as_bytes()).unwrap();
    }
    w.payload(&args.payload);
    out.freeze()
}

async fn receive(client: Arc<Client>, step: Arc<Mutex<Arc<Step>>>) {
    let mut buf = vec![0u8; 2048];
    loop {
        let Ok(n) = client.socket.recv(&mut buf).await else { continue };
        let Ok(m) = Message::decode(Bytes::copy_from_slice(&buf[..n])) else { continue };
        if m.mtype() != MessageType::Acknowledgement {
            continue;
        }
        let sent = client.sent.lock().unwrap()[usize::from(m.message_id())].take();
        let Some(sent) = sent else { continue };
        let step = step.lock().unwrap().clone();
        if m.code().class() != 2 {
            step.errors.fetch_add(1, Ordering::Relaxed);
        }
        let us = u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX);
        step.latencies_us.lock().unwrap().push(us);
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = args();
    let mut clients = Vec::new();
    let current = Arc::new(Mutex::new(Arc::new(Step::default())));
    for _ in 0..args.sockets {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.connect(args.addr).await.unwrap();
        let client = Arc::new(Client { socket, sent: Mutex::new(vec![None; 65_536]) });
        tokio::spawn(receive(client.clone(), current.clone()));
        clients.push(client);
    }
    let mut mids = vec![0u16; clients.len()];
    println!("offered/s  sent  answered/s  loss%  errors  p50_ms  p99_ms  max_ms");
    for &rate in &args.rates {
        let step = Arc::new(Step::default());
        *current.lock().unwrap() = step.clone();
        let total = rate * args.secs;
        let start = Instant::now();
        let mut sent = 0u64;
        let mut next_client = 0usize;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        while sent < total {
            tick.tick().await;
            let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            while sent < due.min(total) {
                let i = next_client;
                next_client = (next_client + 1) % clients.len();
                mids[i] = mids[i].wrapping_add(1);
                let mid = mids[i];
                let bytes = request(&args, mid);
                clients[i].sent.lock().unwrap()[usize::from(mid)] = Some(Instant::now());
                let _ = clients[i].socket.try_send(&bytes);
                sent += 1;
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_millis(500)).await;
        for c in &clients {
            c.sent.lock().unwrap().iter_mut().for_each(|s| *s = None);
        }
        let mut lat = step.latencies_us.lock().unwrap().clone();
        lat.sort_unstable();
        let answered = lat.len() as u64;
        let loss = 100.0 * (sent.saturating_sub(answered)) as f64 / sent.max(1) as f64;
        println!(
            "{rate:>9}  {sent:>6}  {:>10.0}  {loss:>5.2}  {:>6}  {:>6.2}  {:>6.2}  {:>6.2}",
            answered as f64 / elapsed,
            step.errors.load(Ordering::Relaxed),
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            percentile(&lat, 1.0),
        );
    }
}

//! CoAP-specific behaviour of the transport against the compliance kit's scripted gateway:
//! deduplication, separate responses and their retransmission, resets, every error code,
//! Observe, Block1, limits and sessions.

// Test code: a failed expectation fails the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{CoapClient, Req, serve};
use fleetgate_transport_coap::codec::{BlockOption, Code, MessageType, option};
use fleetgate_transport_coap::{CoapConfig, response_code};
use fleetgate_transport_core::BoxFuture;
use fleetgate_transport_core::compliance::ScriptedGateway;

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(300);

fn path(extension: &str, rest: &str) -> String {
    format!("kp1/demo-v1/{extension}/tok-1{rest}")
}

async fn setup(
    config: CoapConfig,
) -> (Arc<ScriptedGateway>, CoapClient, common::Served, fleetgate_transport_core::ShutdownHandle) {
    let gateway = Arc::new(ScriptedGateway::default());
    let (addr, metrics, stop) = serve(gateway.clone(), config).await;
    let client = CoapClient::new(addr).await;
    (gateway, client, metrics, stop)
}

#[tokio::test]
async fn a_retransmitted_con_reaches_the_backend_once() {
    let (gateway, mut client, metrics, _stop) = setup(CoapConfig::default()).await;
    let p = path("echo", "/json/42");
    let (mid, token, bytes) = client.build(Req::post(&p, b"[1]"));
    client.send(&bytes).await;
    let first = client.response_to(MessageType::Confirmable, mid, token, WAIT).await.expect("ack");
    assert_eq!((first.mtype(), first.code()), (MessageType::Acknowledgement, Code::CHANGED));
    assert_eq!(&first.payload()[..], b"[1]");
    // The same datagram again, as a client whose ACK was lost retransmits it.
    client.send(&bytes).await;
    let again = client.response_to(MessageType::Confirmable, mid, token, WAIT).await.expect("ack");
    assert_eq!(again.datagram(), first.datagram(), "answered from the cache");
    assert_eq!(gateway.requests(), 1, "the backend saw it once");
    assert_eq!(metrics.duplicates.get(), 1);
}

/// A gateway that holds every request until the test releases it, to see the transport while
/// an answer is pending.
#[derive(Default)]
struct HeldGateway {
    outbox: std::sync::Mutex<Option<fleetgate_transport_core::Outbox>>,
    held: std::sync::Mutex<Vec<fleetgate_transport_core::KpRequest>>,
}

impl HeldGateway {
    fn held(&self) -> usize {
        self.held.lock().expect("lock").len()
    }

    fn release(&self) {
        let outbox = self.outbox.lock().expect("lock").clone().expect("a session");
        for request in self.held.lock().expect("lock").drain(..) {
            let response = fleetgate_transport_core::KpResponse {
                base: request.topic.base(),
                request_id: request.topic.request_id(),
                tag: request.tag,
                outcome: fleetgate_transport_core::KpOutcome::Success(request.payload),
            };
            outbox.try_send(response).expect("room");
        }
    }
}

impl fleetgate_transport_core::KpHandler for HeldGateway {
    fn open_session<'a>(
        &'a self,
        _: fleetgate_transport_core::ClientCredentials<'a>,
        outbox: fleetgate_transport_core::Outbox,
    ) -> BoxFuture<
        'a,
        Result<fleetgate_transport_core::ClientIdentity, fleetgate_transport_core::KpError>,
    > {
        *self.outbox.lock().expect("lock") = Some(outbox);
        let session = fleetgate_transport_core::SessionId(1);
        Box::pin(std::future::ready(Ok(fleetgate_transport_core::ClientIdentity {
            session,
            client_id: None,
        })))
    }

    fn handle(
        &self,
        _: fleetgate_transport_core::SessionId,
        request: fleetgate_transport_core::KpRequest,
    ) -> BoxFuture<'_, Result<(), fleetgate_transport_core::KpError>> {
        self.held.lock().expect("lock").push(request);
        Box::pin(std::future::ready(Ok(())))
    }

    fn subscribe<'a>(
        &'a self,
        _: fleetgate_transport_core::SessionId,
        _: &'a str,
        _: u64,
    ) -> BoxFuture<'a, Result<(), fleetgate_transport_core::KpError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn unsubscribe(&self, _: fleetgate_transport_core::SessionId, _: &str) -> bool {
        false
    }

    fn close_session(&self, _: fleetgate_transport_core::SessionId) {}
}

#[tokio::test]
async fn a_retransmission_while_pending_gets_an_empty_ack_and_one_answer() {
    let gateway = Arc::new(HeldGateway::default());
    let config =
        CoapConfig { listen: "127.0.0.1:0".parse().expect("addr"), ..CoapConfig::default() };
    let transport = fleetgate_transport_coap::CoapTransport::new(config, &Default::default());
    let (addr, _stop) =
        fleetgate_transport_core::compliance::start(Box::new(transport), gateway.clone());
    let mut client = CoapClient::new(addr).await;

    let p = path("echo", "/json");
    let (mid, token, bytes) = client.build(Req::post(&p, b"[2]"));
    client.send(&bytes).await;
    assert!(client.recv(Duration::from_millis(100)).await.is_none(), "nothing before the answer");
    // The client retransmits while the answer is pending: it is acknowledged, not forwarded.
    client.send(&bytes).await;
    let ack = client.recv(WAIT).await.expect("ack");
    assert_eq!((ack.mtype(), ack.message_id()), (MessageType::Acknowledgement, mid));
    assert!(ack.code().is_empty(), "the duplicate of a pending request is acknowledged empty");
    assert_eq!(gateway.held(), 1, "the backend saw it once");
    gateway.release();
    let response = client.recv(WAIT).await.expect("separate response");
    assert_eq!((response.mtype(), response.code()), (MessageType::Confirmable, Code::CHANGED));
    assert_eq!(response.token(), token);
    client.send_empty(MessageType::Acknowledgement, response.message_id()).await;
    // A later duplicate gets the empty ACK again, and nothing more.
    client.send(&bytes).await;
    let again = client.recv(WAIT).await.expect("ack again");
    assert!(again.code().is_empty());
    assert!(client.recv(QUIET).await.is_none());
}

#[tokio::test]
async fn every_error_code_is_reachable() {
    let (_gateway, mut client, _metrics, _stop) = setup(CoapConfig::default()).await;
    let cases = [
        (400, Code::BAD_REQUEST),
        (401, Code::UNAUTHORIZED),
        (403, Code::FORBIDDEN),
        (404, Code::NOT_FOUND),
        (413, Code::REQUEST_ENTITY_TOO_LARGE),
        (429, Code::TOO_MANY_REQUESTS),
        (503, Code::SERVICE_UNAVAILABLE),
        (504, Code::GATEWAY_TIMEOUT),
        (500, Code::INTERNAL_SERVER_ERROR),
        (502, Code::INTERNAL_SERVER_ERROR),
        (418, Code::BAD_REQUEST),
    ];
    for (extension, reason) in [("fail", "failed as asked"), ("reject", "rejected as asked")] {
        for (status, code) in cases {
            let p = path(extension, "/json/9");
            let body = status.to_string();
            let m = client.exchange(Req::post(&p, body.as_bytes()), WAIT).await.expect("answer");
            assert_eq!(m.code(), code, "{extension} {status}");
            assert_eq!(&m.payload()[..], reason.as_bytes(), "reason phrase as diagnostic payload");
            assert_eq!(response_code(status, Code::CHANGED), code);
        }
    }
    let m = client.exchange(Req::post(&path("nothing", "/json"), b""), WAIT).await.expect("answer");
    assert_eq!(m.code(), Code::NOT_FOUND);
    let m = client.exchange(Req::post("kp2/x/y/z", b""), WAIT).await.expect("answer");
    assert_eq!(m.code(), Code::NOT_FOUND);
    let m = client.exchange(Req::post("", b""), WAIT).await.expect("answer");
    assert_eq!(m.code(), Code::NOT_FOUND);
    // A success to GET is 2.05 Content.
    let get = Req { code: Code::GET, ..Req::post(&path("echo", "/config/json"), b"") };
    let m = client.exchange(get, WAIT).await.expect("answer");
    assert_eq!(m.code(), Code::CONTENT);
}

#[tokio::test]
async fn a_late_answer_comes_separately_and_is_retransmitted_until_acknowledged() {
    let config = CoapConfig { ack_timeout_ms: 50, ..CoapConfig::default() };
    let (_gateway, mut client, metrics, _stop) = setup(config).await;
    let p = path("slow", "/json/5");
    let (mid, token, bytes) = client.build(Req::post(&p, b"[5]"));
    client.send(&bytes).await;
    let ack = client
        .recv_matching(WAIT, |m| m.mtype() == MessageType::Acknowledgement && m.message_id() == mid)
        .await
        .expect("empty ack");
    assert!(ack.code().is_empty());
    let is_response =
        |m: &fleetgate_transport_coap::codec::Message| m.token() == token && m.code().is_response();
    let separate = client.recv_matching(WAIT, is_response).await.expect("separate response");
    assert_eq!((separate.mtype(), separate.code()), (MessageType::Confirmable, Code::CHANGED));
    assert_eq!(&separate.payload()[..], b"[5]");
    // Not acknowledged: it comes again, same message id, after 50 to 75 ms.
    let again = client
        .recv_matching(Duration::from_millis(500), is_response)
        .await
        .expect("retransmission");
    assert_eq!(again.datagram(), separate.datagram());
    client.send_empty(MessageType::Acknowledgement, again.message_id()).await;
    assert!(client.recv_matching(QUIET, is_response).await.is_none(), "acknowledged: no more");
    assert!(metrics.retransmissions.get() >= 1);
    assert_eq!(metrics.separate_responses.get(), 1);
}

#[tokio::test]
async fn unacknowledged_responses_are_given_up_after_four_retransmissions() {
    let config = CoapConfig { ack_timeout_ms: 10, ..CoapConfig::default() };
    let (_gateway, mut client, metrics, _stop) = setup(config).await;
    let p = path("slow", "/json/5");
    let (_, token, bytes) = client.build(Req::post(&p, b"[5]"));
    client.send(&bytes).await;
    let mut copies = 0;
    // 10-15 ms, doubled: all five copies within 10+20+40+80+160 (x1.5) ms.
    while client
        .recv_matching(Duration::from_millis(700), |m| m.token() == token && m.code().is_response())
        .await
        .is_some()
    {
        copies += 1;
    }
    assert_eq!(copies, 5, "the response and 4 retransmissions");
    assert_eq!(metrics.retransmit_timeouts.get(), 1);
}

#[tokio::test]
async fn a_reset_cancels_a_separate_response() {
    let config = CoapConfig { ack_timeout_ms: 50, ..CoapConfig::default() };
    let (_gateway, mut client, metrics, _stop) = setup(config).await;
    let p = path("slow", "/json/6");
    let (_, token, bytes) = client.build(Req::post(&p, b"[6]"));
    client.send(&bytes).await;
    let is_response =
        |m: &fleetgate_transport_coap::codec::Message| m.token() == token && m.code().is_response();
    let separate = client.recv_matching(WAIT, is_response).await.expect("separate response");
    client.send_empty(MessageType::Reset, separate.message_id()).await;
    assert!(
        client.recv_matching(QUIET, is_response).await.is_none(),
        "no retransmission after RST"
    );
    assert_eq!(metrics.resets_received.get(), 1);
}

#[tokio::test]
async fn non_confirmable_requests_get_non_confirmable_responses() {
    let (_gateway, mut client, _metrics, _stop) = setup(CoapConfig::default()).await;
    let req =
        Req { mtype: MessageType::NonConfirmable, ..Req::post(&path("echo", "/json"), b"[7]") };
    let m = client.exchange(req, WAIT).await.expect("answer");
    assert_eq!((m.mtype(), m.code()), (MessageType::NonConfirmable, Code::CHANGED));
    assert_eq!(&m.payload()[..], b"[7]");
}

fn observe_req(p: &str, value: u32) -> Req {
    Req { code: Code::GET, ..Req::post(p, b"") }.uint(option::OBSERVE, value)
}

#[tokio::test]
async fn observe_registration_notification_reregistration_and_deregistration() {
    let (gateway, mut client, metrics, _stop) = setup(CoapConfig::default()).await;
    let p = path("echo", "/config/json");
    let token = client.new_token();
    let first = client
        .exchange(Req { token: Some(token), ..observe_req(&p, 0) }, WAIT)
        .await
        .expect("registered");
    assert_eq!(first.code(), Code::CONTENT);
    let seq1 = first.known().observe.expect("Observe in the first response");
    assert_eq!(first.known().max_age, Some(60));
    assert_eq!(metrics.observations_open.get(), 1);

    assert_eq!(gateway.push("tok-1", "/config/json", b"{\"v\":1}"), 1);
    let is_note = |m: &fleetgate_transport_coap::codec::Message| {
        m.token() == token && m.mtype() != MessageType::Acknowledgement
    };
    let note = client.recv_matching(WAIT, is_note).await.expect("notification");
    assert_eq!((note.mtype(), note.code()), (MessageType::Confirmable, Code::CONTENT));
    assert_eq!(&note.payload()[..], b"{\"v\":1}");
    let seq2 = note.known().observe.expect("sequence number");
    assert!(seq2 > seq1, "sequence numbers increase");
    client.send_empty(MessageType::Acknowledgement, note.message_id()).await;

    // A push for another resource of the endpoint is not a notification.
    gateway.push("tok-1", "/other", b"x");
    assert!(client.recv_matching(QUIET, is_note).await.is_none());

    // Re-registration with the same token replaces the registration.
    let again = client
        .exchange(Req { token: Some(token), ..observe_req(&p, 0) }, WAIT)
        .await
        .expect("re-registered");
    assert!(again.known().observe.expect("observe") > seq2);
    assert_eq!(metrics.observations_open.get(), 1);
    gateway.push("tok-1", "/config/json", b"{\"v\":2}");
    let note = client.recv_matching(WAIT, is_note).await.expect("one notification");
    client.send_empty(MessageType::Acknowledgement, note.message_id()).await;
    assert!(client.recv_matching(QUIET, is_note).await.is_none(), "only one registration");

    // Deregistration: GET with Observe=1 is answered without Observe and ends notifications.
    let last = client
        .exchange(Req { token: Some(token), ..observe_req(&p, 1) }, WAIT)
        .await
        .expect("answered");
    assert_eq!(last.code(), Code::CONTENT);
    assert_eq!(last.known().observe, None);
    assert_eq!(metrics.observations_open.get(), 0);
    gateway.push("tok-1", "/config/json", b"{\"v\":3}");
    assert!(client.recv_matching(QUIET, is_note).await.is_none(), "deregistered");
    assert!(metrics.pushes_unobserved.get() >= 1);
}

#[tokio::test]
async fn a_reset_to_a_notification_deregisters() {
    let (gateway, mut client, metrics, _stop) = setup(CoapConfig::default()).await;
    let p = path("echo", "/config/json");
    let token = client.new_token();
    // A non-confirmable registration gets non-confirmable notifications.
    let req = Req { token: Some(token), mtype: MessageType::NonConfirmable, ..observe_req(&p, 0) };
    client.exchange(req, WAIT).await.expect("registered");
    gateway.push("tok-1", "/config/json", b"{}");
    let is_note = |m: &fleetgate_transport_coap::codec::Message| m.token() == token;
    let note = client.recv_matching(WAIT, is_note).await.expect("notification");
    assert_eq!(note.mtype(), MessageType::NonConfirmable);
    client.send_empty(MessageType::Reset, note.message_id()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(metrics.observations_open.get(), 0);
    gateway.push("tok-1", "/config/json", b"{}");
    assert!(client.recv_matching(QUIET, is_note).await.is_none());
}

#[tokio::test]
async fn an_error_registration_is_not_an_observation() {
    let (_gateway, mut client, metrics, _stop) = setup(CoapConfig::default()).await;
    let p = path("fail", "/config/json");
    let req = Req { payload: b"404".to_vec(), ..observe_req(&p, 0) };
    let m = client.exchange(req, WAIT).await.expect("answer");
    assert_eq!(m.code(), Code::NOT_FOUND);
    assert_eq!(m.known().observe, None);
    assert_eq!(metrics.observations_open.get(), 0);
}

async fn send_blocks(
    client: &mut CoapClient,
    p: &str,
    payload: &[u8],
    szx: u8,
    size1: Option<u32>,
) -> Vec<fleetgate_transport_coap::codec::Message> {
    let size = 16usize << szx;
    let token = client.new_token();
    let mut answers = Vec::new();
    let mut offset = 0;
    let mut szx = szx;
    let mut size = size;
    while offset < payload.len() {
        let end = (offset + size).min(payload.len());
        let block = BlockOption { num: (offset / size) as u32, more: end < payload.len(), szx };
        let mut req = Req { token: Some(token), ..Req::post(p, &payload[offset..end]) }
            .uint(option::BLOCK1, block.value());
        if offset == 0
            && let Some(s) = size1
        {
            req = req.uint(option::SIZE1, s);
        }
        let m = client.exchange(req, WAIT).await.expect("answer");
        let code = m.code();
        let asked = m.known().block1;
        answers.push(m);
        if code != Code::CONTINUE {
            break;
        }
        offset = end;
        if let Some(asked) = asked
            && asked.szx < szx
        {
            szx = asked.szx;
            size = 16 << szx;
        }
    }
    answers
}

#[tokio::test]
async fn block1_reassembles_a_3_kib_payload() {
    let (gateway, mut client, metrics, _stop) = setup(CoapConfig::default()).await;
    let payload: Vec<u8> = (0..3072u32).map(|i| b'a' + (i % 26) as u8).collect();
    let answers = send_blocks(&mut client, &path("echo", "/json/8"), &payload, 6, None).await;
    assert_eq!(answers.len(), 3);
    for (num, m) in answers[..2].iter().enumerate() {
        assert_eq!(m.code(), Code::CONTINUE);
        assert_eq!(m.known().block1, Some(BlockOption { num: num as u32, more: true, szx: 6 }));
    }
    let last = &answers[2];
    assert_eq!(last.code(), Code::CHANGED);
    assert_eq!(last.known().block1, Some(BlockOption { num: 2, more: false, szx: 6 }));
    // The echo is as large: it comes back block-wise (RFC 7959 §3.3).
    assert_eq!(last.known().block2, Some(BlockOption { num: 0, more: true, szx: 6 }));
    assert_eq!(last.known().size2, Some(3072));
    let body = rest_of_body(&mut client, &path("echo", "/json/8"), Code::POST, last).await;
    assert_eq!(body, payload, "the extension saw the whole payload");
    assert_eq!(gateway.requests(), 1, "later blocks are served without the backend");
    assert_eq!(metrics.block_transfers.get(), 1);
}

#[tokio::test]
async fn block1_asks_for_smaller_blocks() {
    let config = CoapConfig { block_size_bytes: 512, ..CoapConfig::default() };
    let (_gateway, mut client, _metrics, _stop) = setup(config).await;
    let payload = vec![b'x'; 3000];
    let answers = send_blocks(&mut client, &path("echo", "/json/8"), &payload, 6, None).await;
    assert_eq!(answers[0].known().block1, Some(BlockOption { num: 0, more: true, szx: 5 }));
    let last = answers.last().expect("answers");
    assert_eq!(last.code(), Code::CHANGED);
    assert_eq!(last.known().block2, Some(BlockOption { num: 0, more: true, szx: 5 }));
    let body = rest_of_body(&mut client, &path("echo", "/json/8"), Code::POST, last).await;
    assert_eq!(body.len(), 3000);
    // 1024 bytes, then 512-byte blocks 2, 3, 4 and 5 (the last with 440 bytes).
    assert_eq!(answers.len(), 5);
}

async fn rest_of_body(
    client: &mut CoapClient,
    p: &str,
    code: Code,
    first: &fleetgate_transport_coap::codec::Message,
) -> Vec<u8> {
    let mut body = first.payload().to_vec();
    let Some(mut block) = first.known().block2 else { return body };
    while block.more {
        let next = BlockOption { num: block.num + 1, more: false, szx: block.szx };
        let req = Req { code, ..Req::post(p, b"") }.uint(option::BLOCK2, next.value());
        let m = client.exchange(req, WAIT).await.expect("block");
        assert_eq!(m.code(), first.code());
        body.extend_from_slice(m.payload());
        block = m.known().block2.expect("Block2 on every block");
        assert_eq!(block.num, next.num);
    }
    body
}

static BIG: [u8; 2500] = [b'z'; 2500];

#[tokio::test]
async fn large_responses_and_notifications_go_block_wise() {
    let (gateway, mut client, _metrics, _stop) = setup(CoapConfig::default()).await;
    // The client asks for 256-byte blocks (Block2 num 0 in the request, RFC 7959 §2.4).
    let p = path("echo", "/json/3");
    let req = Req::post(&p, &BIG)
        .uint(option::BLOCK2, BlockOption { num: 0, more: false, szx: 4 }.value());
    let first = client.exchange(req, WAIT).await.expect("answer");
    assert_eq!(first.known().block2, Some(BlockOption { num: 0, more: true, szx: 4 }));
    assert_eq!(first.known().size2, Some(2500));
    assert_eq!(first.payload().len(), 256);
    assert_eq!(rest_of_body(&mut client, &p, Code::POST, &first).await, BIG.to_vec());

    // A notification too large for one block: its first block, the rest by GET with Block2.
    let p = path("echo", "/config/json");
    let token = client.new_token();
    client
        .exchange(Req { token: Some(token), ..observe_req(&p, 0) }, WAIT)
        .await
        .expect("registered");
    gateway.push("tok-1", "/config/json", &BIG);
    let note = client.recv_matching(WAIT, |m| m.token() == token).await.expect("notification");
    client.send_empty(MessageType::Acknowledgement, note.message_id()).await;
    assert!(note.known().observe.is_some());
    assert_eq!(note.known().block2, Some(BlockOption { num: 0, more: true, szx: 6 }));
    assert_eq!(rest_of_body(&mut client, &p, Code::GET, &note).await, BIG.to_vec());

    // A later block with no body kept: 4.08.
    let req = Req::post(&path("echo", "/json/77"), b"")
        .uint(option::BLOCK2, BlockOption { num: 1, more: false, szx: 6 }.value());
    assert_eq!(
        client.exchange(req, WAIT).await.expect("answer").code(),
        Code::REQUEST_ENTITY_INCOMPLETE
    );
}

#[tokio::test]
async fn payloads_over_the_limit_get_4_13_with_size1() {
    let config = CoapConfig { max_payload_bytes: 2048, ..CoapConfig::default() };
    let (gateway, mut client, _metrics, _stop) = setup(config).await;
    let payload = vec![b'y'; 3072];
    let p = path("echo", "/json/1");
    let m = client.exchange(Req::post(&p, &payload), WAIT).await.expect("answer");
    assert_eq!(m.code(), Code::REQUEST_ENTITY_TOO_LARGE);
    assert_eq!(m.known().size1, Some(2048));
    // Block-wise, refused at the block that passes the limit...
    let answers = send_blocks(&mut client, &p, &payload, 6, None).await;
    let last = answers.last().expect("answers");
    assert_eq!((answers.len(), last.code()), (3, Code::REQUEST_ENTITY_TOO_LARGE));
    assert_eq!(last.known().size1, Some(2048));
    // ... or at the first when Size1 announces the total.
    let answers = send_blocks(&mut client, &p, &payload, 6, Some(3072)).await;
    assert_eq!((answers.len(), answers[0].code()), (1, Code::REQUEST_ENTITY_TOO_LARGE));
    assert_eq!(gateway.requests(), 0);
}

#[tokio::test]
async fn a_block_out_of_order_gets_4_08() {
    let (_gateway, mut client, _metrics, _stop) = setup(CoapConfig::default()).await;
    let block = BlockOption { num: 3, more: true, szx: 2 };
    let req = Req::post(&path("echo", "/json"), &[0u8; 64]).uint(option::BLOCK1, block.value());
    let m = client.exchange(req, WAIT).await.expect("answer");
    assert_eq!(m.code(), Code::REQUEST_ENTITY_INCOMPLETE);
}

#[tokio::test]
async fn unsupported_options_and_methods() {
    let (gateway, mut client, _metrics, _stop) = setup(CoapConfig::default()).await;
    let p = path("echo", "/json");
    let m = client
        .exchange(Req::post(&p, b"").option(option::OSCORE, vec![]), WAIT)
        .await
        .expect("answer");
    assert_eq!(m.code(), Code::BAD_OPTION);
    let m = client
        .exchange(Req::post(&p, b"").option(2001, b"x".to_vec()), WAIT)
        .await
        .expect("answer");
    assert_eq!(m.code(), Code::BAD_OPTION, "an unknown critical option");
    let m = client
        .exchange(Req::post(&p, b"").option(option::PROXY_URI, b"coap://x/".to_vec()), WAIT)
        .await
        .expect("answer");
    assert_eq!(m.code(), Code::PROXYING_NOT_SUPPORTED);
    let m = client
        .exchange(Req { code: Code::DELETE, ..Req::post(&p, b"") }, WAIT)
        .await
        .expect("answer");
    assert_eq!(m.code(), Code::METHOD_NOT_ALLOWED);
    assert_eq!(gateway.requests(), 0);
    // Unknown elective options are ignored.
    let req = Req::post(&p, b"[]").option(2000, b"x".to_vec()).uint(option::CONTENT_FORMAT, 50);
    let m = client.exchange(req, WAIT).await.expect("answer");
    assert_eq!(m.code(), Code::CHANGED);
}

#[tokio::test]
async fn pings_and_malformed_messages_are_reset() {
    let (_gateway, mut client, metrics, _stop) = setup(CoapConfig::default()).await;
    client.send_empty(MessageType::Confirmable, 0x4242).await;
    let rst = client.recv(WAIT).await.expect("reset");
    assert_eq!(
        (rst.mtype(), rst.message_id(), rst.code()),
        (MessageType::Reset, 0x4242, Code::EMPTY)
    );
    assert_eq!(metrics.sessions_open.get(), 0, "a ping from an unknown peer keeps no state");
    // A CON with the reserved option nibble 15: a format error, reset.
    client.send(b"\x40\x02\x43\x43\xf1a").await;
    let rst = client.recv(WAIT).await.expect("reset");
    assert_eq!((rst.mtype(), rst.message_id()), (MessageType::Reset, 0x4343));
    // Another version, and a malformed NON: silently ignored.
    client.send(b"\x80\x02\x44\x44").await;
    client.send(b"\x50\x02\x44\x45\xf1a").await;
    assert!(client.recv(QUIET).await.is_none());
    assert!(metrics.protocol_errors.get() >= 2);
}

#[tokio::test]
async fn idle_sessions_are_closed() {
    let config = CoapConfig { session_idle_timeout_ms: 100, ..CoapConfig::default() };
    let (gateway, mut client, metrics, _stop) = setup(config).await;
    let m = client.exchange(Req::post(&path("echo", "/json"), b"[]"), WAIT).await.expect("answer");
    assert_eq!(m.code(), Code::CHANGED);
    assert_eq!(metrics.sessions_open.get(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(gateway.closed_sessions(), 1);
    assert_eq!(metrics.sessions_expired.get(), 1);
    assert_eq!(metrics.sessions_open.get(), 0);
    // The peer comes back: a new session.
    let m = client.exchange(Req::post(&path("echo", "/json"), b"[]"), WAIT).await.expect("answer");
    assert_eq!(m.code(), Code::CHANGED);
    assert_eq!(metrics.sessions_opened.get(), 2);
}

#[tokio::test]
async fn peers_over_the_limit_get_5_03() {
    let config = CoapConfig { max_sessions: 1, ..CoapConfig::default() };
    let (_gateway, mut client, metrics, _stop) = setup(config).await;
    let p = path("echo", "/json");
    let m = client.exchange(Req::post(&p, b"[]"), WAIT).await.expect("answer");
    assert_eq!(m.code(), Code::CHANGED);
    let server = client.socket.peer_addr().expect("peer");
    let mut other = CoapClient::new(server).await;
    let m = other.exchange(Req::post(&p, b"[]"), WAIT).await.expect("answer");
    assert_eq!(m.code(), Code::SERVICE_UNAVAILABLE);
    assert!(m.known().max_age.is_some());
    assert_eq!(metrics.sessions_over_limit.get(), 1);
}

#[tokio::test]
async fn credentials_travel_as_uri_query_until_dtls() {
    let (gateway, mut client, metrics, _stop) = setup(CoapConfig::default()).await;
    let p = path("echo", "/json");
    client.query = vec!["u=intruder".into(), "p=x".into()];
    let m = client.exchange(Req::post(&p, b"[]"), WAIT).await.expect("answer");
    assert_eq!(m.code(), Code::UNAUTHORIZED);
    assert_eq!(metrics.sessions_refused.get(), 1);
    client.query = vec!["u=device".into()];
    let m = client.exchange(Req::post(&p, b"[]"), WAIT).await.expect("answer");
    assert_eq!(m.code(), Code::CHANGED);
    // Other credentials on the open session are refused; the same or none are fine.
    client.query = vec!["u=someone-else".into()];
    let m = client.exchange(Req::post(&p, b"[]"), WAIT).await.expect("answer");
    assert_eq!(m.code(), Code::UNAUTHORIZED);
    client.query = Vec::new();
    let m = client.exchange(Req::post(&p, b"[]"), WAIT).await.expect("answer");
    assert_eq!(m.code(), Code::CHANGED);
    assert_eq!(gateway.requests(), 2);
}

#[tokio::test]
async fn shutdown_closes_sessions_and_metrics_render() {
    let (gateway, mut client, metrics, stop) = setup(CoapConfig::default()).await;
    client.exchange(Req::post(&path("echo", "/json"), b"[]"), WAIT).await.expect("answer");
    stop.stop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(gateway.closed_sessions(), 1);
    let out = metrics.text();
    assert!(
        out.contains("fleetgate_transport_messages_received_total{transport=\"coap\"} 1"),
        "{out}"
    );
    assert!(out.contains("fleetgate_transport_messages_sent_total{transport=\"coap\"} 1"));
    assert!(out.contains("# TYPE fleetgate_transport_sessions_open gauge"));
}

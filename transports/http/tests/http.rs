//! HTTP-specific behaviour: body limit, slow headers, keep-alive, h2c, methods, credentials,
//! long polls, timeouts, metrics and shutdown.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Conn, Presented, Recording, basic, config, serve};
use fleetgate_transport_core::compliance::ScriptedGateway;
use fleetgate_transport_http::HttpConfig;
use http_body_util::Full;
use hyper::{Method, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ECHO: &str = "/kp1/demo-v1/echo/tok-1/json";

/// Reads what the server sends until it closes the connection or `wait` passes.
async fn read_until_closed(stream: &mut TcpStream, wait: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let mut buf = [0u8; 4096];
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, false),
        }
    }
}

fn small_body_config() -> HttpConfig {
    HttpConfig { max_body_bytes: 1024, ..config() }
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_by_content_length() {
    let served = serve(Arc::new(ScriptedGateway::default()), small_body_config());
    let mut conn = Conn::h1(served.addr).await;
    let fits = conn.send(Method::POST, &format!("{ECHO}/1"), None, &[b'1'; 1024]).await;
    assert_eq!(fits.map(|r| r.status), Some(200));
    let reply = conn.send(Method::POST, &format!("{ECHO}/2"), None, &[b'1'; 1025]).await;
    let reply = reply.expect("answer");
    assert_eq!(reply.error_code(), 413);
    assert_eq!(served.metrics.payload_too_large.get(), 1);
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_413() {
    let gateway = Arc::new(ScriptedGateway::default());
    let served = serve(gateway.clone(), small_body_config());
    let mut stream = TcpStream::connect(served.addr).await.expect("connect");
    let head = format!(
        "POST {ECHO}/1 HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    for _ in 0..3 {
        // Three chunks of 512 bytes: the third passes the limit.
        stream.write_all(b"200\r\n").await.expect("write");
        stream.write_all(&[b'1'; 512]).await.expect("write");
        stream.write_all(b"\r\n").await.expect("write");
    }
    stream.write_all(b"0\r\n\r\n").await.expect("write");
    let (response, _) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 413 "), "{text}");
    assert!(
        text.ends_with(
            r#"{"statusCode":413,"reasonPhrase":"request body is larger than 1024 bytes"}"#
        ),
        "{text}"
    );
    assert_eq!(gateway.requests(), 0, "the request never reached the gateway");

    // Within the limit, a chunked body is joined and reaches the extension whole.
    let mut stream = TcpStream::connect(served.addr).await.expect("connect");
    let request = format!(
        "POST {ECHO}/2 HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n2\r\n[1\r\n3\r\n,2]\r\n0\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let (response, _) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    assert!(text.contains("content-type: application/json"), "{text}");
    assert!(text.ends_with("\r\n\r\n[1,2]"), "{text}");
}

fn slow_config() -> HttpConfig {
    HttpConfig { header_read_timeout_ms: 300, ..config() }
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let served = serve(Arc::new(ScriptedGateway::default()), slow_config());

    // Half a request line on a new connection.
    let started = Instant::now();
    let mut stream = TcpStream::connect(served.addr).await.expect("connect");
    stream.write_all(b"POST /kp1/demo-v1/echo/tok-1/js").await.expect("write");
    let (response, closed) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(closed, "the connection is closed");
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(250), "not before the timeout: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(2), "soon after the timeout: {elapsed:?}");
    assert!(!String::from_utf8_lossy(&response).contains(" 200 "));

    // One byte that could start the HTTP/2 preface, then nothing.
    let mut stream = TcpStream::connect(served.addr).await.expect("connect");
    stream.write_all(b"P").await.expect("write");
    let (_, closed) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(closed, "the connection is closed");

    // A complete request first, then half of the next one's headers.
    let mut stream = TcpStream::connect(served.addr).await.expect("connect");
    let request = format!("POST {ECHO}/1 HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n[]");
    stream.write_all(request.as_bytes()).await.expect("write");
    stream
        .write_all(format!("POST {ECHO}/2 HTTP/1.1\r\nhost: x\r\n").as_bytes())
        .await
        .expect("write");
    let (response, closed) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(closed, "the connection is closed");
    let text = String::from_utf8_lossy(&response);
    assert_eq!(text.matches("HTTP/1.1 200 ").count(), 1, "{text}");
    assert!(served.metrics.header_timeouts.get() >= 3);
}

#[tokio::test]
async fn keep_alive_reuses_one_connection_and_one_session() {
    let gateway = Arc::new(Recording::default());
    let served = serve(gateway.clone(), config());
    let mut conn = Conn::h1(served.addr).await;
    for id in 1..=5 {
        let reply = conn.send(Method::POST, &format!("{ECHO}/{id}"), None, b"[7]").await;
        let reply = reply.expect("answer on the same connection");
        assert_eq!((reply.status, &reply.body[..]), (200, &b"[7]"[..]));
    }
    assert_eq!(served.metrics.connections_accepted.get(), 1);
    assert_eq!(gateway.opened().len(), 1, "one session per connection");
    drop(conn);
    for _ in 0..200 {
        if gateway.inner.closed_sessions() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(gateway.inner.closed_sessions(), 1, "the session closes with the connection");
    assert_eq!(served.metrics.connections_open.get(), 0);
}

#[tokio::test]
async fn h2c_with_prior_knowledge_multiplexes_requests() {
    let gateway = Arc::new(Recording::default());
    let served = serve(gateway.clone(), config());
    let conn = Conn::h2(served.addr).await;
    let mut requests = Vec::new();
    for id in 1..=20u32 {
        let mut sender = conn.h2_sender();
        requests.push(tokio::spawn(async move {
            // Even ids go to the slow extension, so answers come back out of order.
            let ext = if id % 2 == 0 { "slow" } else { "echo" };
            let body = format!("[{id}]");
            let request = Request::post(format!("http://x/kp1/demo-v1/{ext}/tok-1/json/{id}"))
                .body(Full::new(Bytes::from(body.clone())))
                .expect("request");
            let response = sender.send_request(request).await.expect("response");
            assert_eq!(response.version(), hyper::Version::HTTP_2);
            let status = response.status().as_u16();
            let got = http_body_util::BodyExt::collect(response.into_body())
                .await
                .expect("body")
                .to_bytes();
            assert_eq!((status, &got[..]), (200, body.as_bytes()), "request {id}");
        }));
    }
    for r in requests {
        r.await.expect("request task");
    }
    // Without a request id too, and an empty answer is 204.
    let mut conn = conn;
    let reply = conn.send(Method::POST, ECHO, None, b"").await.expect("answer");
    assert_eq!(reply.status, 204);
    assert_eq!(gateway.opened().len(), 1, "one session for the connection");
}

#[tokio::test]
async fn other_methods_are_405_and_other_paths_404() {
    let served = serve(Arc::new(ScriptedGateway::default()), config());
    let mut conn = Conn::h1(served.addr).await;
    let reply = conn.send(Method::DELETE, &format!("{ECHO}/1"), None, b"").await.expect("answer");
    assert_eq!(reply.error_code(), 405);
    assert_eq!(reply.headers.get("allow").map(|v| v.as_bytes()), Some(&b"POST, PUT, GET"[..]));
    let reply = conn.send(Method::GET, &format!("{ECHO}/1"), None, b"").await.expect("answer");
    assert_eq!(reply.error_code(), 405, "GET without ?observe=true");
    let reply = conn.send(Method::POST, "/metrics", None, b"").await.expect("answer");
    assert_eq!(reply.error_code(), 404);
    let reply = conn.send(Method::POST, "/kp1/demo-v1/dcx", None, b"").await.expect("answer");
    assert_eq!(reply.error_code(), 404);
    // PUT is a request like POST.
    let reply = conn.send(Method::PUT, &format!("{ECHO}/2"), None, b"{}").await.expect("answer");
    assert_eq!((reply.status, &reply.body[..]), (200, &b"{}"[..]));
    assert_eq!(
        reply.headers.get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/json"[..])
    );
    let reply =
        conn.send(Method::PUT, &format!("{ECHO}/3"), None, b"\x01\x02").await.expect("answer");
    assert_eq!(
        reply.headers.get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/octet-stream"[..])
    );
}

#[tokio::test]
async fn basic_and_bearer_credentials_reach_open_session() {
    let gateway = Arc::new(Recording::default());
    let served = serve(gateway.clone(), config());
    let mut conn = Conn::h1(served.addr).await;
    let auth = basic("device-7", "pa:ss");
    let reply = conn.send(Method::POST, &format!("{ECHO}/1"), Some(&auth), b"[]").await;
    assert_eq!(reply.map(|r| r.status), Some(200));
    // Same credentials, same session.
    let reply = conn.send(Method::POST, &format!("{ECHO}/2"), Some(&auth), b"[]").await;
    assert_eq!(reply.map(|r| r.status), Some(200));
    // Different credentials on the same connection: a fresh session.
    let reply = conn.send(Method::POST, &format!("{ECHO}/3"), Some("Bearer tk.123"), b"[]").await;
    assert_eq!(reply.map(|r| r.status), Some(200));
    let mut other = Conn::h1(served.addr).await;
    let reply = other.send(Method::POST, &format!("{ECHO}/4"), None, b"[]").await;
    assert_eq!(reply.map(|r| r.status), Some(200));
    assert_eq!(
        gateway.opened(),
        vec![
            Presented {
                transport: "http",
                username: Some("device-7".into()),
                password: Some(b"pa:ss".to_vec())
            },
            Presented { transport: "http", username: None, password: Some(b"tk.123".to_vec()) },
            Presented { transport: "http", username: None, password: None },
        ]
    );

    // Refused credentials: 401 with the error body and a challenge, for every attempt.
    let refused = basic("intruder", "x");
    for id in 5..7 {
        let reply = conn.send(Method::POST, &format!("{ECHO}/{id}"), Some(&refused), b"[]").await;
        let reply = reply.expect("answer");
        assert_eq!(reply.error_code(), 401);
        assert!(reply.headers.contains_key("www-authenticate"));
    }
    // A malformed header is refused before the gateway.
    let reply = conn.send(Method::POST, &format!("{ECHO}/7"), Some("Basic ***"), b"[]").await;
    assert_eq!(reply.expect("answer").error_code(), 401);
    assert_eq!(gateway.opened().len(), 5);
    assert_eq!(served.metrics.sessions_refused.get(), 2);
}

#[tokio::test]
async fn a_long_poll_gets_the_next_push_or_times_out() {
    let gateway = Arc::new(ScriptedGateway::default());
    let served = serve(gateway.clone(), config());
    let path = "/kp1/demo-v1/echo/tok-1/config/json";

    // Nothing pushed: 204 after timeout_ms.
    let mut conn = Conn::h1(served.addr).await;
    let started = Instant::now();
    let reply =
        conn.send(Method::GET, &format!("{path}?observe=true&timeout_ms=150"), None, b"").await;
    assert_eq!(reply.map(|r| r.status), Some(204));
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(served.metrics.long_polls_waiting.get(), 0);

    // Over HTTP/2, a session that used the token long-polls on the same connection; a push
    // on another path does not end it, one on its path does.
    let mut conn = Conn::h2(served.addr).await;
    let reply = conn.send(Method::POST, &format!("{ECHO}/1"), None, b"[]").await;
    assert_eq!(reply.map(|r| r.status), Some(200));
    let mut poller = Conn::H2(conn.h2_sender());
    let uri = format!("{path}?observe=true&timeout_ms=5000");
    let poll = tokio::spawn(async move { poller.send(Method::GET, &uri, None, b"").await });
    while served.metrics.long_polls_waiting.get() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(gateway.push("tok-1", "/config/json/other", b"{}"), 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!poll.is_finished(), "a push on another path is not for this long poll");
    assert_eq!(gateway.push("tok-1", "/config/json", b"{\"v\":2}"), 1);
    let reply = poll.await.expect("task").expect("answer");
    assert_eq!((reply.status, &reply.body[..]), (200, &b"{\"v\":2}"[..]));
    assert_eq!(served.metrics.long_polls_waiting.get(), 0);

    // A refused subscription is answered with its status.
    let reply = conn
        .send(Method::GET, "/kp1/demo-v1/echo/other-token/config/json?observe=true", None, b"")
        .await;
    assert_eq!(reply.expect("answer").error_code(), 403);
    let reply =
        conn.send(Method::GET, &format!("{path}?observe=true&timeout_ms=x"), None, b"").await;
    assert_eq!(reply.expect("answer").error_code(), 400);
}

#[tokio::test]
async fn the_transport_answers_504_when_no_answer_comes_in_time() {
    let config = HttpConfig { request_timeout_ms: 50, ..config() };
    let served = serve(Arc::new(ScriptedGateway::default()), config);
    let mut conn = Conn::h1(served.addr).await;
    let reply = conn.send(Method::POST, "/kp1/demo-v1/slow/tok-1/json/1", None, b"[]").await;
    assert_eq!(reply.expect("answer").error_code(), 504);
    assert_eq!(served.metrics.request_timeouts.get(), 1);
    // The late answer is dropped, and the connection still serves.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let reply = conn.send(Method::POST, &format!("{ECHO}/2"), None, b"[2]").await;
    let reply = reply.expect("answer");
    assert_eq!((reply.status, &reply.body[..]), (200, &b"[2]"[..]));
}

#[tokio::test]
async fn metrics_count_requests_and_responses() {
    let served = serve(Arc::new(ScriptedGateway::default()), config());
    let mut conn = Conn::h1(served.addr).await;
    let _ = conn.send(Method::POST, &format!("{ECHO}/1"), None, b"[]").await;
    let _ = conn.send(Method::POST, "/nowhere", None, b"").await;
    let text = served.metrics_text();
    for line in [
        "fleetgate_transport_messages_received_total{transport=\"http\"} 2",
        "fleetgate_transport_http_responses_total{transport=\"http\",class=\"2xx\"} 1",
        "fleetgate_transport_http_responses_total{transport=\"http\",class=\"4xx\"} 1",
        "fleetgate_transport_connections_open{transport=\"http\"} 1",
        // Only the 1/KP request reached the gateway.
        "fleetgate_transport_request_accept_seconds_count{transport=\"http\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
}

#[tokio::test]
async fn shutdown_ends_long_polls_and_connections() {
    let gateway = Arc::new(ScriptedGateway::default());
    let served = serve(gateway.clone(), config());
    let mut conn = Conn::h1(served.addr).await;
    let uri = "/kp1/demo-v1/echo/tok-1/config/json?observe=true";
    let poll = tokio::spawn(async move { conn.send(Method::GET, uri, None, b"").await });
    while served.metrics.long_polls_waiting.get() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    served.stop.stop();
    let reply = tokio::time::timeout(Duration::from_secs(2), poll).await.expect("in time");
    assert_eq!(reply.expect("task").expect("answer").error_code(), 503);
    tokio::time::timeout(Duration::from_secs(2), served.task)
        .await
        .expect("serve ends")
        .expect("task");
    assert_eq!(gateway.closed_sessions(), 1);
}

/// A client that writes its whole (too large) body before it reads, as Python's urllib and
/// many device stacks do, still reads its 413, and the connection is closed after it.
#[tokio::test]
async fn a_client_that_writes_a_10_mb_body_first_reads_its_413() {
    let gateway = Arc::new(ScriptedGateway::default());
    let served = serve(gateway.clone(), small_body_config());
    let mut stream = TcpStream::connect(served.addr).await.expect("connect");
    let size = 10 * 1024 * 1024;
    let head = format!("POST {ECHO}/1 HTTP/1.1\r\nhost: x\r\ncontent-length: {size}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.expect("write the head");
    let body = vec![b'1'; size];
    // The whole body goes out before anything is read: no broken pipe.
    stream.write_all(&body).await.expect("the server reads the whole body");
    let (response, closed) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 413 "), "{text}");
    assert!(text.to_ascii_lowercase().contains("connection: close"), "{text}");
    assert!(closed, "the connection is closed after the refusal");
    assert_eq!(gateway.requests(), 0);
}

//! The transport compliance kit: one set of scenarios every transport's tests run, so that MQTT,
//! CoAP and HTTP answer 1/KP requests alike.
//!
//! [`ScriptedGateway`] stands in for the gateway behind the [`KpHandler`] boundary and answers
//! by extension name: `echo` returns the payload, `fail` answers with the status code written
//! in the payload (through the response path, as an extension would), `reject` refuses with
//! that status before the bus (as the gateway does for a bad token), `slow` echoes after 200 ms,
//! anything else is 404. A client named `intruder` is refused with 401. [`run`] drives a
//! transport through every scenario with a [`KpClient`] the transport's test provides.
//!
//! Enabled by the `compliance` feature; only tests use it.

// Test support: a broken expectation here is a failed test, so it may panic.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

use crate::{
    BoxFuture, ClientCredentials, ClientIdentity, KpError, KpHandler, KpOutcome, KpRequest,
    KpResponse, Outbox, SessionId,
};

/// The app version every scenario uses.
pub const APP_VERSION: &str = "demo-v1";
/// The endpoint token every scenario uses.
pub const TOKEN: &str = "tok-1";

/// What a transport answered, in transport-neutral terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status code: 200 for `/status` or 2.xx, the error's code otherwise.
    pub status: u16,
    /// The response payload (for errors, the 1/KP error body).
    pub payload: Bytes,
}

/// A device-side client of the transport under test.
pub trait KpClient: Send {
    /// Whether this transport answers a request whose path has no request id (HTTP, CoAP
    /// confirmable) or, like MQTT, only errors.
    const ANSWERS_REQUESTS_WITHOUT_ID: bool;

    /// Sends one request to the 1/KP `path` and returns the answer that arrives within `wait`.
    fn request(
        &mut self,
        path: &str,
        payload: &[u8],
        wait: Duration,
    ) -> impl Future<Output = Option<Answer>> + Send;

    /// Asks for pushes on `path` (MQTT: nothing to do once the token is used; CoAP: an Observe
    /// registration; HTTP: a long poll).
    fn observe(&mut self, path: &str) -> impl Future<Output = ()> + Send;

    /// The next push that arrives within `wait`.
    fn next_push(&mut self, wait: Duration) -> impl Future<Output = Option<Answer>> + Send;
}

/// A stand-in gateway with scripted extensions (see the module doc).
#[derive(Default)]
pub struct ScriptedGateway {
    next_session: AtomicU64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Open sessions and the tokens they used.
    sessions: HashMap<SessionId, (Outbox, Vec<String>)>,
    /// Subscriptions: (session, filter, tag).
    subscriptions: Vec<(SessionId, String, u64)>,
    closed: Vec<SessionId>,
    requests: usize,
}

impl ScriptedGateway {
    /// Pushes `payload` for `token` at `resource_path` to every session that used the token
    /// or subscribed to a filter matching `<path>/status`. Returns how many sessions it went to.
    pub fn push(&self, token: &str, resource_path: &str, payload: &'static [u8]) -> usize {
        let Ok(state) = self.state.lock() else { return 0 };
        let base = format!("kp1/{APP_VERSION}/echo/{token}{resource_path}");
        let topic = format!("{base}/status");
        let mut n = 0;
        for (session, (outbox, tokens)) in &state.sessions {
            let subscription = state
                .subscriptions
                .iter()
                .find(|(s, filter, _)| s == session && crate::topic_filter_matches(filter, &topic));
            if !tokens.iter().any(|t| t == token) && subscription.is_none() {
                continue;
            }
            let push = KpResponse {
                base: Bytes::from(base.clone()),
                request_id: None,
                tag: subscription.map_or(0, |(_, _, tag)| *tag),
                outcome: KpOutcome::Success(Bytes::from_static(payload)),
            };
            n += usize::from(outbox.try_send(push).is_ok());
        }
        n
    }

    /// Requests handled so far.
    pub fn requests(&self) -> usize {
        self.state.lock().map_or(0, |s| s.requests)
    }

    /// Sessions the transport has closed.
    pub fn closed_sessions(&self) -> usize {
        self.state.lock().map_or(0, |s| s.closed.len())
    }

    fn answer(&self, session: SessionId, request: &KpRequest, outcome: KpOutcome) {
        let response = KpResponse {
            base: request.topic.base(),
            request_id: request.topic.request_id(),
            tag: request.tag,
            outcome,
        };
        if let Ok(state) = self.state.lock()
            && let Some((outbox, _)) = state.sessions.get(&session)
        {
            let _ = outbox.try_send(response);
        }
    }
}

impl ScriptedGateway {
    async fn handle_request(&self, session: SessionId, request: KpRequest) -> Result<(), KpError> {
        let answers = request.topic.request_id().is_some() || request.wants_answer;
        if let Ok(mut state) = self.state.lock() {
            state.requests += 1;
            if let (Some(token), Some((_, tokens))) =
                (request.topic.token(), state.sessions.get_mut(&session))
                && !tokens.iter().any(|t| t == token)
            {
                tokens.push(token.to_owned());
            }
        }
        match request.topic.extension() {
            "echo" if answers => {
                self.answer(session, &request, KpOutcome::Success(request.payload.clone()));
            }
            "echo" => {}
            "slow" => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if answers {
                    self.answer(session, &request, KpOutcome::Success(request.payload.clone()));
                }
            }
            "fail" => {
                let error = KpError::new(status_in(&request.payload), "failed as asked");
                self.answer(session, &request, KpOutcome::Error(error));
            }
            "reject" => {
                return Err(KpError::new(status_in(&request.payload), "rejected as asked"));
            }
            other => return Err(KpError::not_found(format!("unknown extension `{other}`"))),
        }
        Ok(())
    }
}

fn status_in(payload: &[u8]) -> u16 {
    std::str::from_utf8(payload).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(500)
}

impl KpHandler for ScriptedGateway {
    fn open_session<'a>(
        &'a self,
        credentials: ClientCredentials<'a>,
        outbox: Outbox,
    ) -> BoxFuture<'a, Result<ClientIdentity, KpError>> {
        let refused = credentials.username == Some("intruder");
        Box::pin(async move {
            if refused {
                return Err(KpError::unauthorized("bad credentials"));
            }
            let session = SessionId(self.next_session.fetch_add(1, Ordering::Relaxed) + 1);
            if let Ok(mut state) = self.state.lock() {
                state.sessions.insert(session, (outbox, Vec::new()));
            }
            Ok(ClientIdentity { session, client_id: None })
        })
    }

    fn handle(&self, session: SessionId, request: KpRequest) -> BoxFuture<'_, Result<(), KpError>> {
        Box::pin(self.handle_request(session, request))
    }

    fn subscribe<'a>(
        &'a self,
        session: SessionId,
        filter: &'a str,
        tag: u64,
    ) -> BoxFuture<'a, Result<(), KpError>> {
        Box::pin(async move {
            let levels: Vec<&str> = filter.split('/').collect();
            if levels.len() < 4 || levels[3] != TOKEN {
                return Err(KpError::forbidden("name the token"));
            }
            if let Ok(mut state) = self.state.lock() {
                state.subscriptions.push((session, filter.to_owned(), tag));
            }
            Ok(())
        })
    }

    fn unsubscribe(&self, session: SessionId, filter: &str) -> bool {
        let Ok(mut state) = self.state.lock() else { return false };
        let before = state.subscriptions.len();
        state.subscriptions.retain(|(s, f, _)| !(*s == session && f == filter));
        state.subscriptions.len() < before
    }

    fn close_session(&self, session: SessionId) {
        if let Ok(mut state) = self.state.lock()
            && state.sessions.remove(&session).is_some()
        {
            state.subscriptions.retain(|(s, _, _)| *s != session);
            state.closed.push(session);
        }
    }
}

fn path(extension: &str, rest: &str) -> String {
    format!("kp1/{APP_VERSION}/{extension}/{TOKEN}{rest}")
}

fn error_status(answer: &Answer) -> u16 {
    // The body must be the 1/KP error object with the same code.
    let body = std::str::from_utf8(&answer.payload).unwrap_or("");
    let expected = format!("{{\"statusCode\":{},\"reasonPhrase\":\"", answer.status);
    assert!(body.starts_with(&expected), "1/KP error body for {}: {body}", answer.status);
    answer.status
}

/// Drives a transport through every scenario. `connect(None)` must give a client of an
/// anonymous session; `connect(Some((user, password)))` one with those credentials, or the
/// status the transport refused it with (for transports without sessions, the status of its
/// first request).
pub async fn run<C, F, Fut>(gateway: &ScriptedGateway, mut connect: F)
where
    C: KpClient,
    F: FnMut(Option<(&'static str, &'static str)>) -> Fut,
    Fut: Future<Output = Result<C, u16>>,
{
    let wait = Duration::from_secs(5);
    let mut client = connect(None).await.expect("an anonymous client connects");

    // A request with an id is answered with the extension's payload.
    let answer = client.request(&path("echo", "/json/42"), b"[1,2]", wait).await;
    assert_eq!(answer, Some(Answer { status: 200, payload: Bytes::from_static(b"[1,2]") }));

    // An extension's error keeps its status code and carries the 1/KP error body.
    let answer = client.request(&path("fail", "/json/43"), b"503", wait).await.expect("answer");
    assert_eq!(error_status(&answer), 503);

    // A refusal before the bus, likewise.
    let answer = client.request(&path("reject", "/json/44"), b"413", wait).await.expect("answer");
    assert_eq!(error_status(&answer), 413);

    // Unknown extension and a path that is not 1/KP: 404.
    let answer = client.request(&path("nothing", "/json/45"), b"", wait).await.expect("answer");
    assert_eq!(error_status(&answer), 404);
    let answer = client.request("kp2/x/y/z/46", b"", wait).await.expect("answer");
    assert_eq!(error_status(&answer), 404);

    // A slow extension is waited for.
    let answer = client.request(&path("slow", "/json/47"), b"[3]", wait).await;
    assert_eq!(answer.map(|a| a.status), Some(200));

    // Without a request id: answered only where the transport needs an answer; errors always.
    let short = Duration::from_millis(300);
    let answer = client.request(&path("echo", "/json"), b"[4]", short).await;
    if C::ANSWERS_REQUESTS_WITHOUT_ID {
        assert_eq!(answer.map(|a| a.status), Some(200));
    } else {
        assert_eq!(answer, None, "no success response without a request id");
    }
    let answer = client.request(&path("fail", "/json"), b"400", wait).await.expect("error");
    assert_eq!(error_status(&answer), 400);

    // A push reaches a client that used the token or observes the path. (A transport may
    // register an observation asynchronously, so the push is retried until it has a taker.)
    client.observe(&path("echo", "/config/json")).await;
    let mut pushed = 0;
    for _ in 0..100 {
        pushed = gateway.push(TOKEN, "/config/json", b"{\"configId\":\"c2\"}");
        if pushed > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(pushed >= 1, "the session that used the token gets the push");
    let push = client.next_push(wait).await.expect("push arrives");
    assert_eq!(push, Answer { status: 200, payload: Bytes::from_static(b"{\"configId\":\"c2\"}") });

    // Bad credentials: 401.
    match connect(Some(("intruder", "secret"))).await {
        Err(status) => assert_eq!(status, 401),
        Ok(_) => panic!("a client with bad credentials must be refused"),
    }
    // Every request but the one that is not 1/KP reached the gateway.
    assert!(gateway.requests() >= 7, "{} requests reached the gateway", gateway.requests());
}

/// Binds `transport` and serves it with `handler` in a task until the returned handle is
/// dropped or stops it. Returns its first local address.
pub fn start(
    mut transport: Box<dyn crate::Transport>,
    handler: std::sync::Arc<dyn KpHandler>,
) -> (std::net::SocketAddr, crate::ShutdownHandle) {
    if let Err(e) = transport.bind() {
        panic!("the transport under test cannot bind: {e}");
    }
    let Some(addr) = transport.local_addrs().first().copied() else {
        panic!("the transport under test has no local address after bind");
    };
    let (stop, shutdown) = crate::Shutdown::channel();
    tokio::spawn(transport.serve(handler, shutdown));
    (addr, stop)
}

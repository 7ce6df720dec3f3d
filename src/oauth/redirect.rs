//! The loopback redirect listener of the authorization code flow (RFC 8252 §7.3).
//!
//! A listener runs on 127.0.0.1 (or ::1) only while an authorization waits for the browser. Several
//! authorizations may share one port: the `state` of the callback says which one it finishes.
//! The hub only matches callbacks to pending authorizations and hands each over (`Arrival`):
//! the registry checks `iss`, exchanges the code and stores the tokens, and says how that went,
//! which the browser is shown.

use crate::secret::Secret;
use crate::wire::AuthFailure;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use url::Url;

/// An authorization waiting for its callback.
#[derive(Debug, Clone)]
pub struct PendingAuth {
    pub client: Arc<str>,
    pub state: String,
    pub verifier: Option<Secret>,
    /// The exact redirect URI sent in the authorization request (with the bound port).
    pub redirect_uri: Url,
    /// The client's configuration fingerprint when it started; a change voids it.
    pub fingerprint: String,
}

/// What the browser brought back.
#[derive(Debug, Clone)]
pub enum Callback {
    Code {
        code: String,
        iss: Option<String>,
        /// Every query parameter, for the profile's `callback_fields` (Intuit's `realmId`).
        params: BTreeMap<String, String>,
    },
    Error {
        error: String,
        description: Option<String>,
    },
}

/// A callback handed over to the registry.
pub enum Arrival {
    /// It matched a pending authorization: finish it, and say how that went on `done`.
    Matched {
        pending: PendingAuth,
        callback: Callback,
        done: oneshot::Sender<Result<(), AuthFailure>>,
    },
    /// The one authorization it could be for came back with the wrong `state`: it ends.
    Refused {
        pending: PendingAuth,
        why: AuthFailure,
    },
}

/// The redirect URI used when a client does not configure one: loopback, any free port.
pub fn default_redirect_uri() -> Url {
    Url::parse("http://127.0.0.1:0/callback").expect("a constant URL parses")
}

#[derive(Default)]
struct Inner {
    /// Listening ports and how to stop them.
    ports: HashMap<u16, CancellationToken>,
    /// The port chosen for redirect URIs that leave the port free, while it listens.
    ephemeral: Option<u16>,
    pending: HashMap<String, (u16, PendingAuth)>,
}

/// The redirect listeners and the authorizations waiting on them. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Mutex<Inner>>,
    arrivals: mpsc::UnboundedSender<Arrival>,
    shutdown: CancellationToken,
}

impl Hub {
    /// A hub, and where the callbacks it matches arrive.
    pub fn new(shutdown: CancellationToken) -> (Hub, mpsc::UnboundedReceiver<Arrival>) {
        let (arrivals, received) = mpsc::unbounded_channel();
        let hub = Hub {
            inner: Arc::default(),
            arrivals,
            shutdown,
        };
        (hub, received)
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for `pending`'s callback on the port of `requested` (0: any free port, shared by
    /// all such authorizations). Returns the redirect URI to send, with its real port.
    pub fn register(&self, requested: &Url, mut pending: PendingAuth) -> Result<Url, String> {
        let ip = match requested.host() {
            Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
            Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
            // RFC 8252 §8.3: "localhost" may resolve elsewhere; listen on the loopback address.
            _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        let wanted = requested.port().unwrap_or(80);
        let mut inner = self.inner();
        let port = match (wanted, inner.ephemeral) {
            (0, Some(port)) => port,
            (port, _) if port != 0 && inner.ports.contains_key(&port) => port,
            _ => {
                let std_listener = std::net::TcpListener::bind(SocketAddr::new(ip, wanted))
                    .map_err(|e| format!("cannot listen for the redirect on {ip}:{wanted}: {e}"))?;
                let port = std_listener.local_addr().map_err(|e| e.to_string())?.port();
                std_listener
                    .set_nonblocking(true)
                    .map_err(|e| e.to_string())?;
                let listener =
                    tokio::net::TcpListener::from_std(std_listener).map_err(|e| e.to_string())?;
                let stop = self.shutdown.child_token();
                inner.ports.insert(port, stop.clone());
                if wanted == 0 {
                    inner.ephemeral = Some(port);
                }
                tokio::spawn(serve(listener, port, self.clone(), stop));
                port
            }
        };
        let mut uri = requested.clone();
        let _ = uri.set_port(Some(port));
        pending.redirect_uri = uri.clone();
        inner.pending.insert(pending.state.clone(), (port, pending));
        Ok(uri)
    }

    /// Takes the pending authorization with this `state`, stopping its listener if it was the last.
    pub fn take(&self, state: &str) -> Option<PendingAuth> {
        let mut inner = self.inner();
        let (port, pending) = inner.pending.remove(state)?;
        stop_if_idle(&mut inner, port);
        Some(pending)
    }

    /// Drops every pending authorization of `client` but `keep`; returns their states.
    pub fn cancel_client(&self, client: &str, keep: &str) -> Vec<String> {
        let mut inner = self.inner();
        let states: Vec<String> = inner
            .pending
            .iter()
            .filter(|(s, (_, p))| &*p.client == client && s.as_str() != keep)
            .map(|(s, _)| s.clone())
            .collect();
        for s in &states {
            if let Some((port, _)) = inner.pending.remove(s) {
                stop_if_idle(&mut inner, port);
            }
        }
        states
    }

    /// Matches a callback arriving on `port` at `path`.
    fn claim(&self, port: u16, path: &str, state: Option<&str>) -> Claim {
        let mut inner = self.inner();
        if let Some(state) = state
            && let Some((p, pending)) = inner.pending.get(state)
            && *p == port
            && pending.redirect_uri.path() == path
        {
            return match inner.pending.remove(state) {
                Some((_, pending)) => {
                    stop_if_idle(&mut inner, port);
                    Claim::Matched(pending)
                }
                None => Claim::NotOurs,
            };
        }
        let here: Vec<String> = inner
            .pending
            .iter()
            .filter(|(_, (p, pending))| *p == port && pending.redirect_uri.path() == path)
            .map(|(s, _)| s.clone())
            .collect();
        match here.as_slice() {
            // The one authorization this callback can be for came back with the wrong state:
            // fail it closed (a forged or replayed response) and say so.
            [only] => match inner.pending.remove(only) {
                Some((_, pending)) => {
                    stop_if_idle(&mut inner, port);
                    Claim::StateMismatch(pending)
                }
                None => Claim::NotOurs,
            },
            [] => Claim::NotOurs,
            _ => Claim::Unknown,
        }
    }
}

fn stop_if_idle(inner: &mut Inner, port: u16) {
    if inner.pending.values().any(|(p, _)| *p == port) {
        return;
    }
    if let Some(stop) = inner.ports.remove(&port) {
        stop.cancel();
    }
    if inner.ephemeral == Some(port) {
        inner.ephemeral = None;
    }
}

enum Claim {
    Matched(PendingAuth),
    StateMismatch(PendingAuth),
    /// Several authorizations wait here and none has this state.
    Unknown,
    NotOurs,
}

async fn serve(listener: tokio::net::TcpListener, port: u16, hub: Hub, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("redirect listener on port {port}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let hub = hub.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let hub = hub.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(hub, port, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // A browser's pre-opened idle connection must not outlive the listener for long.
            tokio::select! {
                _ = conn => {}
                _ = async { stop.cancelled().await; tokio::time::sleep(Duration::from_secs(60)).await } => {}
            }
        });
    }
}

async fn handle(hub: Hub, port: u16, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return page(
            StatusCode::METHOD_NOT_ALLOWED,
            "Not allowed",
            "This address only takes the authorization server's redirect.",
        );
    }
    let mut params: HashMap<String, String> = HashMap::new();
    if let Some(q) = req.uri().query() {
        for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
            // A repeated parameter is not something a conforming server sends; keep the first.
            params
                .entry(k.into_owned())
                .or_insert_with(|| v.into_owned());
        }
    }
    let state = params.get("state").map(String::as_str);
    match hub.claim(port, req.uri().path(), state) {
        Claim::NotOurs => page(
            StatusCode::NOT_FOUND,
            "Not found",
            "No authorization is waiting here.",
        ),
        Claim::Unknown => page(
            StatusCode::BAD_REQUEST,
            "Unknown authorization",
            "This response does not belong to any authorization in progress (state mismatch). Start again with oauth2mci authorize.",
        ),
        Claim::StateMismatch(pending) => {
            let why = AuthFailure::new(
                "state_mismatch",
                "the response's state does not match the request's: it was not sent for this authorization",
            );
            let client = pending.client.clone();
            let _ = hub.arrivals.send(Arrival::Refused {
                pending,
                why: why.clone(),
            });
            failure_page(&client, &why)
        }
        Claim::Matched(pending) => {
            let callback = match (params.get("error"), params.get("code")) {
                (Some(error), _) => Callback::Error {
                    error: error.clone(),
                    description: params.get("error_description").cloned(),
                },
                (None, Some(code)) => Callback::Code {
                    code: code.clone(),
                    iss: params.get("iss").cloned(),
                    params: params.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                },
                (None, None) => Callback::Error {
                    error: "invalid_response".into(),
                    description: Some("the redirect carried neither a code nor an error".into()),
                },
            };
            let client = pending.client.clone();
            let (done, outcome) = oneshot::channel();
            let arrival = Arrival::Matched {
                pending,
                callback,
                done,
            };
            let gone = || AuthFailure::new("shutting_down", "the daemon is stopping");
            let outcome = match hub.arrivals.send(arrival) {
                Ok(()) => outcome.await.unwrap_or_else(|_| Err(gone())),
                Err(_) => Err(gone()),
            };
            match outcome {
                Ok(()) => page(
                    StatusCode::OK,
                    "Authorized",
                    &format!(
                        "oauth2mci has the tokens for {}. You can close this page.",
                        escape(&client)
                    ),
                ),
                Err(why) => failure_page(&client, &why),
            }
        }
    }
}

fn failure_page(client: &str, why: &AuthFailure) -> Response<Full<Bytes>> {
    page(
        StatusCode::BAD_REQUEST,
        "Authorization failed",
        &format!(
            "{}: {}: {}",
            escape(client),
            escape(&why.error),
            escape(&why.message)
        ),
    )
}

fn page(status: StatusCode, title: &str, body: &str) -> Response<Full<Bytes>> {
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>oauth2mci: {title}</title></head>\
         <body><h1>{title}</h1><p>{body}</p></body></html>\n"
    );
    let mut response = Response::new(Full::new(Bytes::from(html)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    // The page holds nothing to leak, but the URL did: no referrer to whatever the page links.
    headers.insert(
        "referrer-policy",
        hyper::header::HeaderValue::from_static("no-referrer"),
    );
    response
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

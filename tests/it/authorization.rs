//! Authorizations that do not go as planned: the user cancels, a forged callback (wrong `state`),
//! a mix-up (wrong `iss`, RFC 9207), the browser never comes back; and a fixed redirect port.
//! Each time the CLI reports the exact reason and exits 7.

use crate::common::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_cancels() {
    let server = AuthServer::start(ServerOptions::default());
    let daemon = Daemon::start("", &server.client_yaml("a", ""));
    let auth = Authorize::start(&daemon, "a");
    assert_eq!(auth.param("code_challenge_method"), "S256");
    assert_eq!(auth.param("code_challenge").len(), 43);
    let (status, body) = browse(&auth.url, false).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("access_denied"), "{body}");
    let (code, err) = auth.finish();
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("access_denied"), "{err}");
    assert_eq!(daemon.status_of("a"), "unauthorized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_with_the_wrong_state_is_refused() {
    let server = AuthServer::start(ServerOptions::default());
    let daemon = Daemon::start("", &server.client_yaml("a", ""));
    let auth = Authorize::start(&daemon, "a");
    let redirect = auth.param("redirect_uri");
    let forged = reqwest::get(format!("{redirect}?code=stolen&state=not-the-one"))
        .await
        .unwrap();
    assert_eq!(forged.status(), 400);
    let (code, err) = auth.finish();
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("state_mismatch"), "{err}");
    // The listener is gone with the authorization.
    assert!(
        reqwest::get(format!("{redirect}?code=x&state=y"))
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_from_another_issuer_is_refused() {
    let server = AuthServer::start(ServerOptions::default());
    let daemon = Daemon::start("", &server.client_yaml("a", ""));
    let auth = Authorize::start(&daemon, "a");
    let redirect = auth.param("redirect_uri");
    let state = auth.param("state");
    let mixed_up = reqwest::get(format!(
        "{redirect}?code=abc&state={state}&iss=https%3A%2F%2Fevil.example"
    ))
    .await
    .unwrap();
    assert_eq!(mixed_up.status(), 400);
    let (code, err) = auth.finish();
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("issuer_mismatch"), "{err}");
    assert_eq!(
        server.stats("success").await,
        serde_json::json!({}),
        "no code was exchanged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_never_comes_back() {
    let server = AuthServer::start(ServerOptions::default());
    let daemon = Daemon::start("", &server.client_yaml("a", "    authorize_timeout: 2s\n"));
    let auth = Authorize::start(&daemon, "a");
    let (code, err) = auth.finish();
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("timeout"), "{err}");
    assert_eq!(daemon.status_of("a"), "unauthorized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_redirect_port_is_used_and_a_second_authorize_replaces_the_first() {
    let server = AuthServer::start(ServerOptions::default());
    let port = free_port();
    let extra = format!("    redirect_uri: http://127.0.0.1:{port}/callback\n");
    let daemon = Daemon::start("", &server.client_yaml("a", &extra));
    let first = Authorize::start(&daemon, "a");
    assert_eq!(
        first.param("redirect_uri"),
        format!("http://127.0.0.1:{port}/callback")
    );
    let second = Authorize::start(&daemon, "a");
    let (code, err) = first.finish();
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("superseded"), "{err}");
    let (status, body) = browse(&second.url, true).await;
    assert_eq!(status, 200, "{body}");
    let (code, err) = second.finish();
    assert_eq!(code, 0, "{err}");
    assert_eq!(daemon.status_of("a"), "valid");
}

//! The one request answered on the accepting thread: `GET /v1/clients/{name}/token` for a token
//! the daemon holds and that is still valid, sent whole on a new connection, as the CLI and
//! scripts send it. It is most of the socket's traffic; answered here, it costs the system
//! calls of a minimal server (accept, read, write, close) and no hand-over to the runtime.
//!
//! Anything else, or anything unusual about this request (a query parameter it does not know,
//! an encoded name, a body, a token that must be refreshed first, an unknown client), goes to
//! the full HTTP server with the bytes read so far, which answers it and its errors as always.

use crate::registry::Registry;
use crate::token::now_ms;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// A token request this module can answer, as read from the connection's first bytes.
#[derive(Debug, PartialEq)]
pub struct TokenRequest<'a> {
    pub name: &'a str,
    pub min_valid: Duration,
    /// The client asked to close the connection after the answer.
    pub close: bool,
}

/// Reads `bytes` as exactly one whole token request (no body, nothing after it), or `None`.
pub fn parse(bytes: &[u8]) -> Option<TokenRequest<'_>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let head = match request.parse(bytes) {
        Ok(httparse::Status::Complete(head)) => head,
        _ => return None,
    };
    // HTTP/1.0 and its keep-alive rules are left to the full server.
    if head != bytes.len() || request.method != Some("GET") || request.version != Some(1) {
        return None;
    }
    let close = crate::api::conn::asks_to_close(request.headers)?;
    let target = request.path?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let name = path.strip_prefix("/v1/clients/")?.strip_suffix("/token")?;
    // Percent-encoded names and values are decoded by the full server, which also says what
    // is wrong with a bad one.
    let plain = |s: &str| !s.is_empty() && !s.contains(['/', '%', '+']);
    if !plain(name) {
        return None;
    }
    let min_valid = match query {
        "" => Duration::ZERO,
        q => {
            let value = q.strip_prefix("min_valid=")?;
            if !plain(value) || value.contains('&') {
                return None;
            }
            crate::duration::parse(value, crate::duration::Unitless::Seconds).ok()?
        }
    };
    Some(TokenRequest {
        name,
        min_valid,
        close,
    })
}

/// What became of a connection whose first bytes were a token request.
pub enum Answered {
    /// The whole answer was written.
    Done,
    /// The socket took only the first part of the answer; this is the rest, to write when the
    /// client reads.
    Partly(Vec<u8>),
}

/// Answers `request` on `stream` if the client's token is ready, else `None` (nothing was
/// written: the full server takes the request).
pub fn answer(
    stream: &mut UnixStream,
    request: &TokenRequest,
    registry: &Registry,
) -> io::Result<Option<Answered>> {
    // A token held in memory only, or one asked for longer than the server grants, is
    // served with a warning, by the full server.
    let Some(token) = registry
        .client(request.name)
        .and_then(|c| c.saved_ready_token(request.min_valid))
        .filter(|t| t.short_of(request.min_valid).is_none())
    else {
        return Ok(None);
    };
    let body = serde_json::to_vec(&crate::wire::TokenReply::of(&token, now_ms()))
        .map_err(io::Error::other)?;
    let mut answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncache-control: no-store\r\ncontent-length: {}\r\n{}date: {}\r\n\r\n",
        body.len(),
        if request.close { "connection: close\r\n" } else { "" },
        httpdate::fmt_http_date(std::time::SystemTime::now()),
    )
    .into_bytes();
    answer.extend_from_slice(&body);
    let written = match stream.write(&answer) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    Ok(Some(if written == answer.len() {
        Answered::Done
    } else {
        Answered::Partly(answer.split_off(written))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(target: &str, headers: &str) -> Vec<u8> {
        format!("GET {target} HTTP/1.1\r\nHost: oauth2mci\r\n{headers}\r\n").into_bytes()
    }

    #[test]
    fn reads_plain_token_requests_only() {
        let close = request("/v1/clients/mail/token", "Connection: close\r\n");
        assert_eq!(
            parse(&close),
            Some(TokenRequest {
                name: "mail",
                min_valid: Duration::ZERO,
                close: true
            })
        );
        let kept = request("/v1/clients/mail/token?min_valid=5m", "");
        assert_eq!(
            parse(&kept),
            Some(TokenRequest {
                name: "mail",
                min_valid: Duration::from_secs(300),
                close: false
            })
        );
        // Left to the full server, which decodes, refuses or routes them.
        for (target, headers) in [
            ("/v1/clients/mail", ""),
            ("/v1/clients/ma%69l/token", ""),
            ("/v1/clients//token", ""),
            ("/v1/clients/a/b/token", ""),
            ("/v1/clients/mail/token?min_valid=soon", ""),
            ("/v1/clients/mail/token?min_valid=5&x=1", ""),
            ("/v1/clients/mail/token?other=1", ""),
            ("/v1/clients/mail/token", "Content-Length: 4\r\n"),
            ("/v1/clients/mail/token", "Transfer-Encoding: chunked\r\n"),
        ] {
            assert_eq!(parse(&request(target, headers)), None, "{target} {headers}");
        }
        assert_eq!(parse(&close[..close.len() - 1]), None, "an unfinished head");
        let mut two = close.clone();
        two.extend_from_slice(&close);
        assert_eq!(parse(&two), None, "a second request behind the first");
        let post = b"POST /v1/clients/mail/token HTTP/1.1\r\n\r\n";
        assert_eq!(parse(post), None);
        let old = b"GET /v1/clients/mail/token HTTP/1.0\r\n\r\n";
        assert_eq!(parse(old), None);
    }
}

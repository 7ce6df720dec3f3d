//! Accepting connections on the API's Unix socket, and serving each without the reactor for as
//! long as it does not block.
//!
//! Most socket clients (the CLI, `curl --unix-socket`, a mail client's `passwordeval`) connect,
//! write one request at once and read one answer. Connections are accepted by blocking threads,
//! as the simplest server would: a wake-up through the reactor costs an `epoll_wait` and a
//! hand-over to a worker, on a machine where each system call costs microseconds. A connection
//! then starts "raw" (a non-blocking socket read and written directly) and registers with the
//! reactor only the first time a read or write would block: registering costs an `epoll_ctl`
//! each way, a third of the time of a whole request. A slow or idle client is then waited for
//! like any other, without holding a thread.

use std::future::Future;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener as StdListener, UnixStream as StdStream};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A listening socket whose `accept` blocks; shared by the accepting threads.
pub struct Listener {
    socket: StdListener,
}

impl Listener {
    /// Takes a bound listener and makes it blocking.
    pub fn new(socket: StdListener) -> io::Result<Listener> {
        socket.set_nonblocking(false)?;
        Ok(Listener { socket })
    }

    /// Waits for the next connection: non-blocking and close-on-exec, with its peer's uid and
    /// gid. Fails once `wake_all` has been called.
    pub fn accept(&self) -> io::Result<(StdStream, io::Result<(u32, u32)>)> {
        use nix::sys::socket::{SockFlag, accept4};
        let fd = loop {
            match accept4(
                self.socket.as_raw_fd(),
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            ) {
                Err(nix::errno::Errno::EINTR) => continue,
                done => break done.map_err(io::Error::from)?,
            }
        };
        // SAFETY: accept4 just returned this descriptor; nothing else owns it.
        let stream = StdStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let peer =
            nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
                .map(|c| (c.uid(), c.gid()))
                .map_err(io::Error::from);
        Ok((stream, peer))
    }

    /// Ends every `accept`, waiting or to come, with an error: Linux wakes the threads blocked
    /// on a listening socket that is shut down. Connections not yet accepted are refused.
    pub fn wake_all(&self) -> io::Result<()> {
        nix::sys::socket::shutdown(self.socket.as_raw_fd(), nix::sys::socket::Shutdown::Both)
            .map_err(io::Error::from)
    }
}

/// Reads the request a client just connected to send: at once if it is there, else after
/// waiting `FIRST_BYTES_WAIT` at most. Returns what was read (empty if nothing came).
pub fn read_first(stream: &mut StdStream, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut waited = false;
    buf.resize(FIRST_READ, 0);
    loop {
        match stream.read(buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && !waited => {
                wait_readable(stream, FIRST_BYTES_WAIT);
                waited = true;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                buf.clear();
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                buf.clear();
                return Err(e);
            }
        }
    }
}

/// Room for a first read: a request head from a script or the CLI is a few hundred bytes.
const FIRST_READ: usize = 4096;

/// One accepted connection: raw until it would block, then registered with the reactor.
pub struct Conn {
    /// Bytes read before the connection became a `Conn`, handed out first.
    read_before: Vec<u8>,
    raw: Option<StdStream>,
    registered: Option<tokio::net::UnixStream>,
    /// Nothing has been read yet: the request may still be on its way from a client that
    /// just connected.
    fresh: bool,
    /// The connection's first read held a whole request without a body that asks to close
    /// the connection: nothing more will be read from it.
    read_all: bool,
    /// Armed while a write waits for the peer to read: past it, the write fails.
    write_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// How long a write may wait for the peer to read. A peer that never reads its answers (or
/// pipelines requests without reading) would otherwise hold its connection, and its slot,
/// for ever.
pub const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a connection accepted before its request arrived is waited for in place (the
/// client writes right after connecting: a few microseconds) before it goes to the reactor.
const FIRST_BYTES_WAIT: std::time::Duration = std::time::Duration::from_micros(200);

impl Conn {
    /// A connection nothing has been read from yet.
    pub fn new(stream: StdStream) -> Conn {
        Conn {
            read_before: Vec::new(),
            raw: Some(stream),
            registered: None,
            fresh: true,
            read_all: false,
            write_deadline: None,
        }
    }

    /// A connection whose first bytes (`read_first`) were read already: they are read again
    /// from here first, and an empty read means nothing came in the wait.
    pub fn after_first_read(stream: StdStream, first: Vec<u8>) -> Conn {
        Conn {
            read_all: last_request(&first),
            read_before: first,
            raw: Some(stream),
            registered: None,
            fresh: false,
            write_deadline: None,
        }
    }

    /// A connection whose requests so far were all read and answered.
    pub fn answered(stream: StdStream) -> Conn {
        Conn::after_first_read(stream, Vec::new())
    }

    /// The socket as the reactor knows it, registering it the first time.
    fn registered(&mut self) -> io::Result<Pin<&mut tokio::net::UnixStream>> {
        if let Some(stream) = self.raw.take() {
            self.registered = Some(tokio::net::UnixStream::from_std(stream)?);
        }
        self.registered
            .as_mut()
            .map(Pin::new)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }

    /// What a write through the reactor gave: a write that stays blocked past `WRITE_TIMEOUT`
    /// fails; one that moves disarms the deadline.
    fn bounded_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.write_deadline = None;
            return polled;
        }
        let deadline = self
            .write_deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_TIMEOUT)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer did not read its answer in time",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Runs `op` on the raw socket, if it is still raw; `None` when it would block (or is
    /// registered already), so that the caller goes through the reactor.
    fn try_raw<T>(
        &mut self,
        op: impl FnOnce(&mut StdStream) -> io::Result<T>,
    ) -> Option<io::Result<T>> {
        let stream = self.raw.as_mut()?;
        match op(stream) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            done => Some(done),
        }
    }
}

/// Whether `bytes` are one whole request, without a body, that asks to close the connection
/// after its answer (`Connection: close`, as the CLI and most scripts send).
fn last_request(bytes: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(head)) = request.parse(bytes) else {
        return false;
    };
    asks_to_close(request.headers) == Some(true) && head == bytes.len()
}

/// Whether a request without a body asks to close the connection after its answer; `None`
/// when it has a body.
pub fn asks_to_close(headers: &[httparse::Header]) -> Option<bool> {
    let mut close = false;
    for h in headers {
        if h.name.eq_ignore_ascii_case("connection") {
            close = h.value.eq_ignore_ascii_case(b"close");
        } else if h.name.eq_ignore_ascii_case("transfer-encoding")
            || (h.name.eq_ignore_ascii_case("content-length") && h.value != b"0")
        {
            return None;
        }
    }
    Some(close)
}

/// Waits until `stream` is readable, at most `limit`.
fn wait_readable(stream: &StdStream, limit: std::time::Duration) {
    use nix::poll::{PollFd, PollFlags, ppoll};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
    let _ = ppoll(
        &mut fds,
        Some(nix::sys::time::TimeSpec::from_duration(limit)),
        None,
    );
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.read_before.is_empty() {
            let n = this.read_before.len().min(buf.remaining());
            buf.put_slice(&this.read_before[..n]);
            this.read_before.drain(..n);
            return Poll::Ready(Ok(()));
        }
        let fresh = std::mem::take(&mut this.fresh);
        if fresh && let Some(stream) = &this.raw {
            // The daemon often accepts before the client has written. Registering with the
            // reactor to wait for those few microseconds would cost more system calls than the
            // request itself; a bounded wait here costs one.
            wait_readable(stream, FIRST_BYTES_WAIT);
        }
        if this.read_all && this.registered.is_none() {
            // hyper reads on while it answers, to notice a client that hangs up. This one
            // said it sends nothing more, and its connection closes after the answer: the
            // read would only cost a system call, or two more to register for its wait.
            return Poll::Pending;
        }
        let start = buf.filled().len();
        if let Some(done) = this.try_raw(|s| s.read(buf.initialize_unfilled())) {
            if let Ok(n) = done {
                buf.advance(n);
                // Only the connection's first bytes: later ones may be the body of an earlier
                // request, and a body that looks like a closing request must not stop the
                // reading of the rest.
                this.read_all = fresh && last_request(&buf.filled()[start..]);
            }
            return Poll::Ready(done.map(|_| ()));
        }
        this.registered()?.poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(done) = this.try_raw(|s| s.write(buf)) {
            return Poll::Ready(done);
        }
        let polled = this.registered()?.poll_write(cx, buf);
        this.bounded_write(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(done) = this.try_raw(|s| s.write_vectored(bufs)) {
            return Poll::Ready(done);
        }
        let polled = this.registered()?.poll_write_vectored(cx, bufs);
        this.bounded_write(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Writes go straight to the socket: nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Closed right after: the close says the same to the peer, and a Unix socket has no
        // reset to fear from unread input.
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn only_the_first_bytes_can_end_the_reading() {
        let (mut client, server) = StdStream::pair().expect("a socket pair");
        server.set_nonblocking(true).expect("non-blocking");
        let mut conn = Conn::new(server);
        let mut buf = vec![0u8; 4096];
        client
            .write_all(b"POST /v1/reload HTTP/1.1\r\nContent-Length: 80\r\n\r\n")
            .expect("head written");
        let n = conn.read(&mut buf).await.expect("head read");
        assert!(n > 0 && !conn.read_all, "a request with a body reads on");
        // A body that happens to look like a last request does not stop the reading.
        client
            .write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .expect("body written");
        let n = conn.read(&mut buf).await.expect("body read");
        assert!(n > 0 && !conn.read_all);
        client
            .write_all(b"the rest of the body")
            .expect("rest written");
        let rest = tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("the rest is read, not waited for forever")
            .expect("rest read");
        assert_eq!(&buf[..rest], b"the rest of the body");

        // A connection whose first bytes are a whole closing request reads nothing more.
        let (mut client, server) = StdStream::pair().expect("a socket pair");
        server.set_nonblocking(true).expect("non-blocking");
        let mut conn = Conn::new(server);
        client
            .write_all(b"GET /v1/health HTTP/1.1\r\nConnection: close\r\n\r\n")
            .expect("request written");
        let n = conn.read(&mut buf).await.expect("request read");
        assert!(n > 0 && conn.read_all);
    }
}

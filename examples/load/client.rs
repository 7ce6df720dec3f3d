//! The one HTTP client every socket figure is taken with (daemon and floor alike), the floor
//! server, and the misbehaving connections that must not change the figures.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A request as a script or the CLI sends it: `Connection: close` on a new connection.
pub fn request_bytes(path: &str, keep_alive: bool) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: oauth2mci\r\n{}\r\n",
        if keep_alive {
            ""
        } else {
            "Connection: close\r\n"
        }
    )
    .into_bytes()
}

/// One token request for each of the clients `c0`..`c{clients-1}`, in turn.
pub fn token_requests(clients: usize, keep_alive: bool) -> Vec<Vec<u8>> {
    (0..clients)
        .map(|i| request_bytes(&format!("/v1/clients/c{i}/token"), keep_alive))
        .collect()
}

/// Reads one response (head and `Content-Length` body) into `buf`; returns the status.
pub fn read_response(stream: &mut UnixStream, buf: &mut Vec<u8>) -> io::Result<u16> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the response ended",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut headers);
        let parsed = response
            .parse(buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if let httparse::Status::Complete(head) = parsed {
            let length = response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| {
                    std::str::from_utf8(h.value)
                        .ok()?
                        .trim()
                        .parse::<usize>()
                        .ok()
                })
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        "no content-length in the answer",
                    )
                })?;
            let status = response.code.unwrap_or(0);
            if buf.len() >= head + length {
                return Ok(status);
            }
        }
    }
}

/// One request on a new connection, as `curl --unix-socket` or the CLI makes it.
pub fn fresh(socket: &Path, request: &[u8], buf: &mut Vec<u8>) -> io::Result<u16> {
    let mut stream = UnixStream::connect(socket)?;
    stream.write_all(request)?;
    read_response(&mut stream, buf)
}

/// The body of a response read by `read_response`.
pub fn body(buf: &[u8]) -> &[u8] {
    let at = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(buf.len(), |i| i + 4);
    &buf[at..]
}

/// The floor: one thread, std only, reads a request head and writes a fixed 200 reply; the
/// least any server can do per request on this machine.
pub struct Floor {
    pub socket: PathBuf,
    /// The serving thread's id, for its CPU time.
    pub tid: Arc<std::sync::atomic::AtomicI32>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Floor {
    pub fn start(socket: PathBuf, body: &[u8]) -> io::Result<Floor> {
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)?;
        let mut reply = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncache-control: no-store\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        reply.extend_from_slice(body);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let tid = Arc::new(std::sync::atomic::AtomicI32::new(0));
        let own_tid = tid.clone();
        let thread = std::thread::spawn(move || {
            own_tid.store(nix::unistd::gettid().as_raw(), Ordering::Relaxed);
            let mut buf = Vec::with_capacity(4096);
            let mut chunk = [0u8; 4096];
            for stream in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut stream) = stream else { continue };
                buf.clear();
                // Requests on this connection until the client closes it (keep-alive).
                'conn: loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk) {
                            Ok(0) | Err(_) => break 'conn,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let close = buf
                        .windows(17)
                        .any(|w| w.eq_ignore_ascii_case(b"connection: close"));
                    buf.clear();
                    if stream.write_all(&reply).is_err() || close {
                        break;
                    }
                }
            }
        });
        Ok(Floor {
            socket,
            tid,
            stop,
            thread: Some(thread),
        })
    }
}

impl Floor {
    /// CPU time (user + system) the serving thread used so far, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let tid = self.tid.load(Ordering::Relaxed);
        crate::fixture::cpu_ticks(&format!("/proc/self/task/{tid}/stat")).unwrap_or(0)
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so that it sees the flag.
        let _ = UnixStream::connect(&self.socket);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Latencies (ns) of `count` requests on new connections, one after the other.
pub fn latencies_fresh(socket: &Path, request: &[u8], count: usize) -> io::Result<Vec<u64>> {
    let mut buf = Vec::with_capacity(4096);
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        let status = fresh(socket, request, &mut buf)?;
        out.push(t.elapsed().as_nanos() as u64);
        check(status, &buf)?;
    }
    Ok(out)
}

/// Latencies (ns) of `count` requests on one kept-alive connection.
pub fn latencies_kept(socket: &Path, request: &[u8], count: usize) -> io::Result<Vec<u64>> {
    let mut stream = UnixStream::connect(socket)?;
    let mut buf = Vec::with_capacity(4096);
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        stream.write_all(request)?;
        let status = read_response(&mut stream, &mut buf)?;
        out.push(t.elapsed().as_nanos() as u64);
        check(status, &buf)?;
    }
    Ok(out)
}

fn check(status: u16, buf: &[u8]) -> io::Result<()> {
    if status == 200 {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "answer {status}: {}",
        String::from_utf8_lossy(body(buf))
    )))
}

/// Requests per second with `threads` clients each making `per_thread` requests, on new
/// connections or each on one kept-alive connection.
pub fn throughput(
    socket: &Path,
    requests: &[Vec<u8>],
    threads: usize,
    per_thread: usize,
    keep_alive: bool,
) -> io::Result<f64> {
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|i| {
            let socket = socket.to_path_buf();
            let requests = requests.to_vec();
            std::thread::spawn(move || -> io::Result<()> {
                let mut buf = Vec::with_capacity(4096);
                let mut kept = if keep_alive {
                    Some(UnixStream::connect(&socket)?)
                } else {
                    None
                };
                for n in 0..per_thread {
                    let request = &requests[(i + n * threads) % requests.len()];
                    let status = match kept.as_mut() {
                        Some(stream) => {
                            stream.write_all(request)?;
                            read_response(stream, &mut buf)?
                        }
                        None => fresh(&socket, request, &mut buf)?,
                    };
                    check(status, &buf)?;
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join()
            .map_err(|_| io::Error::other("a client thread panicked"))??;
    }
    Ok((threads * per_thread) as f64 / start.elapsed().as_secs_f64())
}

/// Connections that hold a slot without finishing a request: some sit silent, some send a
/// header byte now and then. They reconnect when the server cuts them off.
pub struct Nuisance {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Nuisance {
    pub fn start(socket: &Path, silent: usize, trickling: usize) -> Nuisance {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for i in 0..silent + trickling {
            let socket = socket.to_path_buf();
            let stop = stop.clone();
            let trickle = i >= silent;
            threads.push(std::thread::spawn(move || {
                let head = b"GET /v1/clients/c0/token HTTP/1.1\r\nX-Slow: ";
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut stream) = UnixStream::connect(&socket) else {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    };
                    let mut sent = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(100));
                        if trickle {
                            let byte = head.get(sent).copied().unwrap_or(b'x');
                            if stream.write_all(&[byte]).is_err() {
                                break;
                            }
                            sent += 1;
                        }
                    }
                }
            }));
        }
        Nuisance { stop, threads }
    }
}

impl Drop for Nuisance {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

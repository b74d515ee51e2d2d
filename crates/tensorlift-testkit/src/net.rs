//! Real servers for remote-source tests: an S3 server (`s3s-fs`, from crates.io) over a
//! folder, a plain HTTP file server with `Range` support, and a proxy that injects faults
//! between a client and either.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

/// The `s3s-fs` binary: `$TENSORLIFT_S3S_FS`, else where the test command installs it
/// (`~/.cache/tensorlift/s3s-fs-0.14.1/bin/s3s-fs`); `None` if neither exists.
pub fn s3s_fs() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TENSORLIFT_S3S_FS") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let home = std::env::var_os("HOME")?;
    let p = Path::new(&home).join(".cache/tensorlift/s3s-fs-0.14.1/bin/s3s-fs");
    p.is_file().then_some(p)
}

/// A port free now on 127.0.0.1.
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_for_port(port: u16, child: &mut Child) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            return Err(io::Error::other(format!("the server exited: {status}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(io::Error::new(io::ErrorKind::TimedOut, "the server did not listen within 20 s"))
}

/// An `s3s-fs` server over `root` (each folder in it is a bucket), with credentials; killed
/// when dropped.
#[derive(Debug)]
pub struct S3Server {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

/// The access key and secret [`S3Server`] accepts.
pub const S3_KEYS: (&str, &str) = ("tensorlift-test", "tensorlift-secret");

impl S3Server {
    /// Starts `s3s-fs` (see [`s3s_fs`]) over `root`: on a port free a moment before, so
    /// tried again on another when something else took it meanwhile.
    pub fn start(binary: &Path, root: &Path) -> io::Result<S3Server> {
        let mut last = None;
        for _ in 0..3 {
            match Self::start_once(binary, root) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("s3s-fs did not start")))
    }

    fn start_once(binary: &Path, root: &Path) -> io::Result<S3Server> {
        let port = free_port()?;
        let mut child = Command::new(binary)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", S3_KEYS.0, "--secret-key", S3_KEYS.1])
            .arg(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        if let Err(e) = wait_for_port(port, &mut child) {
            let _ = child.kill();
            return Err(e);
        }
        Ok(S3Server { child, port })
    }

    /// The environment that points `object_store`'s S3 client at `port` (this server's, or a
    /// proxy's in front of it), as a user would set it.
    pub fn env(port: u16) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
            ("AWS_ACCESS_KEY_ID", S3_KEYS.0.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", S3_KEYS.1.to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A request's head as the servers here read it.
#[derive(Debug, Clone)]
pub struct Request {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// The path and query.
    pub target: String,
    /// Header lines, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The head's bytes as received.
    pub raw: Vec<u8>,
}

impl Request {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Reads one request head (and drops any body it announces); `None` at end of stream.
fn read_request(r: &mut BufReader<TcpStream>) -> io::Result<Option<Request>> {
    let mut raw = Vec::new();
    loop {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line)? == 0 {
            return Ok(None);
        }
        raw.extend_from_slice(&line);
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        if raw.len() > 64 << 10 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "request head over 64 KiB"));
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let mut lines = text.lines();
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let method = first.next().unwrap_or("").to_owned();
    let target = first.next().unwrap_or("").to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect::<Vec<_>>();
    let req = Request { method, target, headers, raw };
    if let Some(n) = req.header("content-length").and_then(|v| v.parse::<u64>().ok()) {
        io::copy(&mut r.by_ref().take(n), &mut io::sink())?;
    }
    Ok(Some(req))
}

/// Serves the files under a folder over plain HTTP/1.1, with `Range` (one range), `ETag`
/// (from the length and modification time), `Last-Modified`, and `If-Match` (see
/// [`Validators`]); stops
/// when dropped.
#[derive(Debug)]
pub struct HttpServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    stop: Arc<AtomicBool>,
}

impl HttpServer {
    /// Serves `root`, with `ETag`s and `Last-Modified` times.
    pub fn start(root: &Path) -> io::Result<HttpServer> {
        Self::start_with(root, Validators::Both)
    }

    /// Serves `root` with the validators given: a server whose objects' changes show by
    /// their ETags, by their times alone, or not at all.
    pub fn start_with(root: &Path, validators: Validators) -> io::Result<HttpServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let (root, flag) = (root.to_path_buf(), Arc::clone(&stop));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let root = root.clone();
                std::thread::spawn(move || serve_files(conn, &root, validators));
            }
        });
        Ok(HttpServer { port, stop })
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve_files(conn: TcpStream, root: &Path, validators: Validators) {
    let Ok(read_half) = conn.try_clone() else { return };
    let mut r = BufReader::new(read_half);
    let mut w = conn;
    while let Ok(Some(req)) = read_request(&mut r) {
        let close = req.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        if reply_file(&mut w, root, &req, validators).is_err() || close {
            return;
        }
    }
}

fn reply_file(w: &mut TcpStream, root: &Path, req: &Request, validators: Validators) -> io::Result<()> {
    // Percent-decoded first: GCS's client sends `bucket/a%2Fb` for the object `a/b`.
    let path = percent_decode(req.target.split('?').next().unwrap_or(""));
    let file = path
        .split('/')
        .filter(|p| !p.is_empty())
        .try_fold(root.to_path_buf(), |acc, part| (part != ".." && part != ".").then(|| acc.join(part)));
    let status = |w: &mut TcpStream, code: &str| write!(w, "HTTP/1.1 {code}\r\nContent-Length: 0\r\n\r\n");
    let Some(meta) = file.as_ref().and_then(|f| std::fs::metadata(f).ok()).filter(|m| m.is_file()) else {
        return status(w, "404 Not Found");
    };
    let file = file.unwrap_or_default();
    let len = meta.len();
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).unwrap_or_default();
    let etag = format!("\"{len:x}-{:x}\"", mtime.as_nanos());
    if let Some(want) = req.header("if-match") {
        if want != "*" && (want != etag || validators != Validators::Both) {
            return status(w, "412 Precondition Failed");
        }
    }
    // One range, `a-b` or `a-`; anything else the server cannot satisfy is a 416.
    let range = match req.header("range").and_then(|r| r.strip_prefix("bytes=")) {
        None => None,
        Some(spec) => {
            let (a, b) = spec.split_once('-').unwrap_or((spec, "x"));
            let end = if b.is_empty() { Ok(len) } else { b.parse::<u64>().map(|b| b.saturating_add(1).min(len)) };
            match (a.parse::<u64>(), end) {
                (Ok(a), Ok(end)) if a < len && a < end => Some(a..end),
                _ => {
                    let head = format!("HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\n");
                    return write!(w, "{head}Content-Length: 0\r\n\r\n");
                }
            }
        }
    };
    let (code, span) = match &range {
        Some(r) => ("206 Partial Content", r.clone()),
        None => ("200 OK", 0..len),
    };
    let mut head = format!("HTTP/1.1 {code}\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\n", span.end - span.start);
    if validators == Validators::Both {
        head += &format!("ETag: {etag}\r\n");
    }
    if validators == Validators::Weak {
        // Of the length alone: a server's word that two versions mean the same.
        head += &format!("ETag: W/\"{len:x}\"\r\n");
    }
    if validators != Validators::Neither {
        head += &format!("Last-Modified: {}\r\n", http_date(mtime.as_secs()));
    }
    if range.is_some() {
        head += &format!("Content-Range: bytes {}-{}/{len}\r\n", span.start, span.end.saturating_sub(1));
    }
    head += "\r\n";
    w.write_all(head.as_bytes())?;
    if req.method == "HEAD" {
        return Ok(());
    }
    let mut f = std::fs::File::open(&file)?;
    io::Seek::seek(&mut f, io::SeekFrom::Start(span.start))?;
    io::copy(&mut f.take(span.end - span.start), w)?;
    Ok(())
}

/// The validators an [`HttpServer`] sends with each reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validators {
    /// `ETag` and `Last-Modified` (and `If-Match` honoured).
    Both,
    /// `Last-Modified` only.
    LastModified,
    /// `Last-Modified` and a weak `ETag` (`W/"..."`) made of the length alone, which no
    /// `If-Match` matches.
    Weak,
    /// Neither: changes cannot be seen.
    Neither,
}

/// What the proxy does to a request it picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Replies `503 Slow Down` (S3's throttling reply) without asking the server.
    SlowDown,
    /// Forwards the reply's head and half its body, then drops the connection.
    DropMidBody,
    /// Waits this long before forwarding the request.
    Delay(Duration),
    /// Forwards the reply with this many bytes more in its body than the server sent, its
    /// `Content-Length` raised to match (a server that sends more than it was asked).
    Pad(usize),
    /// Forwards the reply with its `Content-Range` header's value replaced by this one (a
    /// server that names another range than it sends, or a number past any file's).
    ContentRange(&'static str),
}

/// A rule: the `nth` (from 1) request whose head contains `needle` (any request where it is
/// empty) gets `fault`; with `every`, each one from the `nth` on does.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Text the request head must contain (case-insensitive).
    pub needle: String,
    /// Which matching request (from 1).
    pub nth: usize,
    /// Whether every later matching request gets it too.
    pub every: bool,
    /// What happens to it.
    pub fault: Fault,
}

/// A TCP proxy in front of a server that forwards each request on a connection of its own
/// (`Connection: close`) and injects [`Fault`]s; it keeps a log of the requests it saw.
#[derive(Debug)]
pub struct FaultProxy {
    /// Its port on 127.0.0.1.
    pub port: u16,
    state: Arc<ProxyState>,
}

#[derive(Debug)]
struct ProxyState {
    upstream: u16,
    rules: Vec<Rule>,
    matched: Mutex<Vec<usize>>,
    log: Mutex<Vec<(Request, Option<Fault>)>>,
    /// Replies that could not be delivered because the client had gone.
    abandoned: AtomicUsize,
    stop: AtomicBool,
}

impl FaultProxy {
    /// A proxy to `upstream` (a port on 127.0.0.1) applying `rules`.
    pub fn start(upstream: u16, rules: Vec<Rule>) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let matched = Mutex::new(vec![0; rules.len()]);
        let state = Arc::new(ProxyState {
            upstream,
            rules,
            matched,
            log: Mutex::new(Vec::new()),
            abandoned: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let s = Arc::clone(&state);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let s = Arc::clone(&s);
                std::thread::spawn(move || proxy_conn(conn, &s));
            }
        });
        Ok(FaultProxy { port, state })
    }

    /// The requests seen so far, with the fault each got.
    pub fn log(&self) -> Vec<(Request, Option<Fault>)> {
        self.state.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Replies the proxy could not deliver because the client had closed its connection (a
    /// request the client cancelled).
    pub fn abandoned(&self) -> usize {
        self.state.abandoned.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn proxy_conn(conn: TcpStream, s: &ProxyState) {
    let Ok(read_half) = conn.try_clone() else { return };
    let mut r = BufReader::new(read_half);
    let mut w = conn;
    while let Ok(Some(req)) = read_request(&mut r) {
        let fault = pick(s, &req);
        if let Ok(mut log) = s.log.lock() {
            log.push((req.clone(), fault));
        }
        if forward(&mut w, &mut r, s, &req, fault).is_err() {
            return;
        }
    }
}

fn pick(s: &ProxyState, req: &Request) -> Option<Fault> {
    let head = String::from_utf8_lossy(&req.raw).to_ascii_lowercase();
    let mut matched = s.matched.lock().ok()?;
    let mut fault = None;
    for (i, rule) in s.rules.iter().enumerate() {
        if head.contains(&rule.needle.to_ascii_lowercase()) {
            matched[i] += 1;
            let hit = matched[i] == rule.nth || (rule.every && matched[i] > rule.nth);
            if hit && fault.is_none() {
                fault = Some(rule.fault);
            }
        }
    }
    fault
}

/// Forwards one request (or fakes its reply); an error ends the client's connection.
fn forward(
    w: &mut TcpStream,
    r: &mut BufReader<TcpStream>,
    s: &ProxyState,
    req: &Request,
    fault: Option<Fault>,
) -> io::Result<()> {
    match fault {
        Some(Fault::SlowDown) => {
            let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
            return write!(
                w,
                "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
        Some(Fault::Delay(d)) => {
            // Waits in small steps, watching for the client to give up.
            let until = Instant::now() + d;
            while Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
                if client_gone(r) {
                    s.abandoned.fetch_add(1, Ordering::Relaxed);
                    return Err(io::Error::from(io::ErrorKind::ConnectionAborted));
                }
            }
        }
        _ => {}
    }
    let mut up = TcpStream::connect(("127.0.0.1", s.upstream))?;
    // The request as received, asking the server to close after its reply, so that the
    // reply ends where the stream does.
    let text = String::from_utf8_lossy(&req.raw);
    let mut head = String::new();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        if !line.to_ascii_lowercase().starts_with("connection:") {
            head += line;
            head += "\r\n";
        }
    }
    head += "Connection: close\r\n\r\n";
    up.write_all(head.as_bytes())?;
    let mut reply = Vec::new();
    up.read_to_end(&mut reply)?;
    let body_at = reply.windows(4).position(|w| w == b"\r\n\r\n").map_or(reply.len(), |p| p + 4);
    if fault == Some(Fault::DropMidBody) {
        let cut = body_at + (reply.len() - body_at) / 2;
        w.write_all(&reply[..cut])?;
        w.flush()?;
        let _ = w.shutdown(Shutdown::Both);
        return Err(io::Error::from(io::ErrorKind::ConnectionAborted));
    }
    match fault {
        Some(Fault::Pad(n)) => {
            reply = with_header(&reply, body_at, "content-length", |v| {
                (v.trim().parse::<usize>().unwrap_or(0) + n).to_string()
            });
            reply.extend(std::iter::repeat_n(b'x', n));
        }
        Some(Fault::ContentRange(value)) => reply = with_header(&reply, body_at, "content-range", |_| value.to_owned()),
        _ => {}
    }
    let delivered = w.write_all(&reply);
    if delivered.is_err() {
        s.abandoned.fetch_add(1, Ordering::Relaxed);
    }
    delivered?;
    // The server closes after its reply: so does the proxy, for the client.
    let _ = w.shutdown(Shutdown::Both);
    Err(io::Error::from(io::ErrorKind::ConnectionAborted))
}

/// `reply` (its body from `body_at`) with header `name`'s value replaced by what `value`
/// makes of it.
fn with_header(reply: &[u8], body_at: usize, name: &str, value: impl Fn(&str) -> String) -> Vec<u8> {
    let head = String::from_utf8_lossy(&reply[..body_at]).into_owned();
    let mut out = String::new();
    for line in head.split("\r\n").filter(|l| !l.is_empty()) {
        match line.split_once(':') {
            Some((k, v)) if k.eq_ignore_ascii_case(name) => out += &format!("{k}: {}\r\n", value(v)),
            _ => out += &format!("{line}\r\n"),
        }
    }
    out += "\r\n";
    let mut out = out.into_bytes();
    out.extend_from_slice(&reply[body_at..]);
    out
}

/// Whether the client closed its connection (a read would see the end of the stream).
fn client_gone(r: &mut BufReader<TcpStream>) -> bool {
    let conn = r.get_ref();
    if conn.set_nonblocking(true).is_err() {
        return false;
    }
    let mut byte = [0u8; 1];
    let gone = matches!(conn.peek(&mut byte), Ok(0));
    let _ = conn.set_nonblocking(false);
    gone
}

/// `%XX` escapes decoded (an invalid one is kept as it is).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).and_then(|&c| hex(c)), b.get(i + 2).and_then(|&c| hex(c))) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An HTTP date (RFC 9110's IMF-fixdate) of `secs` since the epoch.
fn http_date(secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn http_dates_and_escapes() {
        assert_eq!(super::http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(super::http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(super::http_date(1_709_210_096), "Thu, 29 Feb 2024 12:34:56 GMT");
        assert_eq!(super::percent_decode("/b/m%2Fx%20y%zz"), "/b/m/x y%zz");
    }
}
